"""A recipe: what `videomamba run` runs, as typed config (configs/recipes/*.yaml).

A recipe names its inputs: corpora (manifests or media folders on any fsspec URL, or shards made already), the
teacher checkpoint, the text encoder's directory and the evaluation sets; and its steps: sharding, stage 1, stage 2,
the unmasked phase of stage 2 and the evaluations. A step whose `config` is empty is not run. `{out}` in any path
stands for the run folder. The synthetic demo is the recipe with `synth.enabled` (its corpus and its tiny teacher are
made by the run itself).

Also here: the arithmetic of a plan (samples -> steps -> GPU-hours) from the throughput measured in bench/RESULTS.md.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, Optional

from pipeline.config import ranged


@dataclass
class SynthStep:
    """The demo's own corpus (`videomamba synth` into OUT/corpus); off in real recipes."""

    enabled: bool = False
    videos: int = ranged(240, ge=1)
    images: int = ranged(120, ge=0)
    eval_videos: int = ranged(64, ge=1)
    seed: int = ranged(0, ge=0)
    size: int = ranged(64, ge=16)
    frames: int = ranged(16, ge=1)
    fps: int = ranged(8, ge=1)
    codec: str = "h264"


@dataclass
class CorpusSpec:
    input: str = ""  # a manifest (jsonl/csv/parquet) or a media folder, any fsspec URL; sharded into OUT/shards/NAME
    shards: str = ""  # shards made already (index.json or brace URL patterns): used as they are, `input` ignored
    samples: Optional[int] = ranged(None, ge=1)  # the published size, for --plan before it is sharded
    samples_per_shard: Optional[int] = ranged(None, ge=1)  # None: shard.samples_per_shard


@dataclass
class ShardStep:
    samples_per_shard: int = ranged(1000, ge=1)
    workers: Optional[int] = ranged(None, ge=1)  # Ray tasks at once; None: the cluster's CPUs


@dataclass
class TeacherSpec:
    """The frozen CLIP teacher of stage 1 and stage 2's alignment loss (the stages' teacher.* keys)."""

    model: Optional[str] = None  # an open_clip model name; None keeps each stage YAML's
    pretrained: Optional[str] = None  # a checkpoint file / URL or an open_clip tag; None keeps the stage YAML's
    # the demo's own teacher (synth.enabled): a tiny open_clip trained briefly on the synthetic frames
    steps: int = ranged(300, ge=1)
    img_size: int = ranged(64, ge=16)
    seed: int = ranged(0, ge=0)


@dataclass
class TextSpec:
    pretrained: Optional[str] = None  # the text encoder's directory (a BERT folder): stage 2's text.pretrained
    # the demo's own BERT (synth.enabled): a WordPiece vocabulary from the corpus captions and a small random
    # BertForMaskedLM, saved in the transformers layout at `pretrained`; stage 2 loads it as it loads BERT-base
    hidden: int = ranged(128, ge=8)
    layers: int = ranged(4, ge=1)
    heads: int = ranged(4, ge=1)
    vocab_size: int = ranged(1000, ge=128)
    seed: int = ranged(0, ge=0)
    # std of its random weights, also of stage 2's new cross-attention (config.json's initializer_range); None:
    # BERT's 0.02 scaled to `hidden` (0.02 * sqrt(768 / hidden), pipeline.models.text.width_scaled_init_std)
    init_std: Optional[float] = ranged(None, gt=0)
    dropout: float = ranged(0.1, ge=0, lt=1)  # its hidden and attention dropout (BERT's 0.1)


@dataclass
class TrainStep:
    """A training step: the stage YAML, the corpora it reads (mixed by `weights`) and how long it runs."""

    config: str = ""  # the stage's YAML (relative to the recipe's folder or its parent); empty: the step is skipped
    corpora: list[str] = field(default_factory=list)  # names under `corpora`
    weights: Optional[list[float]] = ranged(None, ge=0)  # per corpus (data.weights); None: by their samples
    workers: int = ranged(1, ge=0)  # Ray Train workers (one GPU each on GPUs); 0: in this process, no Ray Train
    epochs: Optional[float] = ranged(None, gt=0)  # passes over the corpora -> train.max_steps; None: the YAML's
    warmup_epochs: Optional[float] = ranged(None, ge=0)  # -> train.warmup_steps; None: the YAML's
    overrides: list[str] = field(default_factory=list)  # key.sub=value for the stage's config


@dataclass
class EvalSetSpec:
    annotations: str = ""  # the benchmark's annotation file (any fsspec URL)
    videos: str = ""  # its video folder (any fsspec URL)
    dataset: Optional[str] = None  # the annotation format (msrvtt|didemo|anet|lsmdc|msvd|synthetic); None: the name


@dataclass
class EvalStep:
    config: str = ""  # the retrieval YAML; empty: no evaluation
    overrides: list[str] = field(default_factory=list)
    gpus: Optional[float] = ranged(None, ge=0)  # GPUs per evaluation task; None: 1 when the cluster has GPUs, else 0


@dataclass
class RayOptions:
    address: Optional[str] = None  # None: a local cluster for the run; auto or HOST:PORT: join one (--ray-address)
    max_failures: int = ranged(2, ge=0)  # Ray Train restarts the workers of a training step up to this many times
    task_retries: int = ranged(1, ge=0)  # an evaluation task is retried this many times (a lost node)


@dataclass
class PlanOptions:
    gpu: Literal["H200", "H100"] = "H200"  # the GPU whose measured throughput prices the training steps
    list_sizes: bool = True  # --plan lists the inputs' sizes (local files only); false: it touches no data at all


@dataclass
class RecipeConfig:
    name: str = ""
    ray: RayOptions = field(default_factory=RayOptions)
    plan: PlanOptions = field(default_factory=PlanOptions)
    synth: SynthStep = field(default_factory=SynthStep)
    shard: ShardStep = field(default_factory=ShardStep)
    corpora: dict[str, CorpusSpec] = field(default_factory=dict)
    teacher: TeacherSpec = field(default_factory=TeacherSpec)
    text: TextSpec = field(default_factory=TextSpec)
    eval_teacher: EvalStep = field(default_factory=EvalStep)  # the demo's: the teacher's own zero-shot retrieval
    stage1: TrainStep = field(default_factory=TrainStep)
    stage2: TrainStep = field(default_factory=TrainStep)
    unmasked: TrainStep = field(default_factory=TrainStep)  # stage 2's short unmasked phase, from stage 2's run
    eval_stage2: EvalStep = field(default_factory=EvalStep)  # the final model on every set of `evals`
    evals: dict[str, EvalSetSpec] = field(default_factory=dict)
    paper: dict[str, float] = ranged(default_factory=dict, ge=0, le=100)  # the paper's T2V R@1 per benchmark


TRAIN_STEPS = ("stage1", "stage2", "unmasked")

# Clips per second of one training step of the backbone (forward + backward, batch 4, bf16, 224 px, every token),
# by (model.size, data.num_frames, GPU), as measured in bench/RESULTS.md:
#   middle/H200: "The VideoMamba-M step on the H200" (python -m bench.backbone --sizes middle, triton backend);
#   middle/H100: the H100 table of the same benchmark (mamba_ssm backend);
#   tiny/H200:   8 frames eager 57.1 ("The step's small kernels"), 64 frames eager 38.97 ("CUDA graphs for the
#                backbone's blocks"); both the Triton backend without CUDA graphs, the stage configs' default.
# A step without a whole-step measurement below (stage 2's unmasked phase, other sizes or frame counts) is priced
# from these, which leave out the teacher and the text model.
CLIPS_PER_S: dict[tuple[str, int, str], float] = {
    ("middle", 8, "H200"): 16.95,
    ("middle", 16, "H200"): 8.65,
    ("middle", 8, "H100"): 19.95,
    ("middle", 16, "H100"): 12.07,
    ("tiny", 8, "H200"): 57.1,
    ("tiny", 64, "H200"): 38.97,
}


# Clips per second of the whole masked training step at the paper's setting (the teacher's forward, the 80% mask,
# stage 2's BERT-base side; bf16, ZeRO-1, CUDA graphs; synthetic input), by (stage, model.size, data.num_frames,
# GPU), as measured in bench/RESULTS.md "Training step at the paper's setting" (python -m bench.train_step):
#   stage1: batch 64; stage2: batch 128.
STEP_CLIPS_PER_S: dict[tuple[str, str, int, str], float] = {
    ("stage1", "middle", 8, "H200"): 194.8,
    ("stage2", "middle", 8, "H200"): 198.2,
}


def steps_for(epochs: float, samples: int, global_batch: int) -> int:
    """Optimizer steps for `epochs` passes over `samples` at `global_batch` clips a step (at least 1)."""
    return max(1, math.ceil(epochs * samples / global_batch))


def clips_per_s(stage: str, masked: bool, size: str, frames: int, gpu: str) -> tuple[Optional[float], str]:
    """The measured training throughput that prices a step, and what was measured: the whole masked step of `stage`
    (stage1/stage2) when it was measured, else the backbone's step; (None, "") when neither was."""
    if masked and (stage, size, frames, gpu) in STEP_CLIPS_PER_S:
        return STEP_CLIPS_PER_S[(stage, size, frames, gpu)], "whole step"
    rate = CLIPS_PER_S.get((size, frames, gpu))
    return (rate, "backbone step") if rate is not None else (None, "")


def gpu_hours(clips: int, rate: Optional[float]) -> Optional[float]:
    """GPU-hours to train on `clips` clips at `rate` clips/s, or None when the rate was not measured."""
    return None if rate is None else clips / rate / 3600.0
