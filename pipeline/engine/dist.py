"""The process group: one per process, from a torchrun/deepspeed-launcher/Ray environment or a lone process.

`init_distributed()` is the only entry point the trainer uses. It accepts three situations:
- a process group already exists (Ray Train or a caller made it): it is used as it is;
- the launcher's variables RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT are set: `env://` rendezvous;
- none of them: a world of one, rendezvous through an in-memory store (no port is opened).
The backend is NCCL when CUDA is usable, else gloo; on a machine without CUDA `DS_ACCELERATOR=cpu` is set before
DeepSpeed is imported, so DeepSpeed picks its CPU accelerator instead of probing for GPUs.
"""
from __future__ import annotations

import gc
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Optional

import torch
import torch.distributed as tdist

LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    backend: str
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def uses_cuda() -> bool:
    """True where this process trains on a GPU (CUDA present and DeepSpeed not told to use the CPU)."""
    return torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR", "cuda") != "cpu"


def init_distributed(timeout_s: float = 1800.0) -> DistInfo:
    """Returns this process's place in the (possibly new) process group; DeepSpeed's comm layer is bound to it."""
    cuda = uses_cuda()
    if not cuda:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    backend = "nccl" if cuda else "gloo"
    if not tdist.is_initialized():
        _init_torch_group(backend, timedelta(seconds=timeout_s))
    backend = tdist.get_backend()
    rank, world = tdist.get_rank(), tdist.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", rank % max(torch.cuda.device_count(), 1) if cuda else 0))
    # DeepSpeed reads these even when the group exists already.
    os.environ.setdefault("RANK", str(rank))
    os.environ.setdefault("WORLD_SIZE", str(world))
    os.environ.setdefault("LOCAL_RANK", str(local_rank))
    # Under Ray each worker may see only its own GPU (CUDA_VISIBLE_DEVICES), whatever its local rank.
    gpu = local_rank % torch.cuda.device_count() if cuda else 0
    if cuda:
        torch.cuda.set_device(gpu)
    import deepspeed  # noqa: E402  (after DS_ACCELERATOR is settled)

    deepspeed.init_distributed(dist_backend=backend, verbose=False)
    device = torch.device("cuda", gpu) if cuda else torch.device("cpu")
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, backend=backend, device=device)


def _init_torch_group(backend: str, timeout: timedelta) -> None:
    present = [v for v in LAUNCHER_VARS if v in os.environ]
    if len(present) == len(LAUNCHER_VARS):
        tdist.init_process_group(backend, init_method="env://", timeout=timeout)
        return
    if "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1:
        missing = [v for v in LAUNCHER_VARS if v not in os.environ]
        raise RuntimeError(f"WORLD_SIZE={os.environ['WORLD_SIZE']} but the launcher variables {missing} are not set; "
                           "start the job with torchrun, the deepspeed launcher or the Ray orchestrator")
    tdist.init_process_group(backend, store=tdist.HashStore(), rank=0, world_size=1, timeout=timeout)


def shutdown() -> None:
    """Waits for every rank, then closes the process group: call it once before a process of a multi-rank job
    exits, after dropping the Trainer. Collective handles still alive when the interpreter tears down (a DeepSpeed
    engine's, say) or a rank leaving while the others still talk can abort the process (SIGABRT, "terminate called
    without an active exception"); collecting garbage first frees the handles of engines no longer referenced."""
    if tdist.is_initialized():
        gc.collect()
        barrier()
        tdist.destroy_process_group()


def rank() -> int:
    return tdist.get_rank() if tdist.is_initialized() else 0


def world_size() -> int:
    return tdist.get_world_size() if tdist.is_initialized() else 1


def barrier() -> None:
    if world_size() > 1:
        tdist.barrier()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Returns rank `src`'s `obj` on every rank."""
    if world_size() == 1:
        return obj
    box = [obj]
    tdist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_objects(obj: Any) -> list:
    """Returns every rank's `obj`, in rank order."""
    if world_size() == 1:
        return [obj]
    out: list = [None] * world_size()
    tdist.all_gather_object(out, obj)
    return out


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Returns the sum over ranks of `t` (a new tensor; `t` is left as it was)."""
    t = t.clone()
    if world_size() > 1:
        tdist.all_reduce(t, op=tdist.ReduceOp.SUM)
    return t


class _GatherWithGrad(torch.autograd.Function):
    """All-gather whose backward hands each rank the summed gradient of its own slice.

    Every rank computes a loss over the gathered batch, and the total objective is the sum of those losses, so the
    gradient reaching a rank's features is the sum over ranks of the gradients for its slice (all-reduce, then take
    the slice). DeepSpeed then averages parameter gradients over ranks as for any other loss.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.rank, ctx.n = tdist.get_rank(), x.shape[0]
        parts = [torch.empty_like(x) for _ in range(tdist.get_world_size())]
        tdist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        grad = grad.contiguous().clone()
        tdist.all_reduce(grad, op=tdist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.n:(ctx.rank + 1) * ctx.n]


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Returns the rank-ordered concatenation (dim 0) of every rank's `x`; gradients flow back to each rank's `x`.

    Every rank must pass the same shape. With one process this is `x` itself.
    """
    if world_size() == 1:
        return x
    return _GatherWithGrad.apply(x)


def gather_no_grad(x: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """Returns the rank-ordered concatenation (dim 0) of every rank's `x`, detached (for metrics and retrieval)."""
    if x is None or world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world_size())]
    tdist.all_gather(parts, x.detach().contiguous())
    return torch.cat(parts, dim=0)
