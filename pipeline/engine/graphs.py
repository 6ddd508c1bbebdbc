"""CUDA graphs for a chain of modules in training: each module's forward and backward replayed as one graph each.

An eager step pays the host's cost (Python, autograd, kernel launches) for every kernel it runs. Below 32 frames
that cost, not the GPU, sets VideoMamba's step time: on the lent H200 VideoMamba-Ti at 8 frames, batch 4, takes
about 100 ms a step eager and 17 ms with its blocks replayed from graphs (bench/RESULTS.md).

    chain = graph_chain(backbone.chained_blocks())   # in place: the modules keep their parameters, names, state dicts

A chain is a list of modules called one after another in each training step, module i+1 on module i's outputs
(VideoMamba's blocks: (hidden, residual) -> (hidden, residual); BERT's layers (hidden, mask[, video, video mask]) ->
the same, passing on unchanged what they only read; any input or output may be None). At the first call of the first
module with grad enabled on CUDA tensors the whole chain is captured, in the order it will replay: two eager warm-up
passes on a side stream (Triton compiles, cuBLAS sets up), then every forward in order, each reading its inputs from
the previous module's static outputs (as autograd leaves of their own), then every backward in reverse order, all in
one pool. Replaying in that order never overwrites memory that another graph still needs, and a chained input is
already in place (no copy).

Graphs are captured per input shape: the first `shapes` distinct input signatures of the first module (shapes,
dtypes, requires_grad) each get a capture of the whole chain in its own memory pool, at the first call with them.
Stage 2 with `data.mix=batch` alternates batches of 1-frame images and of clips, so it needs two; a capture of a
kind replays only its own graphs and never touches the other's memory.

A call replays its module's graph only when it can do so correctly; anything else runs the module's own forward:
- CUDA tensors, grad enabled, outside any other capture, the module in the training mode it was captured in, and
  inputs whose shapes, dtypes and requires_grad (and which are None) are those of a capture (a new signature past
  `shapes` runs eagerly). Inputs at other addresses are copied into the static ones (so a chain may be
  interrupted, e.g. by a reordering of tokens between modules).
- one forward per backward: a module whose replayed forward still awaits its backward (the graph holds that
  forward's saved activations) runs eagerly, e.g. a second pass of the same backbone before the loss's backward.
Every fallback is counted (`GraphedChain.eager_calls`) and the first of each kind is logged with its reason.

What a caller must know:
- the parameters must keep their storage (ZeRO stages 0-2 update them in place; ZeRO-3 partitions them: refused
  by the trainer);
- outputs alias the graphs' static memory: the next replay of the same module overwrites them, so keep a clone of
  anything needed beyond the step;
- each capture's memory (every module's saved activations and the largest temporaries) stays reserved between
  steps;
- parameter gradients are handed to autograd as tensors this module keeps a reference to, so autograd copies them
  into `.grad` (accumulation over micro-batches works) instead of adopting the graph's memory as `.grad`;
- random numbers (drop path) come from the CUDA generator at each replay, a new draw each time; the capture leaves
  the generator as it found it.
"""
from __future__ import annotations

import gc
import logging
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch
from torch import Tensor, nn

log = logging.getLogger(__name__)

WARMUP_PASSES = 2


def _signature(args: Sequence[Optional[Tensor]]) -> tuple:
    return tuple(None if a is None else (tuple(a.shape), a.dtype, a.requires_grad) for a in args)


def _as_tuple(out) -> tuple:
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


@dataclass
class _Link:
    """One module's captured forward and backward, and the static tensors they read and write."""
    inputs: tuple  # static inputs (None where the module takes None)
    outputs: tuple  # static outputs
    params: tuple  # the module's trainable parameters (inputs of the replay node, so autograd hands them grads)
    forward: torch.cuda.CUDAGraph
    backward: Optional[torch.cuda.CUDAGraph] = None
    grad_outputs: tuple = ()  # static gradients of the outputs, read by the backward graph
    grad_inputs: tuple = ()  # gradients of (non-None inputs, params): persistent detached views, or None
    signature: tuple = ()
    pending: int = 0  # id of the replayed forward whose backward has not run yet, 0 when none


class _Replay(torch.autograd.Function):
    @staticmethod
    def forward(ctx, chain: "GraphedChain", link: _Link, *tensors: Tensor):
        for static, arg in zip((t for t in link.inputs if t is not None), tensors):
            if static.data_ptr() != arg.data_ptr():
                static.copy_(arg)
        link.forward.replay()
        chain.replays += 1
        link.pending = chain.replays
        ctx.link = link
        ctx.release = _Release(link, chain.replays)
        outputs = tuple(None if o is None else o.detach() for o in link.outputs)
        # an output the capture computed without grad (an attention mask passed on) stays without it: else the next
        # module's inputs would not match its capture's signature and it would run eagerly
        ctx.mark_non_differentiable(*(r for r, o in zip(outputs, link.outputs)
                                      if o is not None and not o.requires_grad))
        return outputs

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grads: Tensor):
        link = ctx.link
        for output, static, grad in zip(link.outputs, link.grad_outputs, grads):
            differentiable = output is not None and output.requires_grad  # the others' grads are zeros
            if differentiable and grad is not None and static.data_ptr() != grad.data_ptr():
                static.copy_(grad)
        link.backward.replay()
        link.pending = 0
        return (None, None, *link.grad_inputs)


class _Release:
    """Clears a link's pending forward when autograd frees that forward's node without running its backward (a
    forward whose loss was dropped): after that no backward can come to read its activations."""

    def __init__(self, link: _Link, replay_id: int):
        self.link, self.replay_id = link, replay_id

    def __del__(self):
        if self.link.pending == self.replay_id:
            self.link.pending = 0


@dataclass
class GraphedChain:
    """The graphs of a chain of modules (`graph_chain`), one capture per input signature up to `shapes`; counts
    replays and eager fallbacks."""
    modules: list
    eager_forwards: list  # each module's own forward, as it was before graph_chain
    shapes: int = 1  # how many input signatures get a capture of their own
    captures: dict = field(default_factory=dict)  # the first module's input signature -> the chain's links
    replays: int = 0
    eager_calls: int = 0
    _captured_training: list = field(default_factory=list)
    _logged: set = field(default_factory=set)

    def call(self, index: int, *args: Any):
        reason = self._ineligible(index, args)
        if reason is not None:
            return self._eager(index, args, reason)
        signature = _signature(args)
        link = self._link(index, signature)
        if link is None and index == 0 and len(self.captures) < self.shapes:
            try:
                self.captures[signature] = self._capture(args)
            except Exception as e:
                raise RuntimeError(f"capturing CUDA graphs of a chain of {len(self.modules)} "
                                   f"{type(self.modules[0]).__name__} modules failed: {type(e).__name__}: {e}. "
                                   "Run without them (train.cuda_graphs=false)") from e
            link = self.captures[signature][0]
        if link is None:
            return self._eager(index, args, self._unmatched(index, signature))
        if link.pending:
            return self._eager(index, args, "its graph's last forward still awaits its backward")
        tensors = [a for a in args if a is not None]
        out = _Replay.apply(self, link, *tensors, *link.params)
        return out if len(out) > 1 else out[0]

    # -------------------------------------------------------------------------------------------------- internals
    def _ineligible(self, index: int, args) -> Optional[str]:
        tensors = [a for a in args if a is not None]
        if not all(isinstance(a, Tensor) for a in tensors):
            return "an argument is not a tensor"
        if not tensors or not all(a.is_cuda for a in tensors):
            return "the inputs are not CUDA tensors"
        if not torch.is_grad_enabled():
            return "grad is disabled"
        if torch.cuda.is_current_stream_capturing():
            return "another CUDA graph is being captured"
        if self.captures and self.modules[index].training != self._captured_training[index]:
            return "the module's training mode differs from the capture's"
        return None

    def _link(self, index: int, signature: tuple) -> Optional[_Link]:
        """The captured link of module `index` for inputs of this signature, or None."""
        for links in self.captures.values():
            if links[index].signature == signature:
                return links[index]
        return None

    def _unmatched(self, index: int, signature: tuple) -> str:
        """Why a call with no capture of its signature runs eagerly."""
        if not self.captures and index != 0:
            return "the chain is captured at its first module's call"
        if index == 0 and len(self.captures) >= self.shapes:
            return (f"inputs {signature} differ from the {len(self.captures)} captured signature(s) and no more are "
                    f"kept (train.cuda_graph_shapes={self.shapes})")
        return f"inputs {signature} differ from every capture's"

    def _eager(self, index: int, args, reason: str):
        self.eager_calls += 1
        if reason not in self._logged:
            self._logged.add(reason)
            log.info("CUDA graphs: module %d of the chain runs eagerly: %s (logged once)", index, reason)
        return self.eager_forwards[index](*args)

    def _capture(self, args) -> list:
        """Captures every module's forward (in order) and backward (in reverse) for inputs like `args` into a memory
        pool of their own; returns the chain's links."""
        first = tuple(None if a is None else a.detach().clone().requires_grad_(a.requires_grad) for a in args)
        aliases = [_parameter_aliases(m) for m in self.modules]
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        # the warm-up draws random numbers (drop path): restored, so that the replays draw as if no capture had run
        # and a run resumed from a checkpoint (which captures anew) repeats the uninterrupted run's draws
        rng = torch.random.fork_rng(devices=[torch.cuda.current_device()])
        with _gc_paused(), rng, self._own_forwards(), _autocast_without_cache():
            with torch.cuda.stream(stream):
                for _ in range(WARMUP_PASSES):
                    self._warm_up(first, aliases)
            pool = torch.cuda.graph_pool_handle()
            links, inputs = [], first
            for module, params in zip(self.modules, aliases):
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool, stream=stream):
                    outputs = _as_tuple(torch.func.functional_call(module, params, inputs))
                real = tuple(p for p in module.parameters() if p.requires_grad)
                links.append(_Link(inputs, outputs, real, graph, signature=_signature(inputs)))
                inputs = _leaves(outputs)
            grad_outputs = tuple(None if o is None else torch.zeros_like(o) for o in inputs)
            for link, params in zip(reversed(links), reversed(aliases)):
                link.grad_outputs = grad_outputs
                grad_outputs = self._capture_backward(link, list(params.values()), pool, stream)
        torch.cuda.current_stream().wait_stream(stream)
        self._captured_training = self._captured_training or [m.training for m in self.modules]
        log.info("CUDA graphs: captured the forward and backward of a chain of %d modules for inputs %s "
                 "(capture %d of at most %d)", len(links), links[0].signature, len(self.captures) + 1, self.shapes)
        return links

    @contextmanager
    def _own_forwards(self):
        """The modules' own forwards while capturing (functional_call calls the module)."""
        for module, forward in zip(self.modules, self.eager_forwards):
            module.forward = forward
        try:
            yield
        finally:
            for i, module in enumerate(self.modules):
                module.forward = _bound_call(self, i)

    @staticmethod
    def _capture_backward(link: _Link, aliases: list, pool, stream) -> tuple:
        """Captures the link's backward (parameter gradients w.r.t. `aliases`, the parameters' storage as leaves of
        their own); returns the static gradients of its inputs (zeros where an input takes none), the previous
        link's gradient outputs."""
        diff_inputs = [t for t in link.inputs if t is not None and t.requires_grad]
        differentiable = [(o, g) for o, g in zip(link.outputs, link.grad_outputs)
                          if o is not None and o.requires_grad]
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool, stream=stream):
            grads = torch.autograd.grad([o for o, _ in differentiable], diff_inputs + aliases,
                                        grad_outputs=[g for _, g in differentiable], allow_unused=True)
        by_input = dict(zip(map(id, diff_inputs), grads))
        previous = tuple(None if t is None else by_input.get(id(t)) for t in link.inputs)
        previous = tuple(torch.zeros_like(t) if t is not None and g is None else g
                         for t, g in zip(link.inputs, previous))
        link.backward = graph
        input_grads = tuple(by_input.get(id(t)) if t.requires_grad else None for t in link.inputs if t is not None)
        param_grads = grads[len(diff_inputs):]
        link.grad_inputs = tuple(g.detach() if g is not None else None for g in input_grads + tuple(param_grads))
        return previous

    def _warm_up(self, first: tuple, aliases: list) -> None:
        """Each module's forward and backward once, eagerly (on the capture's stream)."""
        inputs = first
        for module, params in zip(self.modules, aliases):
            outputs = _as_tuple(torch.func.functional_call(module, params, inputs))
            wrt = [t for t in inputs if t is not None and t.requires_grad] + list(params.values())
            differentiable = [o for o in outputs if o is not None and o.requires_grad]
            torch.autograd.grad(differentiable, wrt, grad_outputs=[torch.ones_like(o) for o in differentiable],
                                allow_unused=True)
            inputs = _leaves(outputs)


def _parameter_aliases(module: nn.Module) -> dict:
    """The module's trainable parameters as new autograd leaves on the same storage: the graphs read the weights the
    optimizer updates in place, and capturing never touches the real parameters' autograd state (their gradient
    accumulators, which DeepSpeed hooks and which may live on another stream)."""
    return {name: p.detach().requires_grad_() for name, p in module.named_parameters() if p.requires_grad}


def _leaves(outputs: tuple) -> tuple:
    """The next module's static inputs: the outputs' memory (a chained replay copies nothing) as autograd leaves, so
    that each module's backward graph stops at its own inputs (the next module's inputs may depend on one another
    inside this module: a block's hidden output is computed from its residual output)."""
    return tuple(None if o is None else o.detach().requires_grad_(o.requires_grad) for o in outputs)


@contextmanager
def _gc_paused():
    """Python's cyclic garbage collector collected first, then off until the capture ends: a collection that fires
    mid-capture can free an unreachable earlier chain's graphs and memory (a chain and its modules' forwards hold
    each other), which invalidates the capture (seen on the H200: cuBLAS "execution failed" in a later capture)."""
    gc.collect()
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _autocast_without_cache():
    """The caller's CUDA autocast state with its weight cache off (a graph cannot replay the cache's casts)."""
    enabled = torch.is_autocast_enabled("cuda")
    return torch.autocast("cuda", dtype=torch.get_autocast_dtype("cuda"), enabled=enabled, cache_enabled=False)


def graph_chain(modules: Sequence[nn.Module], shapes: int = 1) -> GraphedChain:
    """Makes each module of the chain replay CUDA graphs when called, with a capture for each of the first `shapes`
    input signatures (see the module docstring); returns the chain's graphs and counters. The modules are changed in
    place (their `forward`), nothing else about them."""
    modules = list(modules)
    if not modules:
        raise ValueError("graph_chain: the chain has no modules")
    if shapes < 1:
        raise ValueError(f"graph_chain: shapes={shapes}; at least one input signature gets a capture")
    chain = GraphedChain(modules, [_own_forward(m) for m in modules], shapes)
    for i, module in enumerate(modules):
        module.forward = _bound_call(chain, i)
    return chain


def _bound_call(chain: GraphedChain, index: int):
    def forward(*args):
        return chain.call(index, *args)
    forward.graphed = (chain, index)
    return forward


def _own_forward(module: nn.Module):
    """The module's forward, or, for a module an earlier graph_chain made replay (a second fit() of one model), the
    forward it had before: the new chain replaces the old one instead of wrapping it."""
    graphed = getattr(module.forward, "graphed", None)
    return graphed[0].eager_forwards[graphed[1]] if graphed else module.forward
