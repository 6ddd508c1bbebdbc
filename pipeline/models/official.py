"""Released VideoMamba multimodal checkpoints (OpenGVLab/VideoMamba videomamba/video_mm, the UMT_VIDEOMAMBA model of
models/umt_videomamba.py: videomamba_m16_{5M,17M,25M}_f8_res224.pth) onto the project's stage-2 model.

The official container is `{"model": state_dict, ...}` (tasks/pretrain.py save_obj) or the bare state dict. Its keys:

    vision_encoder.*        PretrainVideoMamba (backbones/videomamba/videomamba.py) -> backbone.* (final `norm` ->
                            `norm_f`; position embeddings resized to the model's grid as the official loader does:
                            spatial bicubic, temporal linear, videomamba.py load_state_dict)
    vision_encoder.pool_norm.*                               -> pool_norm.*
    vision_encoder.clip_decoder.0.{head,norm}.*  (the student's alignment decoder, Linear_Decoder)
                                                             -> align_head.{head,norm}.* when the model has the
                            official head (pipeline.models.heads.ClipDecoder: model.align_head=clip_decoder and a
                            teacher, i.e. loss.align > 0); a model without it (an evaluation, loss.align=0,
                            model.align_head=norm_linear) leaves it out and says so
    text_encoder.bert.*, text_encoder.cls.*  (xbert BertForMaskedLM, fusion layers included)  -> the same names
    vision_proj.*, text_proj.*, itm_head.*                   -> the same names
    temp (a 0-d tensor)                                      -> temp (1,)

and the keys in `DROPPED`, left out on purpose (each with its reason). Any other key, or a key of the model that the
checkpoint does not fill, refuses the file with the keys that did not fit. Files are read with
`torch.load(weights_only=True)`: tensors and plain containers only.
"""
from __future__ import annotations

from typing import Union

import fsspec
import torch
from torch import Tensor

from pipeline import safe_load
from pipeline.models.heads import ClipDecoder
from pipeline.models.videomamba import adapt_state_dict

# prefix -> why the project does not load it
DROPPED = {
    "clip_teacher.": "the frozen CLIP ViT-B/16 teacher of the unmasked-token alignment (MODEL_ZOO.md: the weights are "
                     "saved with it); the project builds its teacher from open_clip (teacher.model / "
                     "teacher.pretrained), the same OpenAI CLIP weights",
    "text_encoder.bert.embeddings.position_ids": "a constant buffer (arange) that transformers rebuilds",
}
VISION, TEXT = "vision_encoder.", "text_encoder."
DECODER = VISION + "clip_decoder.0."  # clip_return_layer 1 (exp_pt/*/config.py): one decoder, index 0
SAME_NAME = ("text_encoder.bert.", "text_encoder.cls.", "vision_proj.", "text_proj.", "itm_head.")


def read_checkpoint(path_or_url: str) -> dict[str, Tensor]:
    """The state dict of a checkpoint file (any fsspec URL): the bare dict or the one under "model" / "module" /
    "state_dict". Read by `pipeline.safe_load` as the backbone loader reads official files: tensors and plain values,
    the run's pickled config (the official training container keeps it beside the weights) as a plain dict, anything
    else refused (UnsafeFile, exit 2)."""
    with fsspec.open(path_or_url, "rb") as f:
        raw = f.read()
    obj = safe_load.load(raw, path_or_url, foreign_configs=True)
    for key in ("model", "module", "state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise ValueError(f"{path_or_url}: no state dict of tensors (bare, or under 'model' / 'module' / 'state_dict')")
    return obj


def is_official_video_text(state: dict[str, Tensor]) -> bool:
    """Whether `state` is in the official video_mm layout (vision_encoder.* and text_encoder.bert.* keys)."""
    return any(k.startswith(VISION) for k in state) and any(k.startswith(TEXT + "bert.") for k in state)


def dropped(key: str) -> bool:
    return any(key.startswith(prefix) for prefix in DROPPED)


def official_to_project(model, state: dict[str, Tensor]) -> tuple[dict[str, Tensor], list[str]]:
    """Maps an official video_mm state dict onto `model` (a `pipeline.models.video_text.VideoTextModel`). Returns
    (the model's state dict, the adaptations made). Raises ValueError naming the keys that did not fit."""
    notes = [f"{prefix}*: {len([k for k in state if k.startswith(prefix)])} tensors not loaded: {why}"
             for prefix, why in DROPPED.items() if any(k.startswith(prefix) for k in state)]
    out, unmapped = {}, []
    vision = {}
    decoder = {k: v for k, v in state.items() if k.startswith(DECODER)}
    if decoder and isinstance(getattr(model, "align_head", None), ClipDecoder):
        out.update(_fitting_head(model, {"align_head." + k[len(DECODER):]: v for k, v in decoder.items()}, notes,
                                 DECODER + "*"))
    elif decoder:
        notes.append(f"{DECODER}*: {len(decoder)} tensors not loaded: the model has no official alignment head "
                     f"(it has one with a teacher, loss.align > 0, and model.align_head=clip_decoder)")
    for key, value in state.items():
        if dropped(key) or key in decoder:
            continue
        if key.startswith(VISION + "pool_norm."):
            out[key[len(VISION):]] = value
        elif key.startswith(VISION):
            vision[key[len(VISION):]] = value
        elif key.startswith(SAME_NAME):
            out[key] = value
        elif key == "temp":
            out["temp"] = value.reshape(1)
        else:
            unmapped.append(key)
    backbone, vision_notes = adapt_state_dict(model.backbone, vision)
    notes += vision_notes
    out.update({f"backbone.{k}": v for k, v in backbone.items()})
    return _checked(model, out, unmapped, "an official video_mm", _official_name), notes


def _official_name(key: str) -> str:
    """The official name of a mapped key (for the messages)."""
    if key.startswith("align_head."):
        return DECODER + key[len("align_head."):]
    return key.replace("backbone.", VISION, 1)


def _fitting_head(model, head: dict[str, Tensor], notes: list[str], name: str) -> dict[str, Tensor]:
    """`head` (align_head.* tensors of a checkpoint) when it is exactly the model's alignment head (names and
    shapes), else nothing, with a note: the model keeps its own head (another head kind, or another teacher width:
    the head's output width is the teacher's)."""
    own = {k: v for k, v in model.state_dict().items() if k.startswith("align_head.")}
    if head.keys() == own.keys() and all(head[k].shape == own[k].shape for k in own):
        return head
    if own:
        notes.append(f"{name}: {len(head)} tensors not loaded: they do not fit the model's alignment head "
                     f"({_capped(sorted(f'{k} {tuple(v.shape)}' for k, v in head.items()), 4)} vs "
                     f"{_capped(sorted(f'{k} {tuple(v.shape)}' for k, v in own.items()), 4)}); it starts fresh")
    else:
        notes.append(f"{name}: {len(head)} tensors not loaded: the model has no alignment head")
    return {}


def _checked(model, state: dict[str, Tensor], unmapped: list[str], layout: str,
             origin=lambda key: key) -> dict[str, Tensor]:
    """`state` completed with the model's own alignment head where the checkpoint has none for it (a stage-2 run
    trained without the alignment, an official checkpoint into a model with the norm_linear head), after checking
    that it fills the model exactly; ValueError naming what did not fit otherwise (the checkpoint's own names,
    `origin` of a mapped key)."""
    own = model.state_dict()
    for key in own:
        if key.startswith("align_head.") and key not in state:
            state[key] = own[key]
    missing = sorted(set(own) - set(state))
    unexpected = sorted(origin(k) for k in set(state) - set(own)) + sorted(unmapped)
    wrong = sorted(f"{k} {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                   for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        detail = [f"model keys it lacks: {_capped(missing)}" if missing else "",
                  f"keys the model does not have: {_capped(unexpected)}" if unexpected else "",
                  f"shape mismatches: {_capped(wrong)}" if wrong else ""]
        raise ValueError(f"not a {layout} checkpoint of this model (model.* / text.* of the config): "
                         + "; ".join(d for d in detail if d))
    return state


def _capped(items: list[str], limit: int = 8) -> str:
    return str(items[:limit]) + (f" and {len(items) - limit} more" if len(items) > limit else "")


def load_video_text_weights(model, source: Union[str, dict[str, Tensor]]) -> list[str]:
    """Loads an official video_mm checkpoint, or a state dict in the project's own layout (a stage-2 run's weights:
    backbone.*, pool_norm.*, text_encoder.*, ...), into `model` strictly; position embeddings are fitted to the
    model's frame count and size either way. Returns the adaptations made; raises ValueError for a checkpoint of
    neither layout, naming the keys that did not fit."""
    state = read_checkpoint(source) if isinstance(source, str) else source
    if is_official_video_text(state):
        state, notes = official_to_project(model, state)
    else:
        backbone = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
        fitted, notes = adapt_state_dict(model.backbone, backbone) if backbone else ({}, [])
        rest = {k: v for k, v in state.items() if not k.startswith(("backbone.", "align_head."))}
        head = {k: v for k, v in state.items() if k.startswith("align_head.")}
        if head:
            rest.update(_fitting_head(model, head, notes, "align_head.*"))
        rest.update({f"backbone.{k}": v for k, v in fitted.items()})
        state = _checked(model, rest, [], "a stage-2 or an official video_mm")
    model.load_state_dict(state, strict=True)
    model.text_encoder.tie_weights()
    return notes
