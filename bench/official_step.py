"""The official VideoMamba code's training steps on one GPU, beside bench/train_step.py's (issue 23, item 2): its
VideoMamba-M forward+backward at 8 frames, its stage-1 step (video_sm: masked alignment to its CLIP teacher) and its
stage-2 step (video_mm: UMT_VIDEOMAMBA with its BERT, VTC + VTM + MLM + UTA), on synthetic tensors, at the batch and
shapes of train_step.py.

    python -m bench.official_step --official DIR [--part backbone stage1 stage2] [--batch1 64] [--batch2 128]
                                  [--backbone-batch 4] [--steps 10] [--warmup 3] [--profile-steps 3] [--json OUT]
    python -m bench.official_step --official DIR --check      # the carried tree holds every file imported

DIR is a source tree of github:OpenGVLab/VideoMamba (bench/pack_official.sh carries mamba/, causal-conv1d/,
videomamba/video_sm/ and videomamba/video_mm/) with its kernels built in place for sm_90
(../shared/gpu/official-videomamba-sm90.patch applied, then `setup.py build_ext --inplace` in mamba/ and
causal-conv1d/; bench/gpu_train_step.sh does it). Each part runs in its own process (the video_sm and video_mm trees
both have top-level `models` / `utils`; a part that fails leaves the others' numbers). The part's process puts DIR's
mamba/ and causal-conv1d/ first on sys.path and refuses to run when `mamba_ssm` comes from anywhere else.

What is timed, as the official scripts run it:
- backbone: video_sm/models/videomamba.py `videomamba_middle` (num_classes 1000 head, bf16 autocast as
  run_class_finetuning.py), forward + mean-square loss of the logits + backward, no optimizer (bench/backbone.py's
  measure for ours);
- stage1: video_sm/models/videomamba_pretrain.py `videomamba_middle_pretrain` (the arguments of
  run_videomamba_pretraining.py `get_model` with exp/k400/videomamba_middle_mask/run_mask_pretrain.sh's values) and
  video_sm/models/clip.py `clip_b16` (return_attn, clip_return_cls, l2 norm; random weights: pretrained=False); the
  step is engines/engine_for_pretraining_videomamba.py `train_one_epoch`'s loop body, line for line (teacher under
  no_grad and bf16 autocast, the attention mask by torch.multinomial, the l2 loss, utils.py
  NativeScalerWithGradNormCount: GradScaler, unscale, the gradient norm, step; the per-step lr/wd assignment,
  loss.item(), the loop's torch.cuda.synchronize()); model in fp32 under torch.cuda.amp.autocast(bf16) (--bf16);
  optimizer optim_factory.create_optimizer (adamw, betas 0.9 0.95, weight decay 0.05, lr 1.5e-4 x 2048 / 256);
- stage2: video_mm/models/umt_videomamba.py `UMT_VIDEOMAMBA` built from exp_pt/videomamba_middle_5m/config.py,
  read by the official utils/config.py (the vision encoder's pretrained file dropped: random weights), the model
  cast to bf16 as tasks/shared_utils.py `setup_model` does under fp16 + bf16, utils/optimizer.py `create_optimizer`
  (adamW 4e-4, betas 0.9 0.999, weight decay 0.05), and tasks/pretrain.py `train`'s loop body (tokenize to 32 ids,
  torch.cuda.amp.autocast(bf16), the sum of the loss dict, zero_grad, backward, step, .item() of every loss and of
  the temperature). The BERT keeps gradient_checkpointing = True as the config says;
- stage2_vision, run when stage2 fails (or asked for): what of stage 2 runs without the text side, video_mm's vision
  encoder and teacher, encode_teacher's mask, the UTA loss, backward and the official optimizer.
Timed like train_step.py: `--warmup` steps, then `--steps` back to back with one synchronize at the end; peak memory
over them; GPU busy under torch.profiler.

Compatibility shims (each one the JSON lists, with why; nothing else of the official code is changed):
- transformers 5 for video_mm's xbert.py (written for transformers 4.x): `apply_chunking_to_forward`,
  `prune_linear_layer` and `find_pruneable_heads_and_indices` are no longer in transformers.modeling_utils (the first
  two are in transformers.pytorch_utils, the third is gone: a copy of its 4.x code); PreTrainedModel.init_weights
  now needs post_init()'s bookkeeping first (xbert calls init_weights() in its constructors: it is routed through
  post_init); get_head_mask and invert_attention_mask are gone (their 4.x code, for head_mask None);
- the BERT text encoder is made from its config (official builder.py build_bert's settings: encoder_width,
  gradient_checkpointing, fusion_layer) with random weights instead of `from_pretrained` (there are no weights to
  load); the tokenizer is transformers' BertTokenizer on a small WordPiece vocabulary: the official
  tokenization_bert.py (a pure-Python WordPiece) does not import under transformers 5, so the official step
  tokenizes faster here than it would with its own tokenizer;
- video_mm's clip_b16 always torch.loads OpenAI's weights from `your_model_path/...`: it is pointed at a file
  holding only a random positional embedding (the rest stays random; its loader is strict=False);
- newer torch rejects CUDA indices into a CPU tensor, which the official attention mask does
  (`mask[pos1, pos2] = 0`, pos2 from torch.multinomial on the GPU; umt_videomamba.py encode_teacher and
  engine_for_pretraining_videomamba.py) and the MLM masking does (`masked_indices[input_ids == pad] = False`,
  criterions.py MLMLoss.mask): those index tensors are moved to the CPU first (`.cpu()`), which is what older torch
  did implicitly; applied only when a probe shows this torch rejects them (always on a CPU run, where it is a no-op);
- timm: `_load_weights` (imported, not used) is given a placeholder where timm no longer has it, and so are the timm
  optimizers optim_factory.py imports but does not use (Nadam, ...); scipy (imported by video_mm models/utils.py for
  checkpoint interpolation only) is a placeholder where it is not installed;
- video_mm's package __init__ files are skipped (`models` and `utils` are imported as bare packages: models/__init__
  imports UMT_QA and the ViT models, not needed); a process group of one (gloo/NCCL) is made, because the official
  VTC all-gathers even on one GPU.
`--emulate-kernels` (CPU tests of this harness only; its times mean nothing) replaces the official CUDA kernels by
the official repository's own reference code: selective_scan_ref, causal_conv1d_ref, mamba_inner_ref (for
mamba_inner_fn_no_out_proj) and rms_norm_ref / layer_norm_ref for the Triton norms. `--size test` builds the same
classes at tiny widths (2 blocks of 64, a 2-layer BERT of 32, 2 frames of 64²) for that.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import inspect
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
import types
from pathlib import Path
from typing import Callable

import torch

PARTS = ("backbone", "stage1", "stage2")  # stage2_vision runs when stage2 fails (or when asked)
# Every file of the official tree a part imports (the carried tree must hold them: --check, and the tests)
REQUIRED = {
    "common": ["mamba/mamba_ssm/__init__.py", "mamba/mamba_ssm/modules/mamba_simple.py",
               "mamba/mamba_ssm/ops/selective_scan_interface.py", "mamba/mamba_ssm/ops/triton/layernorm.py",
               "mamba/mamba_ssm/ops/triton/selective_state_update.py", "mamba/setup.py",
               "causal-conv1d/causal_conv1d/__init__.py", "causal-conv1d/causal_conv1d/causal_conv1d_interface.py",
               "causal-conv1d/setup.py"],
    "backbone": ["videomamba/video_sm/models/videomamba.py"],
    "stage1": ["videomamba/video_sm/models/videomamba_pretrain.py", "videomamba/video_sm/models/clip.py",
               "videomamba/video_sm/optim_factory.py",
               "videomamba/video_sm/engines/engine_for_pretraining_videomamba.py",
               "videomamba/video_sm/exp/k400/videomamba_middle_mask/run_mask_pretrain.sh"],
    "stage2": ["videomamba/video_mm/models/umt_videomamba.py", "videomamba/video_mm/models/criterions.py",
               "videomamba/video_mm/models/mask.py", "videomamba/video_mm/models/utils.py",
               "videomamba/video_mm/models/backbones/__init__.py",
               "videomamba/video_mm/models/backbones/videomamba/__init__.py",
               "videomamba/video_mm/models/backbones/videomamba/videomamba.py",
               "videomamba/video_mm/models/backbones/videomamba/clip.py",
               "videomamba/video_mm/models/backbones/bert/__init__.py",
               "videomamba/video_mm/models/backbones/bert/builder.py",
               "videomamba/video_mm/models/backbones/bert/xbert.py",
               "videomamba/video_mm/utils/config.py", "videomamba/video_mm/utils/easydict.py",
               "videomamba/video_mm/utils/distributed.py", "videomamba/video_mm/utils/optimizer.py",
               "videomamba/video_mm/configs/data.py", "videomamba/video_mm/configs/model.py",
               "videomamba/video_mm/configs/config_bert.json",
               "videomamba/video_mm/exp_pt/videomamba_middle_5m/config.py", "videomamba/video_mm/tasks/pretrain.py"],
}
CAPTIONS = ["a man is playing a guitar on a stage", "two dogs run across a green field",
            "a woman cooks pasta in a small kitchen while talking to the camera", "cars drive along a highway at night",
            "a child rides a red bicycle down a quiet street", "waves break on a rocky beach at sunset"]
TEST_WIDTH, TEST_DEPTH = 64, 2


class OfficialTreeError(RuntimeError):
    """The official tree is missing files, or its kernels are not built / not the ones imported."""


def missing_files(root: str, parts=PARTS) -> list[str]:
    """The files `parts` import that `root` lacks."""
    wanted = REQUIRED["common"] + [f for p in parts for f in REQUIRED["stage2" if p == "stage2_vision" else p]]
    return [f for f in wanted if not os.path.isfile(os.path.join(root, f))]


# ================================================================================================ shims
class Shims:
    """What this process changed to run the official code here, each with its reason (the JSON lists them)."""

    def __init__(self):
        self.applied: list[dict] = []

    def add(self, name: str, why: str) -> None:
        self.applied.append({"shim": name, "why": why})


def placeholder(name: str) -> type:
    class Placeholder:
        def __init__(self, *a, **k):
            raise RuntimeError(f"{name} is a placeholder of bench/official_step.py (missing here); it is not used")
    Placeholder.__name__ = name
    return Placeholder


def ensure_attribute(module_name: str, attr: str, shims: Shims, why: str) -> None:
    """Gives `module_name` (imported, or a new empty module where it cannot be) a placeholder `attr` where it has
    none."""
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        module = types.ModuleType(module_name)
        sys.modules[module_name] = module
    if not hasattr(module, attr):
        setattr(module, attr, placeholder(attr))
        shims.add(f"{module_name}.{attr} placeholder", why)


def kernel_paths(root: str, emulate: bool, shims: Shims) -> None:
    """Puts the official mamba/ and causal-conv1d/ first on sys.path and imports mamba_ssm from there (its CUDA
    extensions built in place), or with `emulate` stands empty modules in for the extensions."""
    for sub in ("causal-conv1d", "mamba"):
        sys.path.insert(0, os.path.join(root, sub))
    for name in [m for m in sys.modules if m.split(".")[0] in ("mamba_ssm", "causal_conv1d")]:
        del sys.modules[name]
    if emulate:
        for ext in ("selective_scan_cuda", "causal_conv1d_cuda"):
            sys.modules[ext] = types.ModuleType(ext)
        shims.add("kernel emulation", "--emulate-kernels: the official reference code stands in for its CUDA "
                                      "kernels (CPU test of this harness)")
    try:
        import mamba_ssm  # noqa: F401
        import selective_scan_cuda  # noqa: F401
        import causal_conv1d_cuda  # noqa: F401
    except ImportError as e:
        raise OfficialTreeError(f"the official kernels do not import ({e}): build them in place first, in "
                                f"{root}/mamba and {root}/causal-conv1d: TORCH_CUDA_ARCH_LIST=9.0 "
                                "MAMBA_FORCE_BUILD=TRUE / CAUSAL_CONV1D_FORCE_BUILD=TRUE python setup.py build_ext "
                                "--inplace (bench/gpu_train_step.sh)") from None
    where = os.path.realpath(mamba_ssm.__file__)
    if not where.startswith(os.path.realpath(os.path.join(root, "mamba")) + os.sep):
        raise OfficialTreeError(f"mamba_ssm was imported from {where}, not from the official tree {root}/mamba")
    if emulate:
        emulate_kernels()


def emulate_kernels() -> None:
    """Replaces the official CUDA / Triton ops by the official repository's reference implementations."""
    from causal_conv1d import causal_conv1d_interface as cc
    from mamba_ssm.modules import mamba_simple
    from mamba_ssm.ops import selective_scan_interface as ssi
    from mamba_ssm.ops.triton import layernorm

    ssi.causal_conv1d_fn = cc.causal_conv1d_ref
    ssi.selective_scan_fn = ssi.selective_scan_ref

    def inner_no_out_proj(xz, conv1d_weight, conv1d_bias, x_proj_weight, delta_proj_weight, A, B=None, C=None,
                          D=None, delta_bias=None, B_proj_bias=None, C_proj_bias=None, delta_softplus=True):
        eye = torch.eye(xz.shape[1] // 2, dtype=xz.dtype, device=xz.device)  # mamba_inner_ref without out_proj
        return ssi.mamba_inner_ref(xz, conv1d_weight, conv1d_bias, x_proj_weight, delta_proj_weight, eye, None, A,
                                   B, C, D, delta_bias, B_proj_bias, C_proj_bias, delta_softplus).transpose(1, 2)
    mamba_simple.mamba_inner_fn_no_out_proj = inner_no_out_proj
    layernorm.rms_norm_fn = reference_rms_norm_fn
    layernorm.layer_norm_fn = reference_layer_norm_fn


def reference_rms_norm_fn(x, weight, bias, residual=None, prenorm=False, residual_in_fp32=False, eps=1e-6):
    from mamba_ssm.ops.triton.layernorm import rms_norm_ref
    out = rms_norm_ref(x, weight, bias, residual=residual, eps=eps, prenorm=prenorm, upcast=True)
    if not prenorm:
        return out
    return out[0], out[1].float() if residual_in_fp32 else out[1].to(x.dtype)


def reference_layer_norm_fn(x, weight, bias, residual=None, eps=1e-6, prenorm=False, residual_in_fp32=False,
                            is_rms_norm=False):
    from mamba_ssm.ops.triton.layernorm import layer_norm_ref
    if is_rms_norm:
        return reference_rms_norm_fn(x, weight, bias, residual, prenorm, residual_in_fp32, eps)
    out = layer_norm_ref(x, weight, bias, residual=residual, eps=eps, prenorm=prenorm, upcast=True)
    if not prenorm:
        return out
    return out[0], out[1].float() if residual_in_fp32 else out[1].to(x.dtype)


def norm_functions_into(module, emulate: bool) -> None:
    """An official model module imported the Triton norms by name: give it the reference ones when emulating."""
    if emulate:
        module.rms_norm_fn, module.layer_norm_fn = reference_rms_norm_fn, reference_layer_norm_fn


def timm_shims(shims: Shims) -> None:
    ensure_attribute("timm.models.vision_transformer", "_load_weights", shims,
                     "imported by the official VideoMamba models, used only to load .npz weights")


def load_file_module(name: str, path: str):
    """Imports the file at `path` as module `name`, registered in sys.modules first (timm's register_model looks the
    module up there)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def official_attention_mask(attn, ratio: float, indices_to_cpu: bool):
    """The official attention-guided mask, as both official loops write it (video_sm
    engine_for_pretraining_videomamba.py, video_mm umt_videomamba.py encode_teacher): per frame row of the teacher's
    [CLS] attention `attn` (BT, N), `N - int(N * ratio)` patches drawn by multinomial stay visible (0), the rest are
    masked (1); a float (BT, N) tensor on the CPU. indices_to_cpu: newer torch refuses CUDA indices into a CPU
    tensor, which older torch moved over itself."""
    rows, n = attn.shape
    visible = n - int(n * ratio)
    importance = torch.multinomial(attn, n)
    mask = torch.ones((rows, n))
    pos1 = torch.arange(rows).view(-1, 1).repeat(1, visible)
    pos2 = importance[:, :visible]
    mask[pos1, pos2.cpu() if indices_to_cpu else pos2] = 0
    return mask


def cuda_indices_into_cpu_rejected() -> bool:
    """True when this torch refuses to index a CPU tensor with CUDA indices (what the official masks do)."""
    if not torch.cuda.is_available():
        return True
    try:
        torch.ones(2, 2)[torch.arange(2), torch.arange(2, device="cuda")] = 0
        return False
    except (RuntimeError, IndexError):
        return True


def patched_function(function: Callable, replacements: list[tuple[str, str]]) -> Callable:
    """`function` compiled again from its source with each (old, new) text replaced (each must occur exactly once),
    in its own module's globals."""
    source = textwrap.dedent(inspect.getsource(function))
    for old, new in replacements:
        if source.count(old) != 1:
            raise OfficialTreeError(f"{function.__qualname__}: expected one {old!r} in its source to patch, found "
                                    f"{source.count(old)}")
        source = source.replace(old, new)
    namespace: dict = {}
    exec(compile(source, inspect.getsourcefile(function), "exec"), function.__globals__, namespace)
    return namespace[function.__name__]


def first_process_group() -> None:
    import torch.distributed as tdist
    if not tdist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        tdist.init_process_group(backend, store=tdist.HashStore(), rank=0, world_size=1)


# ================================================================================================ timing
def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(step: Callable[[int], None], batch: int, steps: int, warmup: int, profile_steps: int) -> dict:
    """Runs `step(i)` `warmup` times, then `steps` times timed (one synchronize at the end), then `profile_steps`
    under torch.profiler for the GPU's busy fraction."""
    from bench.train_step import busy_from_trace

    for i in range(warmup):
        step(i)
    synchronize()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for i in range(steps):
        step(warmup + i)
    synchronize()
    wall = time.perf_counter() - start
    out = {"batch": batch, "steps": steps, "step_ms": 1e3 * wall / steps, "clips_per_s": batch * steps / wall,
           "peak_allocated_gib": torch.cuda.max_memory_allocated() / 2 ** 30 if torch.cuda.is_available() else None,
           "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2 ** 30 if torch.cuda.is_available() else None}
    if profile_steps:
        activities = [torch.profiler.ProfilerActivity.CPU] + \
            ([torch.profiler.ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
        with torch.profiler.profile(activities=activities) as prof:
            for i in range(profile_steps):
                with torch.profiler.record_function("train_step"):
                    step(warmup + steps + i)
            synchronize()
        with tempfile.TemporaryDirectory() as folder:
            path = os.path.join(folder, "trace.json")
            prof.export_chrome_trace(path)
            busy_us, wall_us = busy_from_trace(json.loads(Path(path).read_text()))
        out["busy_fraction"] = busy_us / wall_us if busy_us is not None and wall_us else None
        out["busy_ms"] = busy_us / 1e3 / profile_steps if busy_us is not None else None
    return out


# ================================================================================================ the parts
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def autocast_bf16():
    """torch.cuda.amp.autocast(dtype=bfloat16), as the official scripts write it; off on a CPU (--emulate-kernels
    runs in fp32: the official fp32 LayerNorm of bf16 weights needs CUDA's autocast)."""
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=torch.cuda.is_available())


def run_backbone(args, shims: Shims) -> dict:
    timm_shims(shims)
    sm = os.path.join(args.official, "videomamba", "video_sm", "models")
    module = load_file_module("official_sm_videomamba", os.path.join(sm, "videomamba.py"))
    norm_functions_into(module, args.emulate_kernels)
    frames, size = (2, 64) if args.size == "test" else (args.frames, args.img_size)
    if args.size == "test":
        model = module.VisionMamba(patch_size=16, embed_dim=TEST_WIDTH, depth=TEST_DEPTH, rms_norm=True,
                                   residual_in_fp32=True, fused_add_norm=True, num_frames=frames, img_size=size)
    else:  # videomamba_middle: VisionMamba(patch_size=16, embed_dim=576, depth=32, rms_norm, residual_in_fp32, fused)
        model = module.videomamba_middle(num_frames=frames, img_size=size)
    model = model.to(device()).train()
    x = torch.randn(args.backbone_batch, 3, frames, size, size, device=device())

    def step(_: int) -> None:
        model.zero_grad(set_to_none=True)
        with autocast_bf16():
            loss = model(x).float().square().mean()
        loss.backward()
    return {"what": "video_sm videomamba_middle forward+backward (mean-square loss of the logits), bf16 autocast",
            "frames": frames, "img_size": size, **timed(step, args.backbone_batch, args.steps, args.warmup,
                                                       args.profile_steps)}


def run_stage1(args, shims: Shims) -> dict:
    timm_shims(shims)
    sm = os.path.join(args.official, "videomamba", "video_sm")
    pretrain = load_file_module("official_sm_videomamba_pretrain", os.path.join(sm, "models", "videomamba_pretrain.py"))
    norm_functions_into(pretrain, args.emulate_kernels)
    clip = load_file_module("official_sm_clip", os.path.join(sm, "models", "clip.py"))
    for module, attr in [("timm.optim.adafactor", "Adafactor"), ("timm.optim.adahessian", "Adahessian"),
                         ("timm.optim.adamp", "AdamP"), ("timm.optim.lookahead", "Lookahead"),
                         ("timm.optim.nadam", "Nadam"), ("timm.optim.nvnovograd", "NvNovoGrad"),
                         ("timm.optim.radam", "RAdam"), ("timm.optim.rmsprop_tf", "RMSpropTF"),
                         ("timm.optim.sgdp", "SGDP")]:
        ensure_attribute(module, attr, shims, "imported by video_sm/optim_factory.py, which builds adamw here")
    optim_factory = load_file_module("official_sm_optim_factory", os.path.join(sm, "optim_factory.py"))
    frames, size = (2, 64) if args.size == "test" else (args.frames, args.img_size)
    # run_videomamba_pretraining.py get_model with run_mask_pretrain.sh's arguments
    kwargs = dict(pretrained=False, drop_path_rate=0.4, use_checkpoint=False, checkpoint_num=0,
                  clip_decoder_embed_dim=576, clip_output_dim=512, clip_norm_type="l2", num_frames=frames,
                  kernel_size=1, clip_return_layer=1, clip_student_return_interval=1)
    if args.size == "test":
        kwargs.pop("pretrained")
        kwargs["clip_decoder_embed_dim"] = TEST_WIDTH
        model = pretrain.VisionMamba(patch_size=16, embed_dim=TEST_WIDTH, depth=TEST_DEPTH, rms_norm=True,
                                     residual_in_fp32=True, fused_add_norm=True, img_size=size, **kwargs)
    else:
        model = pretrain.videomamba_middle_pretrain(**kwargs)
    teacher = clip.clip_b16(pretrained=False, clip_norm_type="l2", input_resolution=size, return_attn=True,
                            clip_return_layer=1, clip_return_interval=1, clip_return_cls=True)
    dev = device()
    model.to(dev).train()
    teacher.to(dev)
    opt_args = argparse.Namespace(opt="adamw", lr=1.5e-4 * args.batch1 * 32 / 256, weight_decay=0.05, opt_eps=1e-8,
                                  opt_betas=[0.9, 0.95], momentum=0.9)
    optimizer = optim_factory.create_optimizer(opt_args, model)
    scaler = torch.amp.GradScaler("cuda", enabled=torch.cuda.is_available())
    mask_indices_to_cpu = cuda_indices_into_cpu_rejected()
    if mask_indices_to_cpu:
        shims.add("attention mask: pos2.cpu()", "this torch rejects CUDA indices into the CPU mask tensor "
                  "(engine_for_pretraining_videomamba.py `bool_masked_pos[pos1, pos2] = 0`); older torch moved them "
                  "(on a CPU run: always applied, a no-op)")
    videos = torch.randn(args.batch1, 3, frames, size, size, device=dev)
    mask_ratio, lr, wd = 0.8, opt_args.lr, 0.05
    data_type = torch.bfloat16

    def step(_: int) -> None:
        # engines/engine_for_pretraining_videomamba.py train_one_epoch, the loop body
        for param_group in optimizer.param_groups:
            param_group["lr"] = lr * param_group["lr_scale"]
            if param_group["weight_decay"] > 0:
                param_group["weight_decay"] = wd
        batch_videos = videos.to(dev, non_blocking=True)
        with torch.no_grad():
            B, C, T, H, W = batch_videos.shape
            with autocast_bf16():
                norm_clip, attn = teacher(batch_videos)
            bool_masked_pos = official_attention_mask(attn, mask_ratio, mask_indices_to_cpu).view(B, -1)
            bool_masked_pos = torch.cat((torch.zeros(B, 1), bool_masked_pos), dim=1)
            bool_masked_pos = bool_masked_pos.to(torch.bool)
            C_CLIP = norm_clip.shape[-1]
            K = norm_clip.shape[0]
            clip_bool_masked_pos = bool_masked_pos.unsqueeze(0).repeat(K, 1, 1)
            targets_clip = norm_clip[~clip_bool_masked_pos].reshape(K, B, -1, C_CLIP)
        with autocast_bf16():
            outputs_clip = model(batch_videos, bool_masked_pos)
            loss_pixel = torch.zeros(1).type_as(outputs_clip).to(outputs_clip.device)
            loss_clip = (2 - 2 * (outputs_clip * targets_clip).sum(dim=-1)).mean()  # clip_loss_type l2
        loss = loss_pixel + 1.0 * loss_clip  # clip_loss_ratio 1
        loss_value = loss.item()
        if not torch.isfinite(torch.tensor(loss_value)):
            raise RuntimeError(f"official stage 1: loss {loss_value}")
        optimizer.zero_grad()
        # utils.py NativeScalerWithGradNormCount.__call__ with clip_grad None
        parameters = model.parameters()
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        grads = [p.grad.detach() for p in parameters if p.grad is not None]
        torch.norm(torch.stack([torch.norm(g, 2.0) for g in grads]), 2.0)  # utils.get_grad_norm_
        scaler.step(optimizer)
        scaler.update()
        scaler.state_dict()
        synchronize()
        loss_pixel.item(), loss_clip.item()
    return {"what": "video_sm videomamba_middle_pretrain + clip_b16 teacher, engine_for_pretraining_videomamba.py "
                    "loop body, bf16 autocast, GradScaler", "frames": frames, "img_size": size,
            "visible_tokens": 1 + frames * ((size // 16) ** 2 - int((size // 16) ** 2 * mask_ratio)),
            **timed(step, args.batch1, args.steps, args.warmup, args.profile_steps)}


def video_mm_packages(root: str) -> None:
    """`models` and `utils` of video_mm as bare packages (their __init__ files not run), `configs` importable."""
    mm = os.path.join(root, "videomamba", "video_mm")
    for name in ("models", "utils", "configs", "tasks", "dataset"):
        for key in [k for k in sys.modules if k == name or k.startswith(name + ".")]:
            del sys.modules[key]
    for name in ("models", "utils"):
        package = types.ModuleType(name)
        package.__path__ = [os.path.join(mm, name)]
        sys.modules[name] = package
    sys.path.insert(0, mm)


def official_config(root: str):
    """exp_pt/videomamba_middle_5m/config.py read by the official utils/config.py (as Config.get_config does)."""
    from utils.config import Config, eval_dict_leaf, merge_a_into_b
    from utils.easydict import EasyDict

    path = os.path.join(root, "videomamba", "video_mm", "exp_pt", "videomamba_middle_5m", "config.py")
    return eval_dict_leaf(merge_a_into_b(Config.from_file(path), EasyDict({})))


def transformers_shims(xbert, shims: Shims) -> None:
    """What xbert.py (transformers 4.x) needs of transformers 5 (see the module docstring)."""
    import transformers.modeling_utils as mu

    if not hasattr(mu.PreTrainedModel, "get_head_mask"):
        def get_head_mask(self, head_mask, num_hidden_layers, is_attention_chunked=False):
            if head_mask is not None:
                raise NotImplementedError("head masks: not needed by the official step")
            return [None] * num_hidden_layers
        xbert.BertPreTrainedModel.get_head_mask = get_head_mask
        shims.add("xbert get_head_mask", "removed from transformers 5's PreTrainedModel; its 4.x code (no head mask)")
    if not hasattr(mu.PreTrainedModel, "invert_attention_mask"):
        def invert_attention_mask(self, encoder_attention_mask):
            mask = encoder_attention_mask
            extended = mask[:, None, :, :] if mask.dim() == 3 else mask[:, None, None, :]
            extended = extended.to(dtype=self.dtype)
            return (1.0 - extended) * torch.finfo(self.dtype).min
        xbert.BertPreTrainedModel.invert_attention_mask = invert_attention_mask
        shims.add("xbert invert_attention_mask", "removed from transformers 5's PreTrainedModel; its 4.x code")
    base_init = mu.PreTrainedModel.init_weights
    if "post_init" in inspect.getsource(base_init) or hasattr(mu.PreTrainedModel, "get_expanded_tied_weights_keys"):
        def init_weights(self):
            if self.__dict__.get("_official_step_in_post_init"):
                return base_init(self)
            self.__dict__["_official_step_in_post_init"] = True
            try:
                self.post_init()
            finally:
                del self.__dict__["_official_step_in_post_init"]
        xbert.BertPreTrainedModel.init_weights = init_weights
        shims.add("xbert init_weights -> post_init", "transformers 5's init_weights needs post_init's bookkeeping "
                  "(all_tied_weights_keys); xbert's constructors call init_weights()")


def xbert_import_shims(shims: Shims) -> None:
    import transformers.modeling_utils as mu
    import transformers.pytorch_utils as pu

    for name in ("apply_chunking_to_forward", "prune_linear_layer"):
        if not hasattr(mu, name):
            setattr(mu, name, getattr(pu, name))
            shims.add(f"transformers.modeling_utils.{name}", "moved to transformers.pytorch_utils in transformers 5")
    if not hasattr(mu, "find_pruneable_heads_and_indices"):
        def find_pruneable_heads_and_indices(heads, n_heads, head_size, already_pruned_heads):
            mask = torch.ones(n_heads, head_size)
            heads = set(heads) - already_pruned_heads
            for head in heads:
                head = head - sum(1 if h < head else 0 for h in already_pruned_heads)
                mask[head] = 0
            mask = mask.view(-1).contiguous().eq(1)
            index = torch.arange(len(mask))[mask].long()
            return heads, index
        mu.find_pruneable_heads_and_indices = find_pruneable_heads_and_indices
        shims.add("transformers.modeling_utils.find_pruneable_heads_and_indices",
                  "removed in transformers 5 (head pruning, unused here); its 4.x code")


def test_size_config(config, folder: str) -> None:
    """`--size test`: the same classes at tiny widths (2 blocks of 64, a 2-layer BERT of 32, 2 frames of 64²)."""
    ve = config.model.vision_encoder
    ve.depth, ve.embed_dim, ve.clip_decoder_embed_dim = TEST_DEPTH, TEST_WIDTH, TEST_WIDTH
    ve.num_frames, ve.img_size, ve.clip_img_size = 2, 64, 64
    with open(config.model.text_encoder.config) as f:
        bert = json.load(f)
    bert.update(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128, fusion_layer=1)
    path = os.path.join(folder, "config_bert_test.json")
    with open(path, "w") as f:
        json.dump(bert, f)
    config.model.text_encoder.config = path
    config.model.text_encoder.d_model = 32
    config.model.text_encoder.fusion_layer = 1


def video_mm_setup(args, shims: Shims):
    """What both video_mm parts need: the packages, placeholders for scipy / deepspeed where missing, the official
    config (no pretrained files), the vision backbone's norms and clip_b16's weight file; returns (config, folder)."""
    timm_shims(shims)
    root = args.official
    mm = os.path.join(root, "videomamba", "video_mm")
    video_mm_packages(root)
    shims.add("video_mm models/utils as bare packages", "their __init__ files import UMT_QA and the ViT models, "
              "not needed; the submodules import as in the official tree")
    try:
        import scipy.interpolate  # noqa: F401
    except ImportError:
        sys.modules["scipy"] = types.ModuleType("scipy")
        sys.modules["scipy.interpolate"] = types.ModuleType("scipy.interpolate")
        sys.modules["scipy"].interpolate = sys.modules["scipy.interpolate"]
        shims.add("scipy placeholder", "imported by video_mm models/utils.py for checkpoint interpolation only")
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        sys.modules["deepspeed"] = types.ModuleType("deepspeed")
        shims.add("deepspeed placeholder", "imported by video_mm utils/distributed.py, not used by the step")
    folder = tempfile.mkdtemp(prefix="official_step_")
    config = official_config(root)
    config.model.text_encoder.config = os.path.join(mm, config.model.text_encoder.config)
    config.model.vision_encoder.pretrained = None
    shims.add("no pretrained files", "vision_encoder.pretrained=None, clip_b16 and BERT with random weights")
    if args.size == "test":
        test_size_config(config, folder)
    vm_backbone = importlib.import_module("models.backbones.videomamba.videomamba")
    norm_functions_into(vm_backbone, args.emulate_kernels)
    clip = importlib.import_module("models.backbones.videomamba.clip")
    # clip_b16 always loads _MODELS["ViT-B/16"]: a file holding only a random positional embedding of the right shape
    grid = config.model.vision_encoder.clip_img_size // 16
    stub = os.path.join(folder, "vit_b16_stub.pth")
    torch.save({"positional_embedding": torch.randn(grid * grid + 1, 768) * 768 ** -0.5}, stub)
    clip._MODELS["ViT-B/16"] = stub
    shims.add("clip_b16 weights file", "it torch.loads OpenAI's weights unconditionally: a file with a random "
              "positional embedding only (its loader is strict=False; everything else stays random)")
    return config, folder


def run_stage2(args, shims: Shims) -> dict:
    config, folder = video_mm_setup(args, shims)
    xbert_import_shims(shims)
    xbert = importlib.import_module("models.backbones.bert.xbert")
    transformers_shims(xbert, shims)
    frames, size = config.model.vision_encoder.num_frames, config.model.vision_encoder.img_size
    umt = importlib.import_module("models.umt_videomamba")
    builder = importlib.import_module("models.backbones.bert.builder")

    def build_bert(model_config, pretrain, checkpoint):
        # builder.py build_bert's settings, then the model from its config (random weights) not from_pretrained
        bert_config = xbert.BertConfig.from_json_file(model_config.text_encoder.config)
        bert_config.encoder_width = model_config.vision_encoder.embed_dim
        bert_config.gradient_checkpointing = checkpoint
        bert_config.fusion_layer = model_config.text_encoder.fusion_layer
        if not model_config.multimodal.enable:
            bert_config.fusion_layer = bert_config.num_hidden_layers
        return (xbert.BertForMaskedLM if pretrain else xbert.BertModel)(bert_config)
    umt.build_bert = build_bert
    builder.build_bert = build_bert
    shims.add("build_bert without from_pretrained", "random weights: the BERT is made from its config with "
              "builder.py's settings (encoder_width, gradient_checkpointing, fusion_layer)")
    criterions = importlib.import_module("models.criterions")
    if cuda_indices_into_cpu_rejected():
        replacements = [("pos2 = importance[:, :N_vis]", "pos2 = importance[:, :N_vis].cpu()")]
        if not torch.cuda.is_available():
            replacements.append(("torch.zeros(B, 1).to(torch.bool).cuda(), mask.cuda()",
                                 "torch.zeros(B, 1).to(torch.bool).to(image.device), mask.to(image.device)"))
            shims.add("encode_teacher .cuda() -> image.device", "a CPU run only: the official code moves the mask "
                      "to the GPU by name")
        umt.UMT_VIDEOMAMBA.encode_teacher = patched_function(umt.UMT_VIDEOMAMBA.encode_teacher, replacements)
        criterions.MLMLoss.mask = patched_function(criterions.MLMLoss.mask, [
            ("masked_indices[input_ids == self.tokenizer.pad_token_id] = False",
             "masked_indices[(input_ids == self.tokenizer.pad_token_id).cpu()] = False"),
            ("masked_indices[input_ids == self.tokenizer.cls_token_id] = False",
             "masked_indices[(input_ids == self.tokenizer.cls_token_id).cpu()] = False")])
        shims.add("CUDA indices into CPU masks: .cpu()", "this torch rejects them; umt_videomamba.py encode_teacher "
                  "(pos2) and criterions.py MLMLoss.mask (input_ids == pad / cls) index CPU tensors with CUDA ones; "
                  "older torch moved the indices to the CPU (on a CPU run: always applied, a no-op)")
    tokenizer = official_tokenizer(folder)
    shims.add("tokenizer: transformers BertTokenizer", "the official tokenization_bert.py does not import under "
              "transformers 5 (_is_control moved); a Rust WordPiece tokenizer on a small vocabulary instead")
    first_process_group()
    dev = device()
    model = umt.UMT_VIDEOMAMBA(config=config, tokenizer=tokenizer, is_pretrain=True)
    model = model.to(dev)
    if config.fp16 and config.get("bf16", True) and dev.type == "cuda":  # tasks/shared_utils.py setup_model
        model = model.to(torch.bfloat16)
    optimizer_module = importlib.import_module("utils.optimizer")
    optimizer = optimizer_module.create_optimizer(config.optimizer, model)
    model.train()
    batch = args.batch2
    max_len = config.inputs.max_txt_l.video
    image = torch.randn(batch, frames, 3, size, size, device=dev)  # [B, T, C, H, W], as the official loader gives
    texts = [CAPTIONS[i % len(CAPTIONS)] for i in range(batch)]
    data_type = torch.bfloat16 if config.get("bf16", True) else torch.float16
    loss_names = ["loss_" + k for k, v in config.criterion.loss_weight.items() if v != 0]

    def step(i: int) -> None:
        # tasks/pretrain.py train(), the loop body (the bf16 branch)
        idx = torch.arange(i * batch, (i + 1) * batch)
        batch_image = image.to(dev, non_blocking=True)
        idx = idx.to(dev, non_blocking=True)
        text_input = tokenizer(texts, padding="max_length", truncation=True, max_length=max_len,
                               return_tensors="pt").to(dev)
        with torch.autocast("cuda", enabled=config.fp16 and dev.type == "cuda", dtype=data_type):
            loss_dict = model(batch_image, text_input, idx=idx)
            loss = sum(loss_dict.values())
        optimizer.zero_grad()
        loss.backward()
        if config.optimizer.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.optimizer.max_grad_norm)
        optimizer.step()
        for name in loss_names:
            value = loss_dict[name]
            value = value if isinstance(value, float) else value.item()
        model.temp.item()
    result = {"what": "video_mm UMT_VIDEOMAMBA (exp_pt/videomamba_middle_5m/config.py), tasks/pretrain.py loop body, "
                      "model in bf16 + bf16 autocast, BERT gradient checkpointing on",
              "frames": frames, "img_size": size, "gradient_checkpointing": bool(config.gradient_checkpointing),
              "bert_config_gradient_checkpointing": getattr(model.text_encoder.config, "gradient_checkpointing", None),
              "trained_params": sum(p.numel() for n, p in model.named_parameters()
                                    if p.requires_grad and not n.startswith("clip_teacher")),
              **timed(step, batch, args.steps, args.warmup, args.profile_steps)}
    return result


def run_stage2_vision(args, shims: Shims) -> dict:
    """What of stage 2 runs without the text side (when the whole model cannot): video_mm's vision encoder and its
    clip_b16 teacher, umt_videomamba.py encode_teacher's attention mask, the student forward, the UTA loss
    (criterions.py UTA_Loss l2/l2), backward and the official optimizer, model in bf16 under bf16 autocast."""
    config, _ = video_mm_setup(args, shims)
    backbones = importlib.import_module("models.backbones.videomamba")
    criterions = importlib.import_module("models.criterions")
    dev = device()
    encoder = backbones.build_videomamba(config.model).to(dev)
    teacher = backbones.build_clip(config.model).to(dev)
    if dev.type == "cuda":  # tasks/shared_utils.py setup_model under fp16 + bf16
        encoder, teacher = encoder.to(torch.bfloat16), teacher.to(torch.bfloat16)
    encoder.train()
    uta = criterions.UTA_Loss(config.criterion.uta_norm_type, config.criterion.uta_loss_type)
    optimizer = importlib.import_module("utils.optimizer").create_optimizer(config.optimizer, encoder)
    ve = config.model.vision_encoder
    frames, size, batch, ratio = ve.num_frames, ve.img_size, args.batch2, ve.video_mask_ratio
    image = torch.randn(batch, 3, frames, size, size, device=dev)  # already [B, C, T, H, W]
    to_cpu = cuda_indices_into_cpu_rejected()

    def step(_: int) -> None:
        with torch.autocast("cuda", enabled=dev.type == "cuda", dtype=torch.bfloat16):
            with torch.no_grad():  # umt_videomamba.py encode_teacher, attention mask
                clip_output, attn = teacher(image)
                mask = official_attention_mask(attn, ratio, to_cpu).view(batch, -1).to(torch.bool)
                mask = torch.cat((torch.zeros(batch, 1).to(torch.bool), mask), dim=1).to(dev)
                K, _, _, C = clip_output.shape
                clip_output = clip_output[~mask.unsqueeze(0).repeat(K, 1, 1)].reshape(K, batch, -1, C)
            _, _, student_output = encoder(image, mask, False, False)
            loss = uta.uta_loss(student_output, clip_output)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        loss.item()
    return {"what": "video_mm vision encoder + clip_b16 teacher + UTA only (no text side), bf16", "frames": frames,
            "img_size": size, **timed(step, batch, args.steps, args.warmup, args.profile_steps)}


def official_tokenizer(folder: str):
    from transformers import BertTokenizer

    from pipeline.models.text import build_tiny_bert

    vocab_dir = build_tiny_bert(CAPTIONS * 4, os.path.join(folder, "vocab"), hidden=16, layers=1, heads=1,
                                max_positions=64)
    return BertTokenizer.from_pretrained(vocab_dir)


RUNNERS = {"backbone": run_backbone, "stage1": run_stage1, "stage2": run_stage2, "stage2_vision": run_stage2_vision}


def run_part(args) -> dict:
    """One part in this process: its record, with the shims and the error when it failed."""
    shims = Shims()
    record: dict = {"part": args.part[0]}
    started = time.perf_counter()
    try:
        kernel_paths(os.path.abspath(args.official), args.emulate_kernels, shims)
        record.update(RUNNERS[args.part[0]](args, shims))
        record["ok"] = True
    except torch.OutOfMemoryError as e:
        record.update(ok=False, error=f"out of GPU memory: {str(e).splitlines()[0]}")
    except Exception as e:  # the record says what failed; the other parts still run
        import traceback
        record.update(ok=False, error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc()[-3000:])
    record["shims"] = shims.applied
    record["seconds"] = time.perf_counter() - started
    return record


def run_all(args) -> dict:
    """Each part in its own process, then one record."""
    out = {"official": os.path.abspath(args.official), "device": torch.cuda.get_device_name(0)
           if torch.cuda.is_available() else "cpu", "torch": torch.__version__, "parts": {}}
    commit = Path(args.official, "COMMIT")
    if commit.exists():
        out["commit"] = commit.read_text().strip()
    build = Path(args.official, "BUILD.json")
    if build.exists():
        out["build"] = json.loads(build.read_text())
    parts = list(args.part)
    for part in parts:
        with tempfile.TemporaryDirectory() as folder:
            path = os.path.join(folder, "part.json")
            argv = [sys.executable, "-m", "bench.official_step", "--official", args.official, "--part", part,
                    "--child-json", path, "--steps", str(args.steps), "--warmup", str(args.warmup),
                    "--profile-steps", str(args.profile_steps), "--batch1", str(args.batch1),
                    "--batch2", str(args.batch2), "--backbone-batch", str(args.backbone_batch),
                    "--frames", str(args.frames), "--img-size", str(args.img_size), "--size", args.size]
            if args.emulate_kernels:
                argv.append("--emulate-kernels")
            started = time.perf_counter()
            try:
                proc = subprocess.run(argv, capture_output=True, text=True, timeout=args.part_timeout)
                failure = f"the part's process exited {proc.returncode} without a record"
                stderr = proc.stderr
            except subprocess.TimeoutExpired as e:
                failure = f"the part's process ran past --part-timeout {args.part_timeout:.0f} s"
                stderr = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
            if os.path.exists(path):
                record = json.loads(Path(path).read_text())
            else:
                record = {"part": part, "ok": False, "error": failure, "stderr": stderr[-3000:]}
            record["process_seconds"] = time.perf_counter() - started
            out["parts"][part] = record
            if args.json:  # after every part: a caller's time limit cannot take the finished parts with it
                Path(args.json).parent.mkdir(parents=True, exist_ok=True)
                Path(args.json).write_text(json.dumps(out, indent=1))
            status = f"{record.get('clips_per_s', 0):.1f} clips/s" if record.get("ok") else record.get("error")
            print(f"official {part}: {status}", file=sys.stderr, flush=True)
            if part == "stage2" and not record.get("ok") and "stage2_vision" not in parts:
                parts.append("stage2_vision")  # time what of stage 2 can run
    return out


def table(record: dict) -> str:
    lines = [f"official code on {record['device']}" + (f" ({record['commit'][:12]})" if record.get("commit") else ""),
             "| part | batch | ms/step | clips/s | peak GiB | GPU busy | status |", "|---|---:|---:|---:|---:|---:|---|"]
    for name, r in record["parts"].items():
        if r.get("ok"):
            busy = r.get("busy_fraction")
            lines.append(f"| {name} | {r['batch']} | {r['step_ms']:.1f} | {r['clips_per_s']:.1f} | "
                         f"{r['peak_allocated_gib'] if r['peak_allocated_gib'] is None else round(r['peak_allocated_gib'], 1)}"
                         f" | {'-' if busy is None else f'{busy:.1%}'} | ok |")
        else:
            lines.append(f"| {name} | - | - | - | - | - | failed: {r.get('error')} |")
    shims = {s["shim"]: s["why"] for r in record["parts"].values() for s in r.get("shims", [])}
    lines += ["", "shims:"] + [f"- {k}: {v}" for k, v in shims.items()]
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--official", required=True, help="the official source tree (kernels built in place)")
    parser.add_argument("--part", nargs="+", choices=list(RUNNERS), default=list(PARTS))
    parser.add_argument("--batch1", type=int, default=64, help="stage 1 batch (run_mask_pretrain.sh --batch_size)")
    parser.add_argument("--batch2", type=int, default=128, help="stage 2 batch (exp_pt config.py batch_size)")
    parser.add_argument("--backbone-batch", type=int, default=4)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--profile-steps", type=int, default=3)
    parser.add_argument("--size", choices=["middle", "test"], default="middle",
                        help="test: the same classes at tiny widths (with --emulate-kernels, CPU tests)")
    parser.add_argument("--emulate-kernels", action="store_true",
                        help="the official reference code instead of its CUDA kernels (CPU tests; times mean nothing)")
    parser.add_argument("--part-timeout", type=float, default=900.0, help="seconds per part's process")
    parser.add_argument("--check", action="store_true", help="only check that the tree holds every imported file")
    parser.add_argument("--json", default=None)
    parser.add_argument("--child-json", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    missing = missing_files(args.official, args.part)
    if missing:
        print(f"{args.official}: the official tree lacks {missing}", file=sys.stderr)
        return 2
    if args.check:
        print(f"{args.official}: every file the parts {', '.join(args.part)} import is there")
        return 0
    if args.child_json:
        if not torch.cuda.is_available():
            torch.set_num_threads(1)
        Path(args.child_json).write_text(json.dumps(run_part(args), indent=1))
        return 0
    record = run_all(args)
    print(table(record))
    return 0 if all(r.get("ok") for r in record["parts"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
