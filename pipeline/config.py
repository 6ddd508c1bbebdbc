"""Typed run configuration: dataclasses filled from YAML files and ``key.sub=value`` overrides.

A config file may list other files under ``_base_`` (paths relative to it); they are merged first, in order, and the
file's own keys win. Command-line overrides win over every file. Every key is checked against the dataclass schema
before any work starts: an unknown key, a value of the wrong type or a missing required key raises ``ConfigError``
naming the key, the file (or the command line) it came from, and the closest valid key.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

import fsspec
import yaml

from pipeline.errors import ConfigError  # noqa: F401 - re-exported: pipeline.config.ConfigError stays importable

BASE_KEY = "_base_"
COMMAND_LINE = "the command line"


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads `1e-3` as a string; users mean a float (as YAML 1.2 and Python read it)."""


_Loader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)[eE][-+]?\d+$"),
                              list("-+0123456789."))


def yaml_load(stream: Any) -> Any:
    """Returns the YAML document in `stream` (a string or file), reading `1e-3` as a float."""
    return yaml.load(stream, Loader=_Loader)


def ranged(default: Any = dataclasses.MISSING, *, default_factory: Any = dataclasses.MISSING,
           ge: Optional[float] = None, gt: Optional[float] = None, le: Optional[float] = None,
           lt: Optional[float] = None) -> Any:
    """A dataclass field whose numeric value (or each item of a list or value of a dict; None passes) must lie in
    the range given;
    `load_config` checks it before any work. Every float must also be finite, ranged or not."""
    return field(default=default, default_factory=default_factory, metadata={"range": (ge, gt, le, lt)})


# --------------------------------------------------------------------------------------------------- schema sections
@dataclass
class ModelConfig:
    size: Literal["tiny", "small", "middle", "base"] = "tiny"
    patch_size: int = ranged(16, ge=1)
    tubelet_size: int = ranged(1, ge=1)
    depth: Optional[int] = ranged(None, ge=1)  # overrides the size's depth (tiny test models)
    embed_dim: Optional[int] = ranged(None, ge=1)  # overrides the size's width
    drop_path_rate: Optional[float] = ranged(None, ge=0, lt=1)  # None: the size's (Ti 0.1, S 0.15, M 0.4, B 0.4)
    token_order: Literal["spatial_first", "temporal_first", "st_interleave", "ts_interleave"] = "spatial_first"
    checkpoint_blocks: int = ranged(0, ge=0)  # activation checkpointing of the first k blocks
    scan_backend: Literal["auto", "torch", "mamba_ssm", "triton"] = "auto"  # auto: triton on CUDA, torch elsewhere
    residual_in_fp32: bool = True
    pretrained: Optional[str] = None  # an official VideoMamba checkpoint (path or fsspec URL)
    # the student's alignment head (stage 1, and stage 2's unmasked-token alignment; pipeline/models/heads.py):
    # clip_decoder, the official one (Linear -> LayerNorm over the un-normed stream entering the last block plus
    # sinusoid positions; a released video_mm checkpoint's clip_decoder loads into it); norm_linear: LayerNorm ->
    # Linear over the final-normed tokens (the project's earlier head)
    align_head: Literal["clip_decoder", "norm_linear"] = "clip_decoder"


@dataclass
class DataConfig:
    train: str = ""  # shard index(es) or brace URL patterns, several joined by ','
    weights: Optional[list[float]] = ranged(None, ge=0)  # mixing weight per entry of `train`
    # sample: each sample's corpus drawn by `weights` (batches mix images and videos; an image is num_frames repeated
    # frames); batch: one draw per batch, so a batch is all images or all videos, the same corpus on every rank at a
    # step, and an image is one frame (the official MetaLoader's alternation and use_image path:
    # video_mm/dataset/dataloader.py, models/umt_videomamba.py; what `mask.image_ratio` needs)
    mix: Literal["sample", "batch"] = "sample"
    num_frames: int = ranged(8, ge=1)
    img_size: int = ranged(224, ge=1)
    # resample to this frame rate before segment sampling; None keeps the source's
    fps: Optional[float] = ranged(None, gt=0)
    # cpu: PyAV in the workers (on the H100 machine 12 workers decoded 540-640 clips/s, DALI 2.4 100-110:
    # bench/RESULTS.md); dali: NVDEC; hybrid: DALI plus the workers decoding the batches DALI has no room for
    # (pipeline/data/loader.py; there, slower than cpu: batches in order wait for DALI's); auto: DALI where it and a
    # GPU are present, else cpu
    decoder: Literal["auto", "cpu", "dali", "hybrid"] = "cpu"
    num_workers: int = ranged(2, ge=0)
    shuffle_buffer: int = ranged(256, ge=0)
    epochs: Optional[int] = ranged(None, ge=1)  # None streams forever (training is bounded by train.max_steps)
    # a tar of a URL-pattern corpus that is cut short or unreadable: false uses its readable samples and reports the
    # damage (as inside an indexed corpus), true refuses the run (exit 2 naming the tar)
    strict: bool = False
    # the training frames' normalization (pipeline/data/transforms.py NORMALIZATIONS), applied by every decoder (CPU
    # and DALI) and fed to the student and, unchanged, to the teacher. imagenet: the official pipelines' for
    # VideoMamba (docs/FIDELITY.md); clip: CLIP's mean/std. The run's config.yaml records it and the evaluation of
    # the run normalizes its frames the same way (docs/EVAL_PROTOCOL.md)
    normalize: Literal["imagenet", "clip"] = "imagenet"
    # the training crop (+ a flip with probability 0.5): random_resized, RandomResizedCrop scale 0.5-1 (the official
    # multimodal recipes', stage 2); multiscale, the official K400 pretraining's GroupMultiScaleCrop (stage 1's
    # default: AlignDataConfig)
    crop: Literal["multiscale", "random_resized"] = "random_resized"


@dataclass
class AlignDataConfig(DataConfig):
    """Stage 1's data: the crop defaults to the official masked pretraining's multi-scale crop (video_sm/datasets/
    build.py DataAugmentationForVideoMAE: GroupMultiScaleCrop(224, [1, .875, .75, .66]) + GroupRandomHorizontalFlip)."""

    crop: Literal["multiscale", "random_resized"] = "multiscale"


@dataclass
class TrainConfig:
    max_steps: int = ranged(1000, ge=1)
    batch_size: int = ranged(8, ge=1)  # per rank and micro-step
    grad_accum: int = ranged(1, ge=1)
    lr: float = ranged(1.5e-4, gt=0)
    min_lr: float = ranged(1e-6, ge=0)
    warmup_steps: int = ranged(100, ge=0)
    weight_decay: float = ranged(0.05, ge=0)
    betas: list[float] = ranged(default_factory=lambda: [0.9, 0.98], ge=0, lt=1)
    clip_grad: float = ranged(1.0, ge=0)  # 0 turns clipping off
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    # fp32: with bf16 and ZeRO-1, gradients accumulate and reduce in fp32 (DeepSpeed's BF16_Optimizer: as torch AMP,
    # which the official code trains with, keeps them) and the optimizer step is a few fused ops over flat groups
    # instead of per-tensor checks (bench/RESULTS.md, issue 23); null: the precision's own dtype (DeepSpeed's default)
    grad_accum_dtype: Optional[Literal["fp32"]] = None
    ckpt_every: int = ranged(500, ge=0)
    keep_last: int = ranged(3, ge=0)
    log_every: int = ranged(1, ge=0)
    seed: int = ranged(42, ge=0)
    out: str = "runs/run"
    nan_policy: Literal["stop", "skip"] = "stop"
    progress: bool = True
    tensorboard: bool = True
    # replay the backbone's blocks as CUDA graphs (pipeline.engine.graphs): removes the host's launch cost that
    # bounds small steps on a GPU (VideoMamba-Ti at 8 frames: 5x faster); CUDA and ZeRO stages 0-2 only
    cuda_graphs: bool = False
    # with cuda_graphs, how many input shapes get graphs of their own (each captured at its first step, in its own
    # memory): 2 covers data.mix=batch's image and video batches; a shape past these runs eagerly
    cuda_graph_shapes: int = ranged(2, ge=1)
    # with cuda_graphs, which of the stage's chains of modules replay: the backbone's blocks (both stages), BERT's
    # text-only layers and its fusion layers (stage 2; each runs once a step over all its rows). A name the stage
    # lacks is warned about and runs eagerly. text and fusion have not yet run on a GPU (bench/RESULTS.md)
    cuda_graph_chains: list[Literal["backbone", "text", "fusion"]] = field(default_factory=lambda: ["backbone"])
    # every this many optimizer steps, the stage's evaluation (stage 2: zero-shot retrieval on `eval.annotations`)
    # runs on the training model and its R@1 goes to metrics.jsonl; 0: never. Every rank runs it (ZeRO-3 gathers
    # weights collectively); it touches neither the data position nor the RNG streams, so exact resume holds
    eval_every: int = ranged(0, ge=0)


@dataclass
class DeepSpeedConfig:
    zero_stage: Literal[0, 1, 2, 3] = 0
    config: Optional[str] = None  # a user's own DeepSpeed JSON, passed through unchanged


@dataclass
class TeacherConfig:
    model: str = "ViT-B-16"  # an open_clip model name
    pretrained: Optional[str] = "openai"  # an open_clip pretrained tag or a checkpoint file
    img_size: int = ranged(224, ge=1)
    # false: the last block's patch tokens @ proj, as the official VideoMamba recipe (--clip_return_cls skips ln_post);
    # true: through ln_post first (UMT's ViT recipe); docs/FIDELITY.md
    ln_post: bool = False
    # true: the student's [cls] is aligned too, to the teacher's [CLS] averaged over the frames (the official
    # --clip_return_cls); false: the patch tokens only
    cls_target: bool = True


@dataclass
class MaskConfig:
    # attention: the official attention-guided mask (patches drawn by the teacher's [cls] attention); docs/FIDELITY.md
    kind: Literal["random", "tube", "frame_row", "clip_row", "attention", "attention_topk"] = "attention"
    ratio: float = ranged(0.8, ge=0, lt=1)
    # stage 2: the ratio of a batch of images (the official 0.5: exp_pt/*/config.py image_mask_ratio), which needs
    # data.mix=batch; None masks images at `ratio` like videos
    image_ratio: Optional[float] = ranged(None, ge=0, lt=1)


@dataclass
class AlignLossConfig:
    kind: Literal["mse", "cosine"] = "mse"


@dataclass
class DistillConfig:
    enabled: bool = False
    checkpoint: Optional[str] = None  # the trained smaller VideoMamba that guides the student
    size: Literal["tiny", "small", "middle", "base"] = "tiny"
    depth: Optional[int] = ranged(None, ge=1)
    embed_dim: Optional[int] = ranged(None, ge=1)
    weight: float = ranged(1.0, ge=0)


@dataclass
class AlignStageConfig:
    """Stage 1: masked alignment of the student's visible tokens to a frozen CLIP-ViT."""

    stage: Literal["align"] = "align"  # what `videomamba pretrain` dispatches on
    model: ModelConfig = field(default_factory=ModelConfig)
    data: AlignDataConfig = field(default_factory=AlignDataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    mask: MaskConfig = field(default_factory=MaskConfig)
    loss: AlignLossConfig = field(default_factory=AlignLossConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)


@dataclass
class TextConfig:
    kind: Literal["bert"] = "bert"  # UMT's BERT with fusion layers (pipeline/models/text.py)
    # a BERT directory in the transformers layout (config.json, weights, vocab) or a hub name in the local cache;
    # nothing is downloaded (`huggingface-cli download bert-base-uncased --local-dir DIR` once, then
    # text.pretrained=DIR)
    pretrained: str = "bert-base-uncased"
    # layers 0..fusion_layer-1 are text-only, the rest cross-attend to the video tokens
    fusion_layer: int = ranged(9, ge=0)
    max_len: int = ranged(32, ge=2)  # token ids per text, [CLS] and [SEP] included
    embed_dim: int = ranged(512, ge=1)  # the joint video-text space of the contrastive loss
    temp: float = ranged(0.07, gt=0)  # the initial temperature (learned, clamped to [0.001, 0.5])


@dataclass
class VideoTextLossConfig:
    vtc: float = ranged(1.0, ge=0)  # weight of the video-text contrastive loss
    vtm: float = ranged(1.0, ge=0)  # video-text matching on hard negatives
    mlm: float = ranged(1.0, ge=0)  # masked language modelling on the cross-modal layers
    align: float = ranged(1.0, ge=0)  # stage 1's unmasked-token alignment to the teacher (0: no teacher is loaded)
    align_kind: Literal["mse", "cosine"] = "mse"
    # each token but [PAD] / [CLS] is masked with this probability (the official 0.5)
    mlm_prob: float = ranged(0.5, gt=0, lt=1)


@dataclass
class RetrievalEvalConfig:
    batch_size: int = ranged(16, ge=1)  # videos encoded per forward
    # UMT's k_test: each query's top k re-ranked by the model's matching head, when it has one; 0: never
    rerank_k: int = ranged(128, ge=0)
    rerank_batch: int = ranged(512, ge=1)  # (text, video) pairs per call of the fusion layers
    num_workers: int = ranged(2, ge=0)  # reading (and, with the CPU decoder, decoding) processes
    decoder: Literal["auto", "cpu", "dali"] = "auto"  # auto: DALI where it and a GPU are present
    # false: a missing or undecodable video stops the evaluation before scoring, listing them; true: the rest are
    # scored and every headline says "on N of M videos". null: false for the benchmarks, true for `synthetic`
    allow_missing: Optional[bool] = None


@dataclass
class TrainingEvalConfig(RetrievalEvalConfig):
    """Stage 2's zero-shot retrieval every train.eval_every steps (`videomamba eval`'s eval.* keys, plus the set)."""

    annotations: Optional[str] = None  # the eval set's annotations (any format `videomamba eval` reads)
    videos: Optional[str] = None  # the folder its videos are in
    dataset: Optional[str] = None  # the benchmark; null: from the file or its name


@dataclass
class VideoTextStageConfig:
    """Stage 2: joint video-text pretraining of the stage-1 backbone with a text encoder and a cross-modal decoder."""

    stage: Literal["video_text"] = "video_text"
    init: Optional[str] = None  # a stage-1 run (folder or checkpoint): its backbone; a stage-2 run: its whole model
    model: ModelConfig = field(default_factory=ModelConfig)
    text: TextConfig = field(default_factory=TextConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    mask: MaskConfig = field(default_factory=MaskConfig)  # the official video_mm: attention, 0.8
    loss: VideoTextLossConfig = field(default_factory=VideoTextLossConfig)
    eval: TrainingEvalConfig = field(default_factory=TrainingEvalConfig)


@dataclass
class RetrievalModelConfig:
    kind: Literal["open_clip", "videomamba"] = "open_clip"  # open_clip: an image CLIP, frames mean-pooled (meanP);
    # videomamba: a stage-2 run (--checkpoint: its folder or one checkpoint), with its matching head for re-ranking
    name: str = "ViT-B-16"  # the open_clip model name; its weights come from `videomamba eval --checkpoint`
    size: Literal["tiny", "small", "middle", "base"] = "middle"  # the VideoMamba of a released video_mm .pth file


@dataclass
class RetrievalDataConfig:
    # null: a videomamba run's own data.num_frames / data.img_size (its config.yaml), else 8 frames of 224 px
    num_frames: Optional[int] = ranged(None, ge=1)  # frames per video: UMT's "middle" sampling
    img_size: Optional[int] = ranged(None, ge=1)  # frame side
    # auto: the model's own (a released video_mm checkpoint: ImageNet's, as the official evaluation; a run of this
    # project: the data.normalize it was trained with, from its config.yaml; open_clip: the model's); imagenet or
    # clip forces one
    normalize: Literal["auto", "imagenet", "clip"] = "auto"


@dataclass
class RetrievalConfig:
    """`videomamba eval`: zero-shot text-video retrieval of a video-text model."""

    model: RetrievalModelConfig = field(default_factory=RetrievalModelConfig)
    text: TextConfig = field(default_factory=TextConfig)  # the text encoder of a released video_mm .pth file
    data: RetrievalDataConfig = field(default_factory=RetrievalDataConfig)
    eval: RetrievalEvalConfig = field(default_factory=RetrievalEvalConfig)


# ------------------------------------------------------------------------------------------------------ loading
def load_config(schema: type, path: Optional[str] = None, overrides: typing.Sequence[str] = ()) -> Any:
    """Returns an instance of `schema` from the YAML file at `path` (with its `_base_` files) and the overrides."""
    flat: dict[str, tuple[Any, str]] = {}
    if path is not None:
        flat.update(_flatten_file(schema, path, seen=()))
    for item in overrides:
        key, value = _parse_override(item)
        flat.update(_flatten(schema, _nest(key, value), COMMAND_LINE, prefix=""))
    return _build(schema, flat, prefix="")


def read_json(url: str, what: str, label: str = "", error: type[ConfigError] = ConfigError) -> Any:
    """Returns the JSON value in the file at `url` (any fsspec URL). A missing file raises `error`
    "{label}{what} not found: {url}", a file that is not JSON "{label}{url}: not valid JSON (...)"."""
    try:
        with fsspec.open(url, "r") as f:
            return json.load(f)
    except FileNotFoundError:
        raise error(f"{label}{what} not found: {url}") from None
    except json.JSONDecodeError as e:
        raise error(f"{label}{url}: not valid JSON ({e})") from None


def resolved_dict(cfg: Any) -> dict:
    """Returns the config as plain data (what `config.yaml` beside a run's outputs holds)."""
    return dataclasses.asdict(cfg)


def write_resolved(cfg: Any, url: str) -> None:
    """Writes the fully resolved config as YAML to `url` (any fsspec URL)."""
    with fsspec.open(url, "w") as f:
        yaml.safe_dump(resolved_dict(cfg), f, sort_keys=False)


def _parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item or item.startswith("="):
        raise ConfigError(f"{COMMAND_LINE}: override {item!r} is not of the form key.sub=value")
    key, raw = item.split("=", 1)
    try:
        value = yaml_load(raw) if raw != "" else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"{COMMAND_LINE}: override {item!r}: value is not valid YAML ({e})") from None
    return key.strip(), value


def _nest(dotted: str, value: Any) -> dict:
    out: dict = {}
    node = out
    parts = dotted.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return out


def _flatten_file(schema: type, path: str, seen: tuple[str, ...]) -> dict[str, tuple[Any, str]]:
    if path in seen:
        raise ConfigError(f"{path}: `_base_` files include each other in a cycle: {' -> '.join(seen + (path,))}")
    try:
        with fsspec.open(path, "r") as f:
            raw = yaml_load(f) or {}
    except FileNotFoundError:
        where = f" (a `_base_` of {seen[-1]})" if seen else ""
        raise ConfigError(f"config file not found: {path}{where}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of keys at the top level, got {type(raw).__name__}")
    flat: dict[str, tuple[Any, str]] = {}
    bases = raw.pop(BASE_KEY, [])
    for base in [bases] if isinstance(bases, str) else bases:
        base_path = base if "://" in base or os.path.isabs(base) else os.path.join(os.path.dirname(path), base)
        flat.update(_flatten_file(schema, os.path.normpath(base_path), seen + (path,)))
    flat.update(_flatten(schema, raw, path, prefix=""))
    return flat


def _flatten(schema: type, raw: dict, source: str, prefix: str) -> dict[str, tuple[Any, str]]:
    """Returns {dotted key: (value, source)} for the leaves of `raw`, checking each key against `schema`."""
    hints = typing.get_type_hints(schema)
    names = [f.name for f in dataclasses.fields(schema)]
    flat: dict[str, tuple[Any, str]] = {}
    for key, value in raw.items():
        dotted = prefix + str(key)
        if key not in names:
            typed = _leaf_paths(value, dotted) if isinstance(value, dict) and value else [dotted]
            shown = typed[0] if len(typed) == 1 else dotted
            raise ConfigError(f"{source}: unknown key {shown!r}{_suggestion(schema, prefix, typed)}")
        sub = hints[key]
        if dataclasses.is_dataclass(sub):
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: {dotted!r} is a section; expected a mapping, got {value!r}")
            flat.update(_flatten(sub, value, source, prefix=dotted + "."))
        elif _entry_schema(sub) is not None:
            flat = _with_entries(flat, _entry_schema(sub), value, source, dotted)
        else:
            flat[dotted] = (value, source)
    return flat


def _entry_schema(tp: Any) -> Optional[type]:
    """The entries' dataclass of a `dict[str, SomeDataclass]` field (named entries, e.g. a recipe's corpora), else
    None."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) is dict and len(args) == 2 and dataclasses.is_dataclass(args[1]):
        return args[1]
    return None


def _with_entries(flat: dict[str, tuple[Any, str]], schema: type, value: Any, source: str,
                  dotted: str) -> dict[str, tuple[Any, str]]:
    """`flat` with the named entries of `value` added key by key (so `corpora.webvid.input=URL` changes one key of
    one entry); an entry given as null is left out. Each entry's presence is kept as the key `dotted.name` (its
    value None for a left-out entry)."""
    if not isinstance(value, dict):
        raise ConfigError(f"{source}: {dotted!r} holds named entries; expected a mapping, got {value!r}")
    for name, entry in value.items():
        key = f"{dotted}.{name}"
        if entry is None:
            flat[key] = (None, source)
            continue
        if not isinstance(entry, dict):
            raise ConfigError(f"{source}: {key!r} is an entry; expected a mapping, got {entry!r}")
        flat[key] = ({}, source)
        flat.update(_flatten(schema, entry, source, prefix=key + "."))
    return flat


def _suggestion(schema: type, prefix: str, typed: list[str]) -> str:
    """Returns ' (did you mean ...?)' for the closest valid key to a typed one, or the valid keys of the section.
    `typed` holds the full dotted keys as written, so a mistyped section (`trian.max_steps`) is matched by what
    lies under it (`train.max_steps`), not by its name alone."""
    candidates = _all_keys(schema, prefix)
    for key in typed:
        close = difflib.get_close_matches(key, candidates, n=1, cutoff=0.6)
        if not close:
            name = key[len(prefix):].split(".")[0]
            here = difflib.get_close_matches(name, [f.name for f in dataclasses.fields(schema)], n=1, cutoff=0.5)
            close = [prefix + c for c in here]
        if close:
            return f" (did you mean {close[0]!r}?)"
    return f"; valid keys here: {', '.join(candidates)}"


def _leaf_paths(raw: dict, prefix: str) -> list[str]:
    """The dotted keys of the leaves under a mapping (a section as the user wrote it)."""
    paths = []
    for key, value in raw.items():
        dotted = f"{prefix}.{key}"
        paths += _leaf_paths(value, dotted) if isinstance(value, dict) and value else [dotted]
    return paths


def _all_keys(schema: type, prefix: str) -> list[str]:
    hints = typing.get_type_hints(schema)
    keys = []
    for f in dataclasses.fields(schema):
        if dataclasses.is_dataclass(hints[f.name]):
            keys += _all_keys(hints[f.name], prefix + f.name + ".")
        else:
            keys.append(prefix + f.name)
    return keys


def _build(schema: type, flat: dict[str, tuple[Any, str]], prefix: str) -> Any:
    hints = typing.get_type_hints(schema)
    kwargs = {}
    for f in dataclasses.fields(schema):
        dotted = prefix + f.name
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            kwargs[f.name] = _build(tp, flat, dotted + ".")
        elif _entry_schema(tp) is not None:
            names = dict.fromkeys(k[len(dotted) + 1:].split(".")[0] for k in flat if k.startswith(dotted + "."))
            kwargs[f.name] = {name: _build(_entry_schema(tp), flat, f"{dotted}.{name}.") for name in names
                              if flat.get(f"{dotted}.{name}", ({}, ""))[0] is not None}
        elif dotted in flat:
            value, source = flat[dotted]
            kwargs[f.name] = _in_range(f, _checked(tp, value, dotted, source), dotted, source)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"missing required key {dotted!r}")
    return schema(**kwargs)


def _checked(tp: Any, value: Any, key: str, source: str) -> Any:
    """Returns `value` converted to `tp` where that is lossless (int → float), else raises naming key and source."""
    ok, converted = _convert(tp, value)
    if not ok:
        raise ConfigError(f"{source}: {key!r} expects {_type_name(tp)}, got {value!r} ({type(value).__name__})")
    return converted


def _in_range(f: dataclasses.Field, value: Any, key: str, source: str) -> Any:
    """Returns `value` when it (each item of a list) is finite and within the field's `ranged` bounds, else raises
    naming key and source (a NaN fails every bound)."""
    ge, gt, le, lt = f.metadata.get("range", (None, None, None, None))
    for item in value if isinstance(value, list) else value.values() if isinstance(value, dict) else [value]:
        if not isinstance(item, (int, float)) or isinstance(item, bool):
            continue
        if isinstance(item, float) and not math.isfinite(item):
            raise ConfigError(f"{source}: {key!r} must be a finite number, got {item!r}")
        bad = ((ge is not None and not item >= ge) or (gt is not None and not item > gt) or
               (le is not None and not item <= le) or (lt is not None and not item < lt))
        if bad:
            bounds = [f"{op} {b}" for op, b in ((">=", ge), (">", gt), ("<=", le), ("<", lt)) if b is not None]
            raise ConfigError(f"{source}: {key!r} must be {' and '.join(bounds)}, got {item!r}")
    return value


def _convert(tp: Any, value: Any) -> tuple[bool, Any]:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return True, value
    if origin in (Union, types.UnionType):
        for arg in args:
            ok, converted = _convert(arg, value)
            if ok:
                return True, converted
        return False, value
    if tp is type(None):
        return value is None, value
    if origin is Literal:
        return any(value == a and type(value) is type(a) for a in args), value
    if origin is list:
        if not isinstance(value, list):
            return False, value
        items = [_convert(args[0], v) if args else (True, v) for v in value]
        return all(ok for ok, _ in items), [v for _, v in items]
    if origin is dict or tp is dict:
        return isinstance(value, dict), value
    if tp is bool:
        return isinstance(value, bool), value
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return True, float(value)
        return False, value
    if tp is str:
        return isinstance(value, str), value
    return isinstance(value, tp), value


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin is list:
        return f"a list of {_type_name(args[0])}" if args else "a list"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))
