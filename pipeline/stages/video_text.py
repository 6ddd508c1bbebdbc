"""Stage 2: joint video-text pretraining (UMT's second stage) of the stage-1 backbone.

Wires the parts: the stage-1 backbone (weights from `init`: a stage-1 run, or a whole stage-2 model from a released
video_mm .pth file or a stage-2 checkpoint file) with the pretrained BERT of `text.pretrained`, its fusion layers and
the heads (`pipeline.models.video_text.VideoTextModel`, one module so DeepSpeed trains all of it), the frozen teacher
for the unmasked-token alignment (only when `loss.align` > 0), the stream of video-text and image-text shards, and
the objective (`pipeline.objectives.VideoTextObjective`: VTC, VTM on hard negatives, MLM, alignment), handed to the
engine.
"""
from __future__ import annotations

import logging
import os
from typing import Optional

import fsspec
from torch import Tensor, nn

from pipeline.config import VideoTextStageConfig
from pipeline.data import build_loader
from pipeline.engine import Trainer
from pipeline.engine.weights import run_weights
from pipeline.errors import ConfigError
from pipeline.eval.retrieval import training_evaluation
from pipeline.masking import ATTENTION_KINDS
from pipeline.models.factory import build_video_text_model
from pipeline.models.official import load_video_text_weights
from pipeline.models.text import bert_config, resolve_pretrained
from pipeline.models.teacher import build_teacher, check_teacher_grid
from pipeline.models.video_text import VideoTextModel
from pipeline.objectives import MaskedAlignment, VideoTextObjective
from pipeline.stages.base import (Stage, StageParts, begin_run, check_image_frames, check_inputs, check_mask_on_grid,
                                  check_teacher_size, run_normalization, run_summary)

log = logging.getLogger(__name__)


def train_video_text(cfg: VideoTextStageConfig, resume: Optional[str] = None) -> dict:
    """Runs stage 2 as `cfg` says (resume: None, "auto" or a checkpoint path); returns a summary of the run."""
    check_config(cfg)
    teacher = build_teacher(cfg.teacher) if cfg.loss.align > 0 else None
    if teacher is not None:
        check_teacher_grid(teacher, cfg.data.img_size, cfg.model.patch_size)
    info = begin_run(cfg)
    parts = video_text_parts(cfg, teacher)
    evaluate = (training_evaluation(cfg.eval, cfg.eval.annotations, cfg.eval.videos, cfg.eval.dataset,
                                    cfg.data.num_frames, cfg.data.img_size, parts.tokenizer, cfg.text.max_len,
                                    cfg.data.normalize)
                if cfg.train.eval_every > 0 else None)
    data = build_loader(cfg.data, cfg.train.batch_size, info.rank, info.world_size, cfg.train.seed,
                        run_dir=cfg.train.out, device=info.device)
    summary = Trainer(parts.model, parts.objective, data, cfg.train, cfg.deepspeed, cfg.train.out,
                      graph_chains=parts.graph_chains, evaluate=evaluate).fit(resume)
    return run_summary(cfg, summary)


def video_text_parts(cfg: VideoTextStageConfig, teacher: Optional[nn.Module]) -> StageParts:
    """Builds stage 2's video-text model (with the weights of `init`, when set), its tokenizer and its objective
    around the frozen `teacher` (None when loss.align is 0; else one whose patch grid is the student's:
    `check_teacher_grid`), as `cfg` says. Call it after `begin_run`, which seeds the initial weights."""
    model, tokenizer = build_video_text_model(cfg, cfg.data.num_frames, cfg.data.img_size,
                                              teacher.width if teacher is not None else None)
    if cfg.init and os.path.isdir(cfg.init):  # a run folder: stage 1's, or stage 2's for the unmasked phase
        _warn_on_another_normalization(cfg)
        state = run_weights(cfg.init, "init")
        if state is not None and _is_stage2(state):
            _load_stage2(model, state, cfg.init)
        else:
            _load_stage1(model, state, cfg.init)
    elif cfg.init:
        _load_checkpoint_file(model, cfg.init)
    grid = model.backbone.patch_grid
    alignment = (MaskedAlignment(teacher, grid, cfg.mask.kind, cfg.mask.ratio, cfg.loss.align_kind,
                                 cfg.model.tubelet_size, cls_target=cfg.teacher.cls_target)
                 if teacher is not None else None)
    weights = {"vtc": cfg.loss.vtc, "vtm": cfg.loss.vtm, "mlm": cfg.loss.mlm, "align": cfg.loss.align}
    objective = VideoTextObjective(tokenizer, cfg.text.max_len, grid, cfg.mask.kind, cfg.mask.ratio, weights,
                                   cfg.loss.mlm_prob, alignment, image_ratio=cfg.mask.image_ratio)
    chains = {"backbone": model.backbone.chained_blocks(), "text": model.text_encoder.text_layers(),
              "fusion": model.text_encoder.fusion_layers()}
    return StageParts(model, objective, chains, teacher, tokenizer)


def _warn_on_another_normalization(cfg: VideoTextStageConfig) -> None:
    """Logs a warning when the run `init` names was trained on frames normalized otherwise than this run's
    data.normalize (the backbone then sees inputs shifted from those it learnt on)."""
    folder = os.path.abspath(cfg.init)
    for _ in range(3):  # the run folder, or one of its checkpoints (checkpoints/<tag>)
        found = os.path.join(folder, "config.yaml")
        if os.path.isfile(found):
            trained = run_normalization(found)
            if trained != cfg.data.normalize:
                log.warning("init=%s was trained with data.normalize=%s, this run uses %s: set data.normalize=%s to "
                            "feed the backbone what it learnt on", cfg.init, trained, cfg.data.normalize, trained)
            return
        folder = os.path.dirname(folder)


def _is_stage2(state: dict[str, Tensor]) -> bool:
    """True for a stage-2 run's weights (more than a stage-1 student's backbone and heads)."""
    return any(not k.startswith(("backbone.", "align_head.", "distill_head.")) for k in state)


def _load_stage2(model: VideoTextModel, state: dict[str, Tensor], source: str) -> None:
    """Loads a stage-2 run's whole model: the start of stage 2's unmasked phase (the official recipe's
    `*_unmasked` configs load the masked run's checkpoint, videomamba/video_mm/exp_pt/videomamba_middle_5m_unmasked/
    config.py `pretrained_path`). The alignment head is loaded when both have it (the unmasked phase has none)."""
    own = model.state_dict()
    optional = ("align_head.",)
    missing = [k for k in own if k not in state and not k.startswith(optional)]
    unexpected = [k for k in state if k not in own and not k.startswith(optional)]
    if missing or unexpected:
        raise ConfigError(f"init={source}: a stage-2 run whose model does not fit this config (missing "
                          f"{missing[:3]}, unexpected {unexpected[:3]})")
    try:
        model.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
    except RuntimeError as e:
        raise ConfigError(f"init={source}: its weights do not fit model.* / text.* of this config "
                          f"({str(e).splitlines()[0]} ...)") from None
    log.info("stage 2 starts from %s: the whole stage-2 model", source)


def _load_checkpoint_file(model: VideoTextModel, path: str) -> None:
    """Loads a whole stage-2 model from a file: a released video_mm checkpoint or a state dict in the project's
    layout (position embeddings fitted to this run's frames and size)."""
    try:
        notes = load_video_text_weights(model, path)
    except (ValueError, OSError) as e:
        raise ConfigError(f"init={path}: {e}") from None
    log.info("stage 2 starts from %s (the whole video-text model)%s", path,
             "".join(f"\n  {note}" for note in notes))


def _load_stage1(model: VideoTextModel, state: Optional[dict[str, Tensor]], source: str) -> None:
    """Loads a stage-1 run's backbone (all of it: a stage-1 student is a backbone plus heads) and, when the
    widths agree, its alignment head into the stage-2 model."""
    if state is None:
        raise ConfigError(f"init={source} is not a stage-1 run folder or checkpoint directory")
    backbone = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
    if not backbone:
        raise ConfigError(f"init={source}: the checkpoint holds no backbone.* weights (is it a stage-1 run?)")
    try:
        model.backbone.load_state_dict(backbone, strict=True)
    except RuntimeError as e:
        raise ConfigError(f"init={source}: its backbone does not fit model.* of this config "
                          f"({str(e).splitlines()[0]} ...)") from None
    head = {k[len("align_head."):]: v for k, v in state.items() if k.startswith("align_head.")}
    own = model.align_head.state_dict() if model.align_head is not None else {}
    if own and head.keys() == own.keys() and all(head[k].shape == v.shape for k, v in own.items()):
        model.align_head.load_state_dict(head)  # as the official stage 2 starts from stage 1's clip_decoder
        log.info("stage 2 starts from %s: backbone and alignment head", source)
    elif own and head:
        log.warning("stage 2 starts from %s: backbone; its alignment head (%s) does not fit this run's (another "
                    "model.align_head or teacher width), which starts fresh", source, ", ".join(sorted(head)))
    else:
        log.info("stage 2 starts from %s: backbone", source)


def check_config(cfg: VideoTextStageConfig) -> None:
    """Raises ConfigError, before any work, for missing training data, an unusable DeepSpeed file, a text model
    that cannot be built, or a mask that cannot be made on the student's token grid."""
    check_inputs(cfg)
    check_text(cfg.text)
    if cfg.init and not os.path.isdir(cfg.init) and not _file_exists(cfg.init):
        raise ConfigError(f"init={cfg.init}: no such run folder or checkpoint file")
    if cfg.loss.align > 0:
        check_teacher_size(cfg, " (or loss.align=0)")
    if cfg.mask.kind in ATTENTION_KINDS and cfg.loss.align <= 0 and cfg.mask.ratio > 0:
        raise ConfigError(f"mask.kind={cfg.mask.kind} needs the teacher's attention: set loss.align > 0 or another "
                          f"kind")
    if cfg.mask.ratio > 0:
        check_mask_on_grid(cfg)
    if cfg.mask.image_ratio is not None:
        if cfg.data.mix != "batch":
            raise ConfigError(f"mask.image_ratio={cfg.mask.image_ratio} masks whole batches of images, which needs "
                              f"data.mix=batch (data.mix={cfg.data.mix} mixes images and videos in a batch)")
        if cfg.mask.ratio == 0 and cfg.mask.image_ratio > 0:
            raise ConfigError(f"mask.image_ratio={cfg.mask.image_ratio} with mask.ratio=0: the unmasked phase "
                              f"masks nothing; set mask.image_ratio=null")
        check_image_frames(cfg, cfg.mask.image_ratio, "mask.image_ratio")
    else:
        check_image_frames(cfg, cfg.mask.ratio, "mask.ratio")
    if cfg.train.eval_every < 0:
        raise ConfigError(f"train.eval_every={cfg.train.eval_every}: must be at least 0 (0: no evaluation)")
    if cfg.train.eval_every > 0 and not (cfg.eval.annotations and cfg.eval.videos):
        raise ConfigError(f"train.eval_every={cfg.train.eval_every} needs an eval set: eval.annotations and "
                          f"eval.videos")


def _file_exists(url: str) -> bool:
    fs, path = fsspec.core.url_to_fs(url)
    return fs.isfile(path)


def check_text(text) -> None:
    """Raises ConfigError, before any work, for a `text.*` section that cannot be built: a BERT that cannot be
    found (the error says how to get it), a fusion layer outside the BERT, a text length outside its positions."""
    config = bert_config(resolve_pretrained(text.pretrained))
    layers, positions = config.num_hidden_layers, config.max_position_embeddings
    if not 0 <= text.fusion_layer < layers:
        raise ConfigError(f"text.fusion_layer={text.fusion_layer} must be in 0..{layers - 1}: {text.pretrained} has "
                          f"{layers} layers and at least the last must cross-attend to the video")
    if not 3 <= text.max_len <= positions:
        raise ConfigError(f"text.max_len={text.max_len} must be in 3..{positions} ([CLS], a word, [SEP]; "
                          f"{text.pretrained} has {positions} positions)")


VIDEO_TEXT = Stage("video_text", VideoTextStageConfig, check_config, train_video_text)
