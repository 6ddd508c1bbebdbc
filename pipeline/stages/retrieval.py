"""`videomamba eval`: zero-shot text-video retrieval, scored as the field scores it (UMT's protocol; see
docs/EVAL_PROTOCOL.md): R@1/5/10 both ways (UMT's txt_r*/img_r*, r_mean, in %) and MdR/MnR, for the contrastive
similarity and, for a model with a matching head, UMT's re-ranking of each query's top eval.rerank_k.

--annotations takes UMT's JSON (`video` or `image` entries), JSON Lines, or CLIP4Clip's MSRVTT_JSFUSION_test.csv or
MSRVTT_data.json (`pipeline.eval.annotations`). --dataset names the benchmark (its text length, paragraph queries,
DiDeMo's first 30 s); left out, it comes from the file (CLIP4Clip's files: msrvtt) or its name (msrvtt_ret_test1k.json,
didemo_ret_test.json, anet_ret_val.json, lsmdc_ret_test_1000.json, msvd_ret_test.json, ...).
  msrvtt, lsmdc, synthetic   one caption per video (`videomamba synth` writes the MSRVTT format)
  msvd                       several captions per video, each its own query
  didemo, anet               paragraph retrieval: a video's sentences joined into one query
  coco, flickr               image-text retrieval (`image` entries; one frame)

A missing or undecodable video stops the evaluation before scoring and lists them (exit 1), unless
eval.allow_missing=true: then the rest is scored and every headline says "on N of M videos".

Main keys (configs/eval_retrieval.yaml; override any as key.sub=value):
  model.kind        open_clip: an image CLIP, frame features mean-pooled over time (CLIP4Clip's zero-shot meanP),
                    its own preprocessing; videomamba: a stage-2 run, fed as the official evaluation feeds VideoMamba
  model.name        the open_clip model name (ViT-B-16, ..., or a custom one such as the demo's tiny-clip, whose
                    <name>.json sits beside the checkpoint)
  model.size, text.*  for a released video_mm .pth (model.kind=videomamba): the VideoMamba size (middle) and the
                    BERT (text.pretrained: a directory or a cached hub name; fusion_layer 9, max_len 32, embed_dim 512)
  data.num_frames   frames per video          data.img_size   frame side in pixels
                    (null, the default: a videomamba run's own, from its config.yaml; otherwise 8 and 224)
  data.normalize    auto (the model's own: open_clip's; a stage-2 run's training normalization) | imagenet | clip
  eval.batch_size   videos per forward        eval.num_workers   reading/decoding processes (0: in this process)
  eval.decoder      auto | cpu | dali          eval.rerank_k      UMT's k_test (128)
  eval.rerank_batch (text, video) pairs per call of the fusion layers
  eval.allow_missing  see above

Writes OUT/retrieval_<dataset>.json (metrics, counts, skipped videos, timing, the resolved config), .md (the table,
also printed), .png (R@1/5/10 bar chart) and .scores.npz (every score matrix: `pipeline.eval.scores`).

Examples:
  videomamba eval --config configs/eval_retrieval.yaml --checkpoint openai \\
      --annotations ann/MSRVTT_JSFUSION_test.csv --videos s3://bucket/msrvtt/videos --out results/
  videomamba eval --config configs/eval_retrieval.yaml --checkpoint videomamba_m16_25M_f8_res224.pth \\
      --annotations ann/msrvtt_ret_test1k.json --videos msrvtt/videos \\
      model.kind=videomamba model.size=middle text.pretrained=bert-base-uncased
  videomamba eval --config configs/eval_retrieval.yaml --checkpoint demo_out/teacher/tiny_clip.pt \\
      --dataset synthetic --annotations demo_out/corpus/eval/msrvtt_test.json --videos demo_out/corpus/eval/videos \\
      model.name=tiny-clip data.img_size=64
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import time
from dataclasses import dataclass
from typing import Optional

import fsspec
import open_clip
import torch

from pipeline.config import (DataConfig, ModelConfig, RetrievalConfig, RetrievalModelConfig, TextConfig,
                             VideoTextStageConfig, load_config, resolved_dict)
from pipeline.data.transforms import NORMALIZATIONS, VIDEOMAMBA_EVAL_FRAMES, run_eval_frames
from pipeline.engine.weights import run_weights
from pipeline.errors import ConfigError
from pipeline.eval.annotations import read_annotations
from pipeline.eval.models import OpenClipMeanP, VideoMambaRetrieval, VideoTextModel
from pipeline.eval.protocol import BENCHMARKS, DATASETS
from pipeline.eval.report import headline, result_markdown, write_outputs
from pipeline.eval.retrieval import MissingVideos, NoUsableVideos, check_retrieval_config, scored_retrieval
from pipeline.models.factory import build_video_text_model
from pipeline.models.teacher import OpenClipKeys, create_open_clip
from pipeline.models.official import is_official_video_text, load_video_text_weights, read_checkpoint
from pipeline.stages.base import run_normalization

DEFAULT_FRAMES, DEFAULT_IMG_SIZE = 8, 224  # data.num_frames / data.img_size when null and not taken from a run


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, metavar="FILE", help="the eval YAML config (path or URL)")
    parser.add_argument("--checkpoint", required=True, metavar="PATH",
                        help="the model's weights: for model.kind=open_clip a checkpoint file/URL or a pretrained tag; "
                             "for model.kind=videomamba a stage-2 run folder or one of its checkpoints, or a released "
                             "video_mm .pth file (with model.size=middle text.pretrained=BERT_DIR)")
    parser.add_argument("--dataset", metavar="|".join(DATASETS),
                        help="the benchmark --annotations is (default: from the file or its name; see above)")
    parser.add_argument("--annotations", required=True, metavar="FILE",
                        help="the test annotations (path or URL): UMT json, JSON Lines, or CLIP4Clip's MSRVTT files")
    parser.add_argument("--videos", required=True, metavar="DIR|URL", help="the folder the annotations' videos are in")
    parser.add_argument("--out", default="eval_out", metavar="DIR", help="where the results go (default: %(default)s)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value",
                        help="config overrides, e.g. model.name=tiny-clip data.num_frames=12")


def run(args: argparse.Namespace) -> int:
    cfg = load_config(RetrievalConfig, args.config, args.overrides)
    try:
        result = evaluate_retrieval(cfg, args.checkpoint, args.dataset, args.annotations, args.videos, args.out,
                                    progress=not args.no_progress)
    except NoUsableVideos as e:
        print(f"videomamba eval: {e}", flush=True)
        return 1
    except MissingVideos as e:
        print(f"videomamba eval: {e}", flush=True)
        print("\n".join(f"  {s['video']}: {s['kind']} ({s['reason']})" for s in e.skipped), flush=True)
        return 1
    print(result_markdown(result), flush=True)
    print(f"videomamba eval: {headline(result)}; wrote {result['outputs']['json']}, .md, .png and "
          f"{result['outputs']['scores']}", flush=True)
    return 0


def evaluate_retrieval(cfg: RetrievalConfig, checkpoint: str, dataset: Optional[str], annotations: str, videos: str,
                       out: str, progress: bool = True) -> dict:
    """Runs the evaluation, writes OUT/retrieval_<dataset>.json/.md/.png/.scores.npz and returns the JSON's
    content."""
    started = time.time()
    if dataset is not None and dataset not in DATASETS:
        raise ConfigError(f"--dataset {dataset!r} is not one of {', '.join(DATASETS)}")
    ann = read_annotations(annotations, dataset)
    cfg = with_run_frames(cfg, checkpoint, BENCHMARKS[ann.dataset].num_frames)
    check_retrieval_config(cfg)
    fs, path = fsspec.core.url_to_fs(videos)
    if not fs.isdir(path):
        raise ConfigError(f"--videos {videos}: no such folder")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = load_retrieval_model(cfg.model, checkpoint, cfg.data.img_size, device, cfg.data.num_frames, cfg.text)
    model.frames = normalized_as(model.frames, cfg.data.normalize)
    evaluation = scored_retrieval(model, cfg, ann, videos, device, progress)
    result = evaluation.result
    described = (f"{cfg.model.kind} {cfg.model.name} (frame features mean-pooled, meanP)"
                 if cfg.model.kind == "open_clip" else "videomamba stage-2 video-text model")
    result.update(annotations=annotations, videos=videos, checkpoint=checkpoint, model=described,
                  seconds=round(time.time() - started, 1), config=resolved_dict(cfg))
    result["outputs"] = write_outputs(result, out, ann.dataset, evaluation.scores)
    return result


def normalized_as(frames, normalize: str):
    """The model's test frames with data.normalize's mean and std (auto: the model's own)."""
    if normalize == "auto":
        return frames
    mean, std = NORMALIZATIONS[normalize]
    return dataclasses.replace(frames, mean=mean, std=std)


def with_run_frames(cfg: RetrievalConfig, checkpoint: str, default_frames: int = DEFAULT_FRAMES) -> RetrievalConfig:
    """`cfg` with data.num_frames / data.img_size filled where they are null: for a videomamba run, the run's own
    (data.* of its config.yaml); otherwise, and for a checkpoint outside a run, the benchmark's frame count
    (`default_frames`: 8, an image set 1) and 224."""
    if cfg.data.num_frames is not None and cfg.data.img_size is not None:
        return cfg
    run = load_config(VideoTextStageConfig, run_config(checkpoint)).data if _in_a_run(cfg, checkpoint) else None
    cfg = copy.deepcopy(cfg)
    if cfg.data.num_frames is None:
        cfg.data.num_frames = run.num_frames if run is not None else default_frames
    if cfg.data.img_size is None:
        cfg.data.img_size = run.img_size if run is not None else DEFAULT_IMG_SIZE
    return cfg


def _in_a_run(cfg: RetrievalConfig, checkpoint: str) -> bool:
    return cfg.model.kind == "videomamba" and os.path.isdir(checkpoint) and _found_run_config(checkpoint) is not None


# ---------------------------------------------------------------------------------- the model from --checkpoint
def load_retrieval_model(model_cfg: RetrievalModelConfig, checkpoint: str, img_size: int, device: torch.device,
                         num_frames: int = DEFAULT_FRAMES, text_cfg: Optional[TextConfig] = None) -> VideoTextModel:
    """Returns the model of `model_cfg.kind` with the weights of `checkpoint` (for open_clip: a checkpoint file or
    URL with `<model.name>.json` beside it for a custom model, or a pretrained tag; for videomamba: a stage-2 run, or
    a checkpoint file, e.g. a released video_mm one, of the model that model.size and `text_cfg` describe)."""
    if model_cfg.kind == "open_clip":
        model = create_open_clip(model_cfg.name, checkpoint, img_size, OpenClipKeys("model.name", "--checkpoint"))
        return OpenClipMeanP(model, open_clip.get_tokenizer(model_cfg.name), device)
    if model_cfg.kind == "videomamba" and text_cfg is not None and _is_file(checkpoint):
        return _checkpoint_file_model(model_cfg, text_cfg, checkpoint, num_frames, img_size, device)
    if model_cfg.kind == "videomamba":
        return _stage2_model(checkpoint, num_frames, img_size, device)
    raise ValueError(f"model.kind {model_cfg.kind!r} has no implementation")


def _stage2_model(checkpoint: str, num_frames: int, img_size: int, device: torch.device) -> VideoMambaRetrieval:
    config = run_config(checkpoint)
    cfg = load_config(VideoTextStageConfig, config)
    state = run_weights(checkpoint, "--checkpoint", "stage-2 run")
    if state is None:
        raise ConfigError(f"--checkpoint {checkpoint}: model.kind=videomamba needs a stage-2 run folder or one of its "
                          f"checkpoint folders")
    model, tokenizer = build_video_text_model(cfg, num_frames, img_size, bert_weights=False)
    state = {k: v for k, v in state.items() if not k.startswith("align_head.")}
    try:  # position embeddings fitted to this frame count and size
        load_video_text_weights(model, state)
    except ValueError as e:
        raise ConfigError(f"--checkpoint {checkpoint} does not fit the model of {config}: {e}") from None
    # a run of this project is fed the official test geometry with the normalization it was trained with
    return VideoMambaRetrieval(model.to(device).eval(), tokenizer, cfg.text.max_len, device,
                               run_eval_frames(run_normalization(config)))


def _checkpoint_file_model(model_cfg: RetrievalModelConfig, text_cfg: TextConfig, checkpoint: str, num_frames: int,
                           img_size: int, device: torch.device) -> VideoMambaRetrieval:
    """A video-text model from one checkpoint file, of VideoMamba `model.size` and the BERT of `text.*`: a released
    video_mm .pth (fed as the official evaluation feeds it, ImageNet-normalized) or a state dict in the project's
    layout (fed with the normalization of the run it lies in, or else the project's default data.normalize)."""
    model, tokenizer = build_video_text_model(_FileModel(ModelConfig(size=model_cfg.size), text_cfg), num_frames,
                                              img_size, bert_weights=False)
    try:
        state = read_checkpoint(checkpoint)
        official = is_official_video_text(state)
        load_video_text_weights(model, state)
    except (ValueError, OSError) as e:
        raise ConfigError(f"--checkpoint {checkpoint}: {e}") from None
    found = _found_run_config(checkpoint)
    frames = (VIDEOMAMBA_EVAL_FRAMES if official
              else run_eval_frames(run_normalization(found) if found else DataConfig.normalize))
    return VideoMambaRetrieval(model.to(device).eval(), tokenizer, text_cfg.max_len, device, frames)


@dataclass
class _FileModel:
    """What the model builder reads of a stage config, for a checkpoint file outside a run."""
    model: ModelConfig
    text: TextConfig


def _is_file(checkpoint: str) -> bool:
    fs, path = fsspec.core.url_to_fs(checkpoint)
    return fs.isfile(path)


def run_config(checkpoint: str) -> str:
    """The config.yaml of the run that `checkpoint` (the run folder, its checkpoints/ or one checkpoint) belongs to."""
    found = _found_run_config(checkpoint)
    if found is None:
        raise ConfigError(f"--checkpoint {checkpoint}: no config.yaml in the run folder above it (a stage-2 run "
                          f"writes one)")
    return found


def _found_run_config(checkpoint: str) -> Optional[str]:
    path = os.path.abspath(checkpoint)
    for _ in range(3):
        candidate = os.path.join(path, "config.yaml")
        if os.path.isfile(candidate):
            return candidate
        path = os.path.dirname(path)
    return None
