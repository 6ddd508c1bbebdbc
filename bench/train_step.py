"""Stage 1 and stage 2 training steps at the paper's setting on one GPU: clips/s, where the step's time goes, GPU busy
fraction, peak memory, model FLOPs utilization, the loader's ceiling, and a projection to many GPUs (issue 23).

    python -m bench.train_step --stage 1|2 [--data synthetic dali cpu hybrid]
                               [--shards DIR/index.json | --make-shards DIR]
                               [--batch B] [--steps N] [--split-steps N] [--profile-steps N] [--no-cuda-graphs]
                               [--ops-steps N] [--images | --alternate] [--loader-ceiling] [--json OUT.json] [--quick]
    python -m bench.train_step --summary OUT_DIR      # the tables of every JSON in OUT_DIR (ours and the official's)

What runs is the project's own step: the stage config is the VideoMamba-M recipe's (configs/recipes/
videomamba_m_5m.yaml: `stage1` / `stage2` with their overrides, each cited from the official configs there), the
model, frozen teacher and objective come from the stages' builders (`pipeline.stages.align.align_parts`,
`pipeline.stages.video_text.video_text_parts`), and each step is `Trainer.step` (DeepSpeed, bf16, ZeRO stage of the
stage YAML, the backbone's blocks as CUDA graphs unless --no-cuda-graphs) on batches of `--data`:
- `synthetic`: one batch of random clips already on the GPU (the step alone, no loader); with `--images` (stage 2)
  a batch of 1-frame images, as `data.mix=batch mask.image_ratio=0.5` gives them (the official image batches: one
  frame, no temporal embedding, half the patches masked), to time what an image batch costs; with `--alternate`
  image and clip batches take turns, one kind a step as `data.mix=batch` runs them (each kind replays CUDA graphs of
  its own: `train.cuda_graph_shapes`), FLOPs per sample the mean of the two;
- `dali` / `cpu` / `hybrid`: the real loader (`pipeline.data.build_loader`) over real shards, decoded by DALI on
  the GPU, by PyAV in the DataLoader's workers, or by both (`data.decoder=hybrid`: the workers decode the batches
  DALI has no room for; the record says how many samples each decoded).
Random weights throughout: the teacher is the recipe's open_clip ViT-B-16-quickgelu created without pretrained
weights, the text encoder a BERT-base-shaped random BERT (12 layers of 768, 30,522 ids, written once to a temporary
folder). `--make-shards DIR` writes the shards first with the project's own machinery (`shards.synth.write_corpus`:
the synthetic corpus, H.264 mp4 of `--source-size`² px; then `shards.index.plan_shards` / `shards.writer.write_shard`,
what `videomamba shard` runs per task).

The paper's setting (from the recipe, which cites the official files):
- stage 1 (video_sm/exp/k400/videomamba_middle_mask/run_mask_pretrain.sh): VideoMamba-M (32 blocks of 576),
  8 frames of 224², batch 64 per GPU, attention-guided mask 0.8 from a CLIP-ViT-B/16 teacher, MSE of normalized
  features, AdamW betas (0.9, 0.95), weight decay 0.05, no clipping, drop path 0.4, bf16;
- stage 2 (video_mm/exp_pt/videomamba_middle_5m/config.py): the same backbone with drop path 0.25, BERT-base with
  fusion from layer 9, 32 text tokens, batch 128 per GPU, VTC + VTM (hard negatives) + MLM (0.5) + UTA (weights
  1, 1, 1, 1), AdamW betas (0.9, 0.999), weight decay 0.05, no clipping, bf16.
A batch that does not fit is halved until it does; the JSON and the table say which batch ran.

Measurements (each a field of the JSON, per run):
- clips/s and step time: `--steps` steps back to back after `--warmup` steps, one CUDA synchronize at the end (what
  training does; the step itself synchronizes where the trainer reads the loss). With a real loader the warm-up adds
  the loader's in-flight batches (DataLoader workers x 2 with the CPU decoder, DALI's pipelines + 1), so that the
  timed steps get batches made while they run, not ones prefetched during the warm-up;
- data wait: the host's time inside the loader's `next()` (the loader boundary), per step;
- the split (`--split-steps` more steps, `split` runs): a synchronize at every boundary between the parts, so each
  part's time is its own: data wait, teacher forward (mask drawn from its attention included), student forward,
  text side forward (BERT text layers, fusion layers, MLM head), backward of the text side and the heads (until the
  gradient of the video tokens is complete), backward of the student, optimizer step (DeepSpeed's), other (moving
  the batch, tokenizing, the losses, the loss all-reduce). The parts sum to the step by construction;
- GPU busy: under torch.profiler (`--profile-steps` steps), the union of the intervals of every kernel, memcpy and
  memset on the GPU over the wall time from the first step's start to the end of the last (synchronized), with the
  top kernels by time (`bench.step_profile.kernel_table`);
- host ops (`--ops-steps` more steps, an `ops` run): the aten ops the host dispatches per step and part (the split's
  parts), counted by a TorchDispatchMode below autograd. On a GPU each is at least one kernel launch, so where a part
  is launch-bound its time is about ops x the cost of a launch (8-10 us here); a CUDA graph's replay is not an op,
  so the graphed blocks count only their inputs' copies, and Triton kernels launched directly are not counted. On a
  CPU the count is the same for every part that runs the same aten ops on both (the teacher, the text side, the
  losses, DeepSpeed's optimizer step), which makes launch levers measurable without a GPU; the student's parts
  differ (the CPU runs the chunked PyTorch scan, eagerly);
- peak memory: torch.cuda.max_memory_allocated (and reserved) over the timed steps;
- MFU: model FLOPs per clip (below) x clips/s / the H200's dense bf16 tensor-core peak, 989 TFLOP/s (NVIDIA H200
  SXM datasheet: 1,979 TFLOP/s "with sparsity", half of it dense);
- the loader's ceiling (`--loader-ceiling`): clips/s of the same loader with no model, after its in-flight batches,
  a synchronize at the end (`loader_ceilings`), against the synthetic step's clips/s.

FLOPs (multiply-add = 2 FLOPs; per clip; forward unless said):
- Backbone, VideoMamba-M: depth Lb = 32, width D = 576, inner width E = 2D = 1152, state N = 16, dt rank
  R = ceil(D/16) = 36, conv width K = 4; it runs on n = 1 + T(hw - m) tokens, where T = 8 frames, hw = 196 patches a
  frame and m = int(0.8 hw) = 156 of them masked (the official count; this bench sets mask.ratio to 156/196 so that
  the project's rounding masks the same number): n = 321. Per block and token: in_proj D -> 2E: 4DE = 2.65 M; per
  direction (two: bidirectional Mamba, each with its own conv, x_proj and dt_proj): conv 2KE, x_proj E -> R + 2N:
  2E(R + 2N), dt_proj R -> E: 2RE, the selective scan 6EN (per state: the discretized decay's product, delta*B*x,
  the state update's multiply-add, C*h's multiply-add): 0.36 M; out_proj E -> D: 2ED = 1.33 M. In all 4.70 MFLOP a
  block and token, of which the two scans are 0.22 (4.7%, not tensor-core work): Lb x n x 4.70 M = 48.3 GFLOP. Patch
  embedding runs on all T*hw patches before masking: 2 x (3 x 16²) x D per patch = 1.39 GFLOP. The alignment head
  (LayerNorm + Linear D -> 512, the teacher's width) on the n tokens: 0.19 GFLOP. Student forward: 49.9 GFLOP.
- Teacher, CLIP-ViT-B/16 (frozen, forward only), per frame: L = hw + 1 = 197 tokens, width W = 768, 12 layers;
  per layer 24 L W² (qkv 6, proj 2, MLP 16) + 4 L² W (QK^T and AV): 2.91 GFLOP; 12 layers 34.9 GFLOP, patch
  embedding 0.12 and projection 768 -> 512 0.15: 35.3 GFLOP a frame, 282 GFLOP a clip.
- Text side (stage 2), BERT-base: width H = 768, FFN 4H, 12 layers, text-only layers 0..8, fusion layers 9..11,
  L_t = 32 tokens (padded; every implementation computes the padding), video memory M = n - 1 = 320 tokens of width
  D. A text-only layer: 24 L_t H² + 4 L_t² H = 0.46 GFLOP; a fusion layer adds cross-attention: queries and output
  4 L_t H², keys and values from the video 4 M D H, scores and sum 4 L_t M H: 0.46 + 0.67 = 1.13 GFLOP. Per sample:
  two text-only passes (the text itself and the MLM's masked text: 2 x 9 x 0.46 = 8.2 GFLOP), four fusion passes
  (the matching pair and its two hard negatives, and the MLM: 4 x 3 x 1.13 = 13.5 GFLOP), the MLM head on the L_t
  positions (the official computes all of them: 2 L_t (H² + H V), V = 30,522: 1.54 GFLOP): 23.3 GFLOP.
- Forward+backward = 3 x forward for trained parts (the backward's two matmuls per forward matmul), 1 x for the
  frozen teacher; recomputation (the official BERT's gradient checkpointing) is not model FLOPs and is not counted.
  Per clip: stage 1 = 282 + 3 x 49.9 = 432 GFLOP; stage 2 = 432 + 3 x 23.3 = 502 GFLOP. The teacher's forward is
  two thirds of stage 1's FLOPs and still over half of stage 2's. Both implementations are charged the same model
  FLOPs (ours computes the MLM head at the masked positions only, about half of them).
The numbers above are for the paper's shapes; the script computes them from the built model's actual dimensions and
mask (`--quick` runs tiny shapes). With `--images` the same formulas run on one frame: the teacher's forward of one
frame, the backbone on n = 1 + (hw - int(0.5 hw)) = 99 tokens, the text side's cross-attention on M = 98.

Multi-GPU projection (`projection` below; issue 23, item 4): data parallel with ZeRO-1/2 over NCCL, weak scaling
(the per-GPU batch fixed). Per step each GPU reduce-scatters its bf16 gradients and all-gathers the updated bf16
parameters (DeepSpeed ZeRO-1 and -2 move the same bytes; ZeRO-2 also partitions the gradients' memory): 2 (g-1)/g x
2 bytes x P over the ring, not overlapped with the backward (the stage configs leave DeepSpeed's overlap_comm off);
stage 2 adds the contrastive loss's all-gather of the video and text embeddings (2 x 512 fp32 per clip) and its
backward, and a few latency-bound all-reduces (the loss, the end-of-data check). Assumed bus bandwidths (NCCL's
"busbw"): within an 8-GPU H200 node (NVLink 4 / NVSwitch) 360 GB/s; across nodes one 400 Gb/s InfiniBand NIC per
GPU, about 45 GB/s achieved; 20 us per small collective within a node, 50 us across nodes. Projected step time =
measured step + communication; efficiency = measured / projected. What it leaves out: stragglers and jitter, the
input pipeline's storage bandwidth (clips/s x bytes per clip x GPUs), and the optimization side of a global batch of
g x 64 or g x 128 clips (the official runs used 32 x 64 and 16 x 128).
"""
from __future__ import annotations

import argparse
import bisect
import contextlib
import dataclasses
import gc
import gzip
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "configs" / "recipes" / "videomamba_m_5m.yaml"
H200_BF16_DENSE_FLOPS = 989e12  # NVIDIA H200 SXM dense bf16 tensor-core peak (datasheet: 1,979 with sparsity)
CAPTIONS = ["a man is playing a guitar on a stage", "two dogs run across a green field",
            "a woman cooks pasta in a small kitchen while talking to the camera", "cars drive along a highway at night",
            "a child rides a red bicycle down a quiet street", "waves break on a rocky beach at sunset"]

# Assumed interconnect (see the module docstring): NCCL bus bandwidth in bytes/s and latency per small collective.
INTRA_NODE_BUSBW = 360e9
INTER_NODE_BUSBW = 45e9
INTRA_NODE_LATENCY_S = 20e-6
INTER_NODE_LATENCY_S = 50e-6
GPUS_PER_NODE = 8
PROJECTED_GPUS = (8, 64, 256)


# ================================================================================================ configuration
def stage_config(stage: int, overrides: list[str]):
    """The stage config of the VideoMamba-M recipe's stage 1 or stage 2 (its YAML and the recipe's overrides, which
    cite the official configs) with `overrides` last."""
    from pipeline.config import AlignStageConfig, VideoTextStageConfig, load_config
    from pipeline.orchestrate import recipe_file
    from pipeline.recipe import RecipeConfig

    recipe = load_config(RecipeConfig, str(RECIPE))
    spec = recipe.stage1 if stage == 1 else recipe.stage2
    schema = AlignStageConfig if stage == 1 else VideoTextStageConfig
    wired = [f"teacher.model={recipe.teacher.model}"] if recipe.teacher.model else []  # as orchestrate wires it
    return load_config(schema, recipe_file(spec.config, str(RECIPE.parent)), wired + list(spec.overrides) + overrides)


def with_official_mask_count(cfg) -> str:
    """Sets mask.ratio so that the project's count of masked patches per frame, round(ratio * hw), is the official
    int(ratio * hw) (156 of 196 at 0.8, where the project rounds to 157: docs/FIDELITY.md), so both codes run the
    backbone on the same tokens; returns a note saying so."""
    hw = (cfg.data.img_size // cfg.model.patch_size) ** 2
    official = math.floor(cfg.mask.ratio * hw)
    before = cfg.mask.ratio
    cfg.mask.ratio = official / hw
    return (f"mask.ratio {before} -> {cfg.mask.ratio:.6f}: {official} of {hw} patches masked per frame, the official "
            f"int(ratio * hw) (the project rounds: {round(before * hw)})")


def quick_overrides(stage: int) -> list[str]:
    """Tiny shapes for a CPU run of every code path (`--quick`): 2 blocks of 64, 2 frames of 64², a 4-block teacher of
    128, a 2-layer BERT of 32 with fusion from layer 1, batch 2, the pure-PyTorch scan."""
    out = ["model.depth=2", "model.embed_dim=64", "model.scan_backend=torch", "data.num_frames=2", "data.img_size=64",
           "teacher.img_size=64", "train.batch_size=2", "data.num_workers=1", "data.shuffle_buffer=4"]
    return out + (["text.fusion_layer=1"] if stage == 2 else [])


def bench_overrides(args, out_dir: str, bert_dir: Optional[str]) -> list[str]:
    """The bench's wiring on top of the recipe: data, run folder, no logs, skip (not stop at) a non-finite step,
    CUDA graphs, the batch, precision (fp32 on a CPU)."""
    cuda = torch.cuda.is_available()
    out = [f"train.out={out_dir}", "train.progress=false", "train.tensorboard=false", "train.nan_policy=skip",
           f"train.cuda_graphs={str(cuda and not args.no_cuda_graphs).lower()}"]
    if args.shards:
        out.append(f"data.train={args.shards}")
    if args.workers is not None:
        out.append(f"data.num_workers={args.workers}")
    if not cuda:  # the recipes' fp32 gradient accumulation is a bf16 option
        out += ["train.precision=fp32", "train.grad_accum_dtype=null"]
    if bert_dir:
        out.append(f"text.pretrained={bert_dir}")
    if args.quick:
        out += quick_overrides(args.stage)
    if args.batch:
        out.append(f"train.batch_size={args.batch}")
    if args.images or args.alternate:
        out += ["data.mix=batch", "mask.image_ratio=0.5"]
    return out + list(args.override)


# ================================================================================================ model parts
def random_teacher(cfg, quick: bool, folder: str):
    """The recipe's teacher architecture (open_clip, `teacher.model`) with random weights; `quick`: the demo's tiny
    CLIP config. Random weights time the same work; `build_teacher` refuses them for training."""
    import open_clip

    from pipeline.models.teacher import ClipTeacher
    from pipeline.stages.teacher_warmup import TINY_CLIP_NAME, tiny_clip_config

    name = cfg.teacher.model
    if quick:
        name = TINY_CLIP_NAME
        path = os.path.join(folder, f"{name}.json")
        with open(path, "w") as f:
            json.dump(tiny_clip_config(cfg.teacher.img_size), f)
        open_clip.add_model_config(path)
    model = open_clip.create_model(name, force_image_size=cfg.teacher.img_size)
    return ClipTeacher(model.visual, name, cfg.teacher.ln_post)


def random_bert(folder: str, quick: bool) -> str:
    """A BERT in the transformers layout with random weights: BERT-base's shape (12 x 768, 12 heads, 512 positions,
    30,522 ids; its WordPiece vocabulary made from a few captions), or a 2-layer BERT of 32 with `quick`."""
    from pipeline.models.text import build_tiny_bert

    if quick:
        return build_tiny_bert(CAPTIONS * 4, folder, hidden=32, layers=2, heads=2, max_positions=64)
    return build_tiny_bert(CAPTIONS * 8, folder, hidden=768, layers=12, heads=12, max_positions=512,
                           embedding_rows=30522)


def built_parts(stage: int, cfg, quick: bool, folder: str):
    """Joins the process group, seeds and builds the stage's parts as its training function does (`begin_run`, then
    the stage's builder), with a random teacher."""
    from pipeline.stages.align import align_parts
    from pipeline.stages.base import begin_run
    from pipeline.stages.video_text import video_text_parts

    teacher = random_teacher(cfg, quick, folder)
    begin_run(cfg)
    if stage == 1:
        return align_parts(cfg, teacher)
    return video_text_parts(cfg, teacher if cfg.loss.align > 0 else None)


# ================================================================================================ FLOPs
@dataclasses.dataclass
class StepFlops:
    """Model FLOPs per clip, by part (see the module docstring)."""

    teacher_fwd: float
    student_fwd: float  # backbone + its heads
    text_fwd: float
    tokens: float  # the backbone's tokens per clip ([cls] + visible patches; --alternate: the mean of both kinds)

    @property
    def per_clip(self) -> float:
        """Forward+backward of a step, per clip: the frozen teacher once, the trained parts three times."""
        return self.teacher_fwd + 3.0 * (self.student_fwd + self.text_fwd)

    def as_dict(self) -> dict:
        return {"teacher_fwd": self.teacher_fwd, "student_fwd": self.student_fwd, "text_fwd": self.text_fwd,
                "student_fwd_bwd": 3 * self.student_fwd, "text_fwd_bwd": 3 * self.text_fwd,
                "per_clip_fwd_bwd": self.per_clip, "backbone_tokens": self.tokens}


def mamba_block_flops(width: int, d_inner: int, d_state: int, dt_rank: int, d_conv: int) -> float:
    """FLOPs of one bidirectional Mamba block per token (in_proj, two directions of conv, x_proj, dt_proj and the
    selective scan, out_proj)."""
    direction = 2 * d_conv * d_inner + 2 * d_inner * (dt_rank + 2 * d_state) + 2 * dt_rank * d_inner \
        + 6 * d_inner * d_state
    return 4 * width * d_inner + 2 * direction + 2 * d_inner * width


def vit_layer_flops(tokens: int, width: int) -> float:
    """FLOPs of one pre-norm ViT / BERT layer (MLP 4x) on `tokens` tokens: 24 L W² + 4 L² W."""
    return 24 * tokens * width ** 2 + 4 * tokens ** 2 * width


def backbone_flops(backbone, grid: tuple[int, int, int], tokens: int, head_out: int) -> float:
    """Forward FLOPs of the backbone on `tokens` tokens of a clip whose patch grid is `grid` (all of it embedded),
    plus an alignment head (LayerNorm + Linear width -> head_out) on them (head_out 0: none)."""
    mixer = backbone.layers[0].mixer
    width = backbone.embed_dim
    t, h, w = grid
    patch = backbone.patch_embed.proj.weight[0].numel()  # 3 x tubelet x p x p
    block = mamba_block_flops(width, mixer.d_inner, mixer.d_state, mixer.dt_rank, mixer.d_conv)
    return len(backbone.layers) * tokens * block + 2 * patch * width * t * h * w + 2 * tokens * width * head_out


def teacher_flops(teacher, frames: int) -> float:
    """Forward FLOPs of the teacher over the clip's frames (every block, patch embedding, projection)."""
    visual = teacher.visual
    width = visual.transformer.width
    grid = visual.grid_size[0] * visual.grid_size[1]
    tokens = grid + 1
    patch = visual.conv1.weight[0].numel()
    layers = len(visual.transformer.resblocks)
    return frames * (layers * vit_layer_flops(tokens, width) + 2 * patch * width * grid
                     + 2 * tokens * width * teacher.width)


def text_flops(text_encoder, text_len: int, memory: int, memory_width: int) -> float:
    """Forward FLOPs of stage 2's text side per sample: two text-only passes, four fusion passes (the matching pair,
    two hard negatives, the MLM), the MLM head on every position (see the module docstring)."""
    config = text_encoder.config
    hidden, layers, vocab = config.hidden_size, config.num_hidden_layers, config.vocab_size
    fusion = layers - text_encoder.fusion_layer
    text_layer = vit_layer_flops(text_len, hidden)
    cross = 4 * text_len * hidden ** 2 + 4 * memory * memory_width * hidden + 4 * text_len * memory * hidden
    return 2 * text_encoder.fusion_layer * text_layer + 4 * fusion * (text_layer + cross) \
        + 2 * text_len * (hidden ** 2 + hidden * vocab)


def _head_width(head) -> int:
    """The output width of the alignment head's projection (the official clip_decoder's or the norm-linear one's),
    0 without a head."""
    linears = [m for m in head.modules() if isinstance(m, torch.nn.Linear)] if head is not None else []
    return linears[-1].out_features if linears else 0


def mean_flops(a: StepFlops, b: StepFlops) -> StepFlops:
    """Per sample of steps that take turns between a batch like `a` and one like `b` (--alternate)."""
    return StepFlops((a.teacher_fwd + b.teacher_fwd) / 2, (a.student_fwd + b.student_fwd) / 2,
                     (a.text_fwd + b.text_fwd) / 2, (a.tokens + b.tokens) / 2)


def step_flops(stage: int, cfg, parts, images: bool = False) -> StepFlops:
    """Model FLOPs per clip of the stage's step; `images`: per 1-frame image at mask.image_ratio (--images)."""
    from pipeline.masking import masked_count

    model = parts.model
    backbone = model.backbone
    grid = (1, *backbone.patch_grid[1:]) if images else backbone.patch_grid
    ratio = cfg.mask.image_ratio if images and cfg.mask.image_ratio is not None else cfg.mask.ratio
    masked = masked_count(cfg.mask.kind, ratio, grid) if ratio > 0 else 0
    tokens = 1 + grid[0] * grid[1] * grid[2] - masked
    teacher = parts.teacher
    frames = 1 if images else cfg.data.num_frames
    head = _head_width(getattr(model, "align_head", None))
    student = backbone_flops(backbone, grid, tokens, head)
    text = text_flops(model.text_encoder, cfg.text.max_len, tokens - 1, backbone.embed_dim) if stage == 2 else 0.0
    return StepFlops(teacher_flops(teacher, frames) if teacher is not None else 0.0, student, text, tokens)


# ================================================================================================ data
class SyntheticBatches:
    """The same batch of random clips (already on the device, float32 like the loader's) with captions and fresh keys
    every step: the step without a loader. Has the state methods the Trainer asks of its data."""

    def __init__(self, batch: int, frames: int, size: int, device: torch.device, images: bool = False,
                 alternate: bool = False):
        g = torch.Generator(device="cpu").manual_seed(0)
        self.video = torch.randn(batch, 3, frames, size, size, generator=g).to(device)
        self.images = images  # a whole batch of images (the loader's "images_only", data.mix=batch)
        # alternate: every other batch is one of 1-frame images (data.mix=batch's two kinds, one a step)
        self.image = torch.randn(batch, 3, 1, size, size, generator=g).to(device) if alternate else None
        self.text = [CAPTIONS[i % len(CAPTIONS)] for i in range(batch)]
        self.count = 0

    def __iter__(self) -> Iterator[dict]:
        while True:
            self.count += 1
            image_turn = self.image is not None and self.count % 2 == 0
            yield {"video": self.image if image_turn else self.video, "text": list(self.text),
                   "images_only": self.images or image_turn,
                   "key": [f"synthetic-{self.count}-{i}" for i in range(len(self.text))]}

    def state_dict(self) -> dict:
        return {"count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.count = state["count"]


def loader_data(cfg, decoder: str, cpu_workers: Optional[int]):
    """The stage's data config with `decoder`, and `cpu_workers` DataLoader workers where they decode (cpu, hybrid)."""
    workers = cpu_workers if decoder in ("cpu", "hybrid") and cpu_workers is not None else cfg.data.num_workers
    return dataclasses.replace(cfg.data, decoder=decoder, num_workers=workers)


def real_loader(cfg, decoder: str, cpu_workers: Optional[int]):
    from pipeline.data import build_loader

    data = loader_data(cfg, decoder, cpu_workers)
    return build_loader(data, cfg.train.batch_size, rank=0, world_size=1, seed=cfg.train.seed, train=True)


def make_shards(folder: str, videos: int, size: int, frames: int, fps: int, per_shard: int = 16,
                codec: str = "h264", keyint: Optional[int] = None) -> str:
    """Writes the synthetic corpus (mp4 of `codec`, size² px) and its WebDataset shards as `videomamba shard` does
    (each shard's task in this process, one after another: no Ray on the GPU machine); returns the index.json path.
    VP9 is for DALI's CPU backend in tests (it has no H.264). `keyint`: the shards' clips are re-encoded with a key
    frame every that many frames (`videomamba shard --keyint`), for the CPU decoder's restarts."""
    from shards.index import build_index, plan_shards
    from shards.manifest import read_manifest
    from shards.media import ProcessOptions
    from shards.synth import write_corpus
    from shards.writer import ShardOptions, write_shard

    corpus, out = os.path.join(folder, "corpus"), os.path.join(folder, "shards")
    write_corpus(corpus, videos=videos, images=0, seed=0, codec=codec, size=size, frames=frames, fps=fps,
                 eval_videos=1, progress=False)
    manifest = read_manifest(os.path.join(corpus, "videos.jsonl"))
    process = ProcessOptions(keyint=keyint)
    plans = plan_shards(manifest.rows, per_shard, "shard", process)
    os.makedirs(out, exist_ok=True)
    results = {p.index: write_shard(p, ShardOptions(out, process=process)) for p in plans}
    index = os.path.join(out, "index.json")
    with open(index, "w") as f:
        json.dump(build_index(manifest.url, per_shard, plans, results), f)
    source = {"kind": f"the project's synthetic corpus (shards.synth), {codec} mp4", "videos": videos, "size": size,
              "frames": frames, "fps": fps, "keyint": keyint, "samples_per_shard": per_shard,
              "bytes_per_clip": sum(os.path.getsize(r.media) for r in manifest.rows) / max(len(manifest.rows), 1)}
    with open(os.path.join(out, "source.json"), "w") as f:
        json.dump(source, f)
    return index


# ================================================================================================ timing
def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class PartTimer:
    """Attributes wall time to nested regions: time goes to the innermost open region ("other" when none), and, when
    `split`, every boundary synchronizes the GPU first, so a region's time is its own work. Unsplit, only `data` (the
    host's wait for the next batch) is kept. With `annotate` (the profiled steps), every change of the innermost
    region is also marked in the profiler's trace (a `part=NAME` range of no length, opened and closed where the change
    happens, in whichever thread: autograd's backward runs in its own), so `idle_by_part` can tell where the host was
    when the GPU ran dry; nothing is synchronized."""

    def __init__(self, split: bool, annotate: bool = False):
        self.split, self.annotate = split, annotate
        self.totals: dict[str, float] = defaultdict(float)
        self.stack = ["other"]
        self.last = time.perf_counter()

    def _mark(self) -> None:
        if self.annotate:
            with torch.profiler.record_function(PART_MARK + self.stack[-1]):
                pass

    def _charge(self) -> None:
        if self.split:
            synchronize()
        now = time.perf_counter()
        self.totals[self.stack[-1]] += now - self.last
        self.last = now

    def enter(self, name: str) -> None:
        if self.split or self.annotate or name == "data":
            self._charge()
            self.stack.append(name)
            self._mark()

    def leave(self, name: str) -> None:
        if self.stack[-1] == name:
            self._charge()
            self.stack.pop()
            self._mark()

    def switch(self, old: str, new: str) -> None:
        if self.stack[-1] == old:
            self._charge()
            self.stack[-1] = new
            self._mark()

    @contextlib.contextmanager
    def region(self, name: str):
        self.enter(name)
        try:
            yield
        finally:
            self.leave(name)

    def reset(self) -> None:
        self.totals.clear()
        self.stack = ["other"]
        self.last = time.perf_counter()


class TimedIterator:
    """The loader boundary: the host's time inside `next()` is the step's data wait."""

    def __init__(self, iterator: Iterator, timer: PartTimer):
        self.iterator, self.timer = iterator, timer

    def __iter__(self):
        return self

    def __next__(self):
        with self.timer.region("data"):
            return next(self.iterator)


class OpCounter(TorchDispatchMode):
    """Counts the aten ops dispatched while it is active, each charged to `timer`'s innermost open region (the split's
    parts; the mode is thread-local state that autograd carries into its backward)."""

    def __init__(self, timer: PartTimer):
        super().__init__()
        self.timer = timer
        self.counts: dict[str, int] = defaultdict(int)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[self.timer.stack[-1]] += 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def instrumented(stage: int, parts, trainer, timer: PartTimer):
    """Wraps the parts of one step in `timer` regions (teacher, student forward, text forward, the two backward
    halves, optimizer), in place, and restores them afterwards."""
    engine = trainer.engine
    model = parts.model
    restore: list[Callable[[], None]] = []

    def wrap(owner, attr: str, region: str):
        original = getattr(owner, attr)

        def wrapped(*a, **k):
            with timer.region(region):
                return original(*a, **k)
        setattr(owner, attr, wrapped)
        restore.append(lambda: delattr(owner, attr) if attr in vars(owner) else None)

    alignment = parts.objective if stage == 1 else parts.objective.alignment
    if alignment is not None:
        wrap(alignment, "teacher_targets", "teacher")
    if stage == 2:
        for method in ("encode", "fuse", "mlm_logits"):
            wrap(model.text_encoder, method, "text_fwd")
    first_bwd = "text_bwd" if stage == 2 else "student_bwd"
    wrap(engine, "step", "optimizer")

    original_backward = engine.backward

    def backward(loss, *a, **k):
        with timer.region(first_bwd):
            result = original_backward(loss, *a, **k)
        timer.leave("student_bwd")
        return result
    engine.backward = backward
    restore.append(lambda: delattr(engine, "backward"))

    def video_tokens_ready(grad):
        timer.switch("text_bwd", "student_bwd")
        return grad

    def pre_hook(module, inputs):
        timer.enter("student_fwd")

    def post_hook(module, inputs, output):
        tokens = getattr(output, "video_tokens", None)
        if stage == 2 and tokens is not None and tokens.requires_grad:
            tokens.register_hook(video_tokens_ready)
        timer.leave("student_fwd")
    handles = [model.register_forward_pre_hook(pre_hook), model.register_forward_hook(post_hook)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        for undo in reversed(restore):
            undo()


@dataclasses.dataclass
class RunResult:
    data: str
    mode: str  # "unsplit" | "split" | "profile" | "ops"
    batch: int
    steps: int
    step_ms: float  # mean wall time per step
    step_ms_median: Optional[float]
    clips_per_s: float
    data_wait_ms: float
    parts_ms: dict
    peak_allocated_gib: Optional[float]
    peak_reserved_gib: Optional[float]
    skipped_steps: int
    losses: list
    busy_fraction: Optional[float] = None
    busy_ms: Optional[float] = None
    top_kernels: Optional[str] = None
    idle_ms: Optional[dict] = None  # mode "profile": the GPU's idle ms per step, by where the host was (idle_by_part)
    mfu: Optional[float] = None
    ops_per_step: Optional[dict] = None  # mode "ops": aten ops the host dispatched per step, by part
    decoded: Optional[dict] = None  # samples each decoder gave over the loader's life ({"cpu": n, "dali": m})


def run_steps(stage: int, parts, trainer, iterator, batch: int, data_name: str, mode: str, steps: int,
              warmup: int, first_step: int, trace: Optional[str] = None) -> RunResult:
    """Runs `warmup` then `steps` optimizer steps of `trainer` on `iterator` and measures them as `mode` says; a
    profiled run's Chrome trace goes to `trace` (gzipped) when given."""
    split = mode in ("split", "ops")
    timer = PartTimer(split, annotate=mode == "profile")
    timed = TimedIterator(iterator, timer)
    for i in range(warmup):
        trainer.step(timed, first_step + i)
    synchronize()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    step_times, losses, skipped = [], [], 0
    profiler = _profiler() if mode == "profile" else contextlib.nullcontext()
    counter = OpCounter(timer) if mode == "ops" else contextlib.nullcontext()
    with profiler as prof, (instrumented(stage, parts, trainer, timer) if split or timer.annotate
                            else contextlib.nullcontext()), counter:
        timer.reset()
        start = last = timer.last
        for i in range(steps):
            with torch.profiler.record_function("train_step") if prof is not None else contextlib.nullcontext():
                result = trainer.step(timed, first_step + warmup + i)
            losses.append(result.loss)
            skipped += int(result.nonfinite)
            if split:
                timer._charge()
                now = time.perf_counter()
                step_times.append(now - last)
                last = now
        synchronize()
        wall = time.perf_counter() - start
    if not split:
        timer._charge()  # the last step's end goes to "other" (split: each step was charged in full already)
    peak = (torch.cuda.max_memory_allocated() / 2 ** 30, torch.cuda.max_memory_reserved() / 2 ** 30) \
        if torch.cuda.is_available() else (None, None)
    parts_ms = {k: 1e3 * v / steps for k, v in sorted(timer.totals.items()) if v > 0} if split else {}
    out = RunResult(data=data_name, mode=mode, batch=batch, steps=steps, step_ms=1e3 * wall / steps,
                    step_ms_median=1e3 * statistics.median(step_times) if step_times else None,
                    clips_per_s=batch * steps / wall, data_wait_ms=1e3 * timer.totals.get("data", 0.0) / steps,
                    parts_ms=parts_ms, peak_allocated_gib=peak[0], peak_reserved_gib=peak[1],
                    skipped_steps=skipped, losses=[round(float(v), 5) for v in losses])
    if mode == "profile":
        out.busy_ms, out.busy_fraction, out.top_kernels, out.idle_ms = profile_summary(prof, steps, trace)
    if mode == "ops":
        out.ops_per_step = {k: v / steps for k, v in sorted(counter.counts.items())}
    return out


def _profiler():
    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    return torch.profiler.profile(activities=activities)


DEVICE_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")
PART_MARK = "part="  # PartTimer's marks in a profiled trace


def interval_union(intervals: list[tuple[float, float]]) -> float:
    """Total length covered by the (start, end) intervals."""
    total, end = 0.0, -math.inf
    for start, stop in sorted(intervals):
        if stop <= end:
            continue
        total += stop - max(start, end)
        end = stop
    return total


def annotated_steps(events: list[dict]) -> Optional[tuple[float, float]]:
    """(start, end) µs of the `train_step` annotations among a trace's events, from the first's start to the last's
    end, or None without any."""
    steps = [e for e in events if e.get("name") == "train_step" and e.get("cat") in ("user_annotation", "cpu_op")]
    if not steps:
        return None
    return (min(float(e["ts"]) for e in steps), max(float(e["ts"]) + float(e.get("dur", 0)) for e in steps))


def busy_from_trace(trace: dict) -> tuple[Optional[float], float]:
    """(GPU busy µs, wall µs) from a Chrome trace of profiled steps: the union of the device's kernel / memcpy /
    memset intervals, and the span from the first `train_step` annotation's start to the last device event's or
    annotation's end. Busy is None without device events (a CPU run)."""
    events = [e for e in trace.get("traceEvents", []) if isinstance(e, dict) and "ts" in e and "dur" in e]
    device = [(float(e["ts"]), float(e["ts"]) + float(e["dur"])) for e in events if e.get("cat") in DEVICE_CATEGORIES]
    span = annotated_steps(events)
    if span is None:
        return None, 0.0
    start, end = span[0], max([span[1]] + [stop for _, stop in device])
    if not device:
        return None, end - start
    clipped = [(max(a, start), min(b, end)) for a, b in device if b > start and a < end]
    return interval_union(clipped), end - start


def idle_by_part(trace: dict) -> dict[str, float]:
    """The GPU's idle µs within the profiled steps, by the part of the step the host was in when it launched the work
    that ended each idle stretch (the `part=NAME` marks of an annotating PartTimer; "other" before the first): where
    the host fell behind the GPU, or waited for it and then had to refill its queue. Kernels, copies and sets are
    tied to their launches by the trace's correlation ids; a stretch whose launch is not in the trace goes to
    "unknown"."""
    events = [e for e in trace.get("traceEvents", []) if isinstance(e, dict) and "ts" in e]
    span = annotated_steps(events)
    if span is None:
        return {}
    start, end = span
    marks = sorted((float(e["ts"]), e["name"][len(PART_MARK):]) for e in events
                   if str(e.get("name", "")).startswith(PART_MARK))
    launched = {e["args"]["correlation"]: float(e["ts"]) for e in events
                if e.get("cat") in ("cuda_runtime", "cuda_driver") and "correlation" in e.get("args", {})}
    device = sorted((float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0)), e.get("args", {}).get("correlation"))
                    for e in events if e.get("cat") in DEVICE_CATEGORIES and start <= float(e["ts"]) < end)
    idle: dict[str, float] = defaultdict(float)
    busy_until = start
    for begin, stop, correlation in device:
        if begin > busy_until:
            idle[_part_at(marks, launched.get(correlation))] += begin - busy_until
        busy_until = max(busy_until, stop)
    return dict(idle)


def _part_at(marks: list[tuple[float, str]], when: Optional[float]) -> str:
    if when is None:
        return "unknown"
    i = bisect.bisect_right(marks, (when, "\uffff"))
    return marks[i - 1][1] if i else "other"


def profile_summary(prof, steps: int, keep: Optional[str] = None
                    ) -> tuple[Optional[float], Optional[float], str, dict]:
    """(GPU busy ms per step, busy fraction of the wall time, the top kernels table, idle ms per step by part); the
    trace is also written gzipped to `keep` (for chrome://tracing or Perfetto) when given."""
    from bench.step_profile import kernel_table

    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            trace = json.load(f)
        if keep:
            Path(keep).parent.mkdir(parents=True, exist_ok=True)
            with open(path, "rb") as f, gzip.open(keep, "wb") as out:
                shutil.copyfileobj(f, out)
    busy_us, wall_us = busy_from_trace(trace)
    table, _ = kernel_table(prof, steps, 15)
    idle = {part: round(us / 1e3 / steps, 3) for part, us in sorted(idle_by_part(trace).items())}
    if busy_us is None or wall_us <= 0:
        return None, None, table, idle
    return busy_us / 1e3 / steps, busy_us / wall_us, table, idle


# ================================================================================================ one stage
def measure_stage(args) -> dict:
    """Builds the stage and runs every measurement `args` asks for; returns the JSON record."""
    from pipeline.engine import Trainer

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    record: dict[str, Any] = {"stage": args.stage, "device": torch.cuda.get_device_name(0) if cuda else "cpu",
                              "torch": torch.__version__, "quick": args.quick, "runs": [], "loader": [],
                              "notes": []}
    if args.per_tensor_grads:  # DeepSpeed's own fold, for comparison (pipeline.engine.flat_grads)
        import pipeline.engine.trainer as trainer_module
        trainer_module.flatten_bf16_grads = lambda optimizer: False
    with tempfile.TemporaryDirectory(prefix="train_step_") as folder:
        bert_dir = random_bert(os.path.join(folder, "bert"), args.quick) if args.stage == 2 else None
        batch = args.batch
        while True:
            overrides = bench_overrides(argparse.Namespace(**{**vars(args), "batch": batch}),
                                        os.path.join(folder, "run"), bert_dir)
            cfg = stage_config(args.stage, overrides)
            mask_note = with_official_mask_count(cfg)
            batch = cfg.train.batch_size
            try:
                parts = built_parts(args.stage, cfg, args.quick, folder)
                trainer = Trainer(parts.model, parts.objective, SyntheticBatches(1, 1, 1, torch.device("cpu")),
                                  cfg.train, cfg.deepspeed, cfg.train.out, graph_chains=parts.graph_chains)
                trainer.build()
                synthetic = SyntheticBatches(batch, 1 if args.images else cfg.data.num_frames, cfg.data.img_size,
                                             device, images=args.images, alternate=args.alternate)
                run = run_steps(args.stage, parts, trainer, iter(synthetic), batch, "synthetic", "unsplit",
                                args.steps, args.warmup, 1)
                break
            except torch.OutOfMemoryError:
                record["notes"].append(f"batch {batch} ran out of GPU memory; halved")
                parts = trainer = None
                gc.collect()
                torch.cuda.empty_cache()
                if batch == 1:
                    raise
                batch //= 2
        flops = step_flops(args.stage, cfg, parts, images=args.images)
        if args.alternate:  # half the samples are images
            flops = mean_flops(flops, step_flops(args.stage, cfg, parts, images=True))
        record["notes"].append(mask_note)
        record.update(batch=batch, config=settings_of(cfg), flops=flops.as_dict(),
                      params={"trained": sum(p.numel() for p in parts.model.parameters() if p.requires_grad),
                              "teacher": sum(p.numel() for p in parts.teacher.parameters())
                              if parts.teacher is not None else 0},
                      cuda_graphs=bool(cfg.train.cuda_graphs), media=media_of(args),
                      flat_bf16_grads=hasattr(trainer.engine.optimizer, "_flat_bf16_grads"))
        step = 1 + args.warmup + args.steps
        runs = [run]

        def save() -> None:
            """The record so far, written after every run: a time limit that stops this process keeps them."""
            record["runs"] = [dataclasses.asdict(r) for r in runs]
            for r in record["runs"]:
                counted = r["mode"] == "ops"  # slowed by the counting
                r["mfu"] = (flops.per_clip * r["clips_per_s"] / H200_BF16_DENSE_FLOPS) if cuda and not counted else None
            record["projection"] = projection(runs[0].step_ms / 1e3, batch, record["params"]["trained"], args.stage)
            if trainer.graphs:  # replayed or eager: --alternate's kinds should both replay
                record["graphs"] = {name: {"captures": len(chain.captures), "replays": chain.replays,
                                           "eager_calls": chain.eager_calls} for name, chain in trainer.graphs.items()}
            if args.json:
                Path(args.json).parent.mkdir(parents=True, exist_ok=True)
                Path(args.json).write_text(json.dumps(record, indent=1))

        def more(iterator, data: str, mode: str, steps: int, warmup: int) -> None:
            nonlocal step
            try:
                run_name = Path(args.json).stem if args.json else f"stage{args.stage}_{media_of(args)}"
                trace = os.path.join(args.trace_dir, f"{run_name}_{data}.json.gz") \
                    if args.trace_dir and mode == "profile" else None
                result = run_steps(args.stage, parts, trainer, iterator, batch, data, mode, steps, warmup, step,
                                   trace)
            except Exception as e:  # noted; the other runs go on
                record["notes"].append(f"{data} {mode} run failed: {type(e).__name__}: {e}")
                raise
            step += warmup + steps
            runs.append(result)
            save()

        save()
        if args.split_steps:
            more(iter(synthetic), "synthetic", "split", args.split_steps, 0)
        if args.profile_steps:
            more(iter(synthetic), "synthetic", "profile", args.profile_steps, 0)
        for data in [d for d in args.data if d != "synthetic"]:
            if not args.shards:
                record["notes"].append(f"--data {data} needs --shards or --make-shards: skipped")
                continue
            if data in ("dali", "hybrid") and not dali_ready():
                record["notes"].append(f"--data {data}: DALI is not installed here: skipped")
                continue
            steps = args.cpu_steps if data == "cpu" else args.steps
            iterator = None
            try:
                loader = real_loader(cfg, data, args.cpu_workers)
                iterator = iter(loader)
                warmup = args.warmup + in_flight_batches(data, loader.num_workers)  # steady state, not the prefetch
                more(iterator, data, "unsplit", steps, warmup)
                if loader.decoded:
                    runs[-1].decoded = dict(loader.decoded)
                if args.split_steps and data == "dali":
                    more(iterator, data, "split", args.split_steps, 0)
                if args.profile_steps and data == "dali":
                    more(iterator, data, "profile", args.profile_steps, 0)
            except Exception as e:
                if not record["notes"] or data not in record["notes"][-1]:
                    record["notes"].append(f"--data {data} failed: {type(e).__name__}: {e}")
                print(f"--data {data} failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
            finally:
                if iterator is not None:
                    iterator.close()
        if args.ops_steps:  # last: the counting mode is the newest part of the bench; a failure here is noted only
            with contextlib.suppress(Exception):
                more(iter(synthetic), "synthetic", "ops", args.ops_steps, 0)
        if args.loader_ceiling and args.shards:
            record["loader"] = loader_ceilings(cfg, batch, args, runs[0].clips_per_s, record["notes"])
        save()
    return record


def dali_ready() -> bool:
    """DALI is installed (without a GPU the loader runs DALI's CPU backend, which reads VP9 but not H.264)."""
    from pipeline.data.decode import dali_available

    return dali_available()


def in_flight_batches(decoder: str, workers: int) -> int:
    """Batches the loader holds ready or in the making before the consumer asks: the DataLoader's workers x its
    prefetch factor (2) decode ahead with the CPU decoder; with DALI the workers only read bytes and DALI decodes
    its pipelines' groups plus one ahead (pipeline.data.loader.DaliSettings); hybrid decoding holds both. A
    measurement starts after them, or it times batches made during the warm-up."""
    from pipeline.data.loader import default_dali_settings

    cpu, dali = max(1, workers) * 2, default_dali_settings().pipelines + 1
    return {"cpu": cpu, "dali": dali}.get(decoder, cpu + dali)


def loader_ceilings(cfg, batch: int, args, step_clips_per_s: float, notes: list) -> list[dict]:
    """Clips/s of the loader alone (no model), per decoder, against what the synthetic step consumes: the loader's
    in-flight batches are drawn first, then `--ceiling-clips` clips are timed, or 3x the in-flight clips where that
    is more (a synchronize at the end for DALI's CUDA batches). The CPU decoder's ceiling is timed at batch 8 (its cost is per clip; a smaller batch keeps its
    in-flight clips, 2 x workers batches, few), DALI's and the hybrid's at the training batch (DALI's groups are
    whole batches)."""
    from pipeline.data import build_loader

    out = []
    for decoder in [d for d in args.data if d in ("dali", "cpu", "hybrid")]:
        if decoder != "cpu" and not dali_ready():
            continue
        data = loader_data(cfg, decoder, args.cpu_workers)
        size = min(batch, 8) if decoder == "cpu" else batch
        built = build_loader(data, size, rank=0, world_size=1, seed=cfg.train.seed, train=True)
        loader = iter(built)
        warm = in_flight_batches(decoder, data.num_workers) + 2
        try:
            for _ in range(warm):
                next(loader)
            synchronize()
            # batches made ahead during the warm-up are handed out at once: timing at least 3x what is in flight
            # bounds their share (the hybrid's CPU workers fill their prefetch while a DALI batch is awaited)
            clips = max(args.ceiling_clips or 4 * batch, 3 * warm * size)
            done, start = 0, time.perf_counter()
            while done < clips:
                done += len(next(loader)["key"])
            synchronize()
            rate = done / (time.perf_counter() - start)
        except Exception as e:  # noted; the other decoder's ceiling is still measured
            notes.append(f"the {decoder} loader's ceiling failed: {type(e).__name__}: {e}")
            continue
        finally:
            loader.close()
        out.append({"decoder": decoder, "workers": data.num_workers, "batch": size, "warmup_batches": warm,
                    "clips": done, "clips_per_s": rate, "decoded": dict(built.decoded),
                    "x_step": rate / step_clips_per_s if step_clips_per_s else None})
    return out


def graph_counts(record: dict) -> str:
    """' (backbone: N captures, R replays, E eager calls; text: ...)' of each chain's CUDA graphs over the whole
    process, or ''. Records before the text chains hold the backbone's counts alone."""
    g = record.get("graphs")
    if not g:
        return ""
    chains = {"backbone": g} if "captures" in g else g
    return " (" + "; ".join(f"{name}: {c['captures']} captures, {c['replays']:,} replays, {c['eager_calls']:,} "
                            f"eager calls" for name, c in chains.items()) + ")"


def media_of(args: argparse.Namespace) -> str:
    """What the synthetic batches hold: video, image (--images) or alternate (--alternate)."""
    return "image" if args.images else "alternate" if args.alternate else "video"


def settings_of(cfg) -> dict:
    keys = {"model": ("size", "depth", "embed_dim", "drop_path_rate", "scan_backend"),
            "data": ("num_frames", "img_size", "num_workers", "decoder"),
            "train": ("batch_size", "precision", "grad_accum_dtype", "lr", "betas", "weight_decay", "clip_grad",
                      "cuda_graphs", "cuda_graph_chains"),
            "deepspeed": ("zero_stage",), "teacher": ("model", "img_size"), "mask": ("kind", "ratio")}
    if hasattr(cfg, "text"):
        keys["text"] = ("fusion_layer", "max_len", "embed_dim")
        keys["loss"] = ("vtc", "vtm", "mlm", "align", "mlm_prob")
    else:
        keys["loss"] = ("kind",)
    return {section: {k: getattr(getattr(cfg, section), k) for k in names} for section, names in keys.items()}


# ================================================================================================ projection
def ring_seconds(bytes_: float, gpus: int, busbw: float) -> float:
    """Seconds of an all-reduce-sized exchange (reduce-scatter + all-gather) of `bytes_` over `gpus` at `busbw`."""
    return 0.0 if gpus <= 1 else 2 * (gpus - 1) / gpus * bytes_ / busbw


def projection(step_s: float, batch: int, trained_params: int, stage: int,
               gpus: tuple[int, ...] = PROJECTED_GPUS) -> list[dict]:
    """The step at `gpus` GPUs under ZeRO-1/2 data parallelism (see the module docstring for the assumptions)."""
    rows = []
    grad_bytes = 2.0 * trained_params  # bf16 gradients reduce-scattered, bf16 parameters all-gathered
    for g in gpus:
        inter = g > GPUS_PER_NODE
        busbw = INTER_NODE_BUSBW if inter else INTRA_NODE_BUSBW
        latency = INTER_NODE_LATENCY_S if inter else INTRA_NODE_LATENCY_S
        grads = ring_seconds(grad_bytes, g, busbw)
        gathered = 0.0
        if stage == 2:  # VTC: all_gather of (B, 512) fp32 video and text embeddings, forward and backward
            gathered = 2 * (g - 1) / g * (2 * batch * 512 * 4 * g) / busbw
        small = 3 * latency * (math.log2(g) if g > 1 else 0)
        comm = grads + gathered + small
        rows.append({"gpus": g, "nodes": math.ceil(g / GPUS_PER_NODE), "busbw_GBps": busbw / 1e9,
                     "grad_sync_ms": 1e3 * grads, "embed_gather_ms": 1e3 * gathered, "latency_ms": 1e3 * small,
                     "step_ms": 1e3 * (step_s + comm), "efficiency": step_s / (step_s + comm),
                     "clips_per_s": g * batch / (step_s + comm), "global_batch": g * batch})
    return rows


# ================================================================================================ report
def table(record: dict) -> str:
    """The human-readable tables of one stage's record."""
    kinds = {"image": " of 1-frame images", "alternate": ", image and clip batches in turn"}
    media = kinds.get(record.get("media"), "")
    lines = [f"stage {record['stage']} on {record['device']}: batch {record['batch']}{media}, "
             f"CUDA graphs {record.get('cuda_graphs')}{graph_counts(record)}, "
             f"flat bf16 gradients {record.get('flat_bf16_grads')}, "
             f"trained parameters {record['params']['trained'] / 1e6:.1f}M, "
             f"teacher {record['params']['teacher'] / 1e6:.1f}M; model GFLOP per clip (fwd+bwd) "
             f"{record['flops']['per_clip_fwd_bwd'] / 1e9:.1f} (teacher {record['flops']['teacher_fwd'] / 1e9:.1f}, "
             f"student {record['flops']['student_fwd_bwd'] / 1e9:.1f}, text {record['flops']['text_fwd_bwd'] / 1e9:.1f}"
             f"), {record['flops']['backbone_tokens']} backbone tokens per clip",
             "", "| data | mode | steps | ms/step | clips/s | data wait ms | peak GiB | GPU busy | MFU |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in record["runs"]:
        lines.append(f"| {r['data']} | {r['mode']} | {r['steps']} | {r['step_ms']:.1f} | {r['clips_per_s']:.1f} | "
                     f"{r['data_wait_ms']:.1f} | {_fmt(r['peak_allocated_gib'], '.1f')} | "
                     f"{_fmt(r['busy_fraction'], '.1%')} | {_fmt(r['mfu'], '.1%')} |")
    for r in record["runs"]:
        if r["mode"] == "split":
            total = sum(r["parts_ms"].values())
            lines += ["", f"split ({r['data']}, a synchronize between parts), ms per step of {total:.1f}:",
                      "| part | ms | share |", "|---|---:|---:|"]
            lines += [f"| {k} | {v:.1f} | {v / total:.1%} |" for k, v in r["parts_ms"].items()]
        if r["mode"] == "ops" and r.get("ops_per_step"):
            total = sum(r["ops_per_step"].values())
            lines += ["", f"host ops ({r['data']}, aten ops dispatched per step, by part) of {total:,.0f}:",
                      "| part | ops | share |", "|---|---:|---:|"]
            lines += [f"| {k} | {v:,.0f} | {v / total:.1%} |" for k, v in r["ops_per_step"].items()]
        if r["mode"] == "profile" and r.get("top_kernels"):
            lines += ["", f"top kernels ({r['data']}, GPU busy {_fmt(r['busy_ms'], '.1f')} ms a step):",
                      r["top_kernels"]]
        if r["mode"] == "profile" and r.get("idle_ms"):
            total = sum(r["idle_ms"].values())
            lines += ["", f"GPU idle ({r['data']}, ms per step, by where the host was when it launched the work that "
                      f"ended each idle stretch) of {total:.1f}:", "| part | idle ms | share |", "|---|---:|---:|"]
            lines += [f"| {k} | {v:.2f} | {v / total:.1%} |" for k, v in
                      sorted(r["idle_ms"].items(), key=lambda kv: -kv[1])]
    if record.get("loader"):
        lines += ["", "| loader ceiling | workers | clips/s | x the synthetic step | samples decoded by |",
                  "|---|---:|---:|---:|---|"]
        lines += [f"| {r['decoder']} | {r['workers']} | {r['clips_per_s']:.1f} | {_fmt(r['x_step'], '.2f')} | "
                  f"{', '.join(f'{k} {v}' for k, v in sorted(r.get('decoded', {}).items()))} |"
                  for r in record["loader"]]
    if record.get("projection"):
        lines += ["", "| GPUs | nodes | grad sync ms | embed gather ms | step ms | efficiency | clips/s |",
                  "|---:|---:|---:|---:|---:|---:|---:|"]
        lines += [f"| {r['gpus']} | {r['nodes']} | {r['grad_sync_ms']:.1f} | {r['embed_gather_ms']:.2f} | "
                  f"{r['step_ms']:.1f} | {r['efficiency']:.1%} | {r['clips_per_s']:.0f} |" for r in record["projection"]]
    lines += [f"note: {n}" for n in record.get("notes", [])]
    return "\n".join(lines)


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def ours_backbone_rows(folder: str) -> list[dict]:
    """This project's VideoMamba-M rows of bench/backbone.py's table in `folder`/backbone_ours.log."""
    path = Path(folder) / "backbone_ours.log"
    rows = []
    for line in path.read_text().splitlines() if path.exists() else []:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 7 and cells[0].startswith("VideoMamba"):
            rows.append({"backend": cells[1], "frames": cells[2], "clips_per_s": cells[4], "ms_per_step": cells[5],
                         "peak_mib": cells[6]})
    return rows


def target_lines(ours: dict, official: dict) -> list[str]:
    """Issue 23's targets, met or missed, from the records."""
    lines = ["| target | stage | measured | verdict |", "|---|---|---|---|"]
    ceilings = [c for r in ours.values() for c in r.get("loader", [])]
    for stage, record in sorted(ours.items()):
        mine = next((r for r in record["runs"] if r["data"] == "synthetic" and r["mode"] == "unsplit"), None)
        theirs = official.get("parts", {}).get(f"stage{record['stage']}", {})
        if record.get("media") in ("image", "alternate"):  # the official step is timed on video batches only
            theirs = {"error": "timed on video batches; no image-batch counterpart"}
        if mine and theirs.get("ok"):
            ratio = mine["clips_per_s"] / theirs["clips_per_s"]
            same = "" if theirs["batch"] == record["batch"] else f" (batches differ: {record['batch']} / {theirs['batch']})"
            lines.append(f"| >= 2x the official clips/s | {stage} | {mine['clips_per_s']:.1f} / "
                         f"{theirs['clips_per_s']:.1f} = {ratio:.2f}x{same} | {'met' if ratio >= 2 else 'missed'} |")
            if mine.get("mfu") is not None:
                theirs_mfu = record["flops"]["per_clip_fwd_bwd"] * theirs["clips_per_s"] / H200_BF16_DENSE_FLOPS
                lines.append(f"| MFU (the same model FLOPs per clip, 989 TFLOP/s) | {stage} | ours {mine['mfu']:.1%}, "
                             f"official {theirs_mfu:.1%} | - |")
            if mine["peak_allocated_gib"] and theirs.get("peak_allocated_gib"):
                ok = mine["peak_allocated_gib"] <= theirs["peak_allocated_gib"]
                lines.append(f"| memory not above the official's | {stage} | {mine['peak_allocated_gib']:.1f} / "
                             f"{theirs['peak_allocated_gib']:.1f} GiB | {'met' if ok else 'missed'} |")
        elif mine:
            lines.append(f"| >= 2x the official clips/s | {stage} | official: {theirs.get('error', 'not run')} | - |")
        for run in record["runs"]:
            if run["mode"] == "profile" and run.get("busy_fraction") is not None:
                ok = run["busy_fraction"] >= 0.9
                lines.append(f"| GPU busy >= 90% of the step | {stage} ({run['data']}) | {run['busy_fraction']:.1%} "
                             f"({run['busy_ms']:.1f} ms of {run['step_ms']:.1f}) | {'met' if ok else 'missed'} |")
        if mine:
            for c in ceilings:
                x = c["clips_per_s"] / mine["clips_per_s"]
                lines.append(f"| loader ceiling >= 2x the step's consumption | {stage} ({c['decoder']}, "
                             f"{c['workers']} workers) | {c['clips_per_s']:.1f} / {mine['clips_per_s']:.1f} = "
                             f"{x:.2f}x | {'met' if x >= 2 else 'missed'} |")
    return lines


def summary(folder: str) -> str:
    """Ours against the official code, from the files in `folder` (train_step_stage*.json, official.json,
    backbone_ours.log, build.json): the targets, then every table. `train_step_stageN_VARIANT.json` (the same stage
    with other overrides, e.g. fp32grads) gets its own rows, labelled "N (VARIANT)"."""
    ours = {}
    for path in sorted(Path(folder).glob("train_step_stage*.json")):
        record = json.loads(path.read_text())
        variant = path.stem.removeprefix(f"train_step_stage{record['stage']}").lstrip("_")
        ours[f"{record['stage']} ({variant})" if variant else str(record["stage"])] = record
    official_path = Path(folder) / "official.json"
    official = json.loads(official_path.read_text()) if official_path.exists() else {}
    lines = ["## Targets (issue 23)", ""] + target_lines(ours, official)
    build = Path(folder) / "build.json"
    if build.exists():
        lines += ["", f"official kernels' build (sm_90, in parallel, niced): {build.read_text().strip()}"]
    backbone = official.get("parts", {}).get("backbone")
    lines += ["", "## VideoMamba-M forward+backward, 8 frames of 224², bf16", "",
              "| code | backend | clips/s | ms/step | peak |", "|---|---|---:|---:|---:|"]
    lines += [f"| ours | {r['backend']} | {r['clips_per_s']} | {r['ms_per_step']} | {r['peak_mib']} MiB |"
              for r in ours_backbone_rows(folder)]
    if backbone and backbone.get("ok"):
        lines.append(f"| official (batch {backbone['batch']}) | mamba_ssm (bimamba v2) | {backbone['clips_per_s']:.2f} "
                     f"| {backbone['step_ms']:.0f} | {backbone['peak_allocated_gib'] * 1024:,.0f} MiB |")
    elif backbone:
        lines.append(f"| official | - | failed: {backbone.get('error')} | | |")
    for stage, record in sorted(ours.items()):
        lines += ["", f"## Ours, stage {stage}", "", table(record)]
    if official:
        from bench.official_step import table as official_table
        lines += ["", "## The official code", "", official_table(official)]
    return "\n".join(lines)


# ================================================================================================ command line
def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stage", type=int, choices=[1, 2], default=1)
    parser.add_argument("--data", nargs="+", choices=["synthetic", "dali", "cpu", "hybrid"], default=["synthetic"],
                        help="what feeds the step; synthetic always runs first (the step alone)")
    parser.add_argument("--shards", default=None, help="a shard index.json for --data dali/cpu/hybrid")
    parser.add_argument("--make-shards", default=None, metavar="DIR",
                        help="write the synthetic corpus's shards into DIR first (and use them)")
    parser.add_argument("--shards-only", action="store_true", help="with --make-shards: write them, then stop")
    parser.add_argument("--source-size", type=int, default=256, help="--make-shards: clips of this many px square")
    parser.add_argument("--source-frames", type=int, default=90, help="--make-shards: frames per clip")
    parser.add_argument("--source-fps", type=int, default=30)
    parser.add_argument("--source-videos", type=int, default=256)
    parser.add_argument("--source-keyint", type=int, default=None, metavar="N",
                        help="--make-shards: re-encode the clips with a key frame every N frames (videomamba shard "
                             "--keyint), so that the CPU decoder restarts at key frames")
    parser.add_argument("--source-codec", choices=["h264", "vp9"], default="h264",
                        help="vp9: for DALI's CPU backend (tests without a GPU)")
    parser.add_argument("--batch", type=int, default=None, help="per GPU (default: the recipe's, 64 / 128)")
    parser.add_argument("--workers", type=int, default=None, help="data.num_workers (default: the stage YAML's)")
    parser.add_argument("--cpu-workers", type=int, default=None,
                        help="DataLoader workers of --data cpu and hybrid (PyAV decodes in them; default: --workers)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per unsplit run")
    parser.add_argument("--cpu-steps", type=int, default=4, help="timed steps of --data cpu")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--split-steps", type=int, default=4, help="steps timed with a synchronize between parts")
    parser.add_argument("--profile-steps", type=int, default=3, help="steps under torch.profiler (GPU busy)")
    parser.add_argument("--ops-steps", type=int, default=0,
                        help="steps whose dispatched aten ops are counted per part (runs on a CPU too)")
    parser.add_argument("--images", action="store_true",
                        help="stage 2 on synthetic batches of 1-frame images (data.mix=batch mask.image_ratio=0.5)")
    parser.add_argument("--alternate", action="store_true",
                        help="stage 2 on synthetic batches that alternate clips and 1-frame images, one kind a step "
                             "(data.mix=batch mask.image_ratio=0.5)")
    parser.add_argument("--loader-ceiling", action="store_true", help="also time the loader alone per decoder")
    parser.add_argument("--ceiling-clips", type=int, default=None,
                        help="clips timed per ceiling, after the loader's in-flight batches (default 4 batches; at "
                             "least 3x the in-flight clips)")
    parser.add_argument("--no-cuda-graphs", action="store_true")
    parser.add_argument("--per-tensor-grads", action="store_true",
                        help="fold bf16 gradients into fp32 a tensor at a time, as DeepSpeed's BF16_Optimizer does "
                             "(pipeline.engine.flat_grads off), for comparison")
    parser.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                        help="a further stage-config override (repeatable)")
    parser.add_argument("--json", default=None, help="write the record here")
    parser.add_argument("--trace-dir", default=None, metavar="DIR",
                        help="keep each profiled run's Chrome trace here (named after --json's file, and the data)")
    parser.add_argument("--summary", default=None, metavar="DIR", help="print the tables of the JSON files in DIR")
    parser.add_argument("--quick", action="store_true",
                        help="tiny shapes, 2 steps per run: every code path on a CPU in seconds")
    args = parser.parse_args(argv)
    for flag in ("images", "alternate"):
        if getattr(args, flag) and (args.stage != 2 or set(args.data) != {"synthetic"}):
            parser.error(f"--{flag} is stage 2 on synthetic input only (--stage 2 --data synthetic)")
    if args.images and args.alternate:
        parser.error("--images and --alternate: pick one (all images, or images and clips in turn)")
    if args.quick:
        args.steps, args.cpu_steps, args.warmup = min(args.steps, 2), min(args.cpu_steps, 2), min(args.warmup, 1)
        args.split_steps, args.profile_steps = min(args.split_steps, 2), min(args.profile_steps, 1)
        args.ops_steps = min(args.ops_steps, 1)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.summary:
        print(summary(args.summary))
        return 0
    if args.make_shards:
        started = time.perf_counter()
        if args.quick:
            args.shards = make_shards(args.make_shards, videos=8, size=64, frames=8, fps=8, per_shard=4,
                                      codec=args.source_codec, keyint=args.source_keyint)
        else:
            args.shards = make_shards(args.make_shards, args.source_videos, args.source_size, args.source_frames,
                                      args.source_fps, codec=args.source_codec, keyint=args.source_keyint)
        print(f"shards: {args.shards} in {time.perf_counter() - started:.1f} s", file=sys.stderr, flush=True)
        if args.shards_only:
            return 0
    if "synthetic" not in args.data:
        args.data = ["synthetic"] + args.data
    if not torch.cuda.is_available():
        torch.set_num_threads(1)
    record = measure_stage(args)
    source = os.path.join(os.path.dirname(args.shards), "source.json") if args.shards else ""
    if source and os.path.exists(source):
        with open(source) as f:
            record["source"] = json.load(f)
    if args.json:  # again, with the source
        Path(args.json).write_text(json.dumps(record, indent=1))
    print(table(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
