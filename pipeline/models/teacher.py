"""The frozen CLIP-ViT teacher of stage 1: an open_clip vision tower that gives per-patch targets.

The teacher is made through open_clip's own API (`open_clip.create_model(name, pretrained=tag_or_file)`), so any
open_clip ViT works: a built-in name with a pretrained tag (downloaded, or found in the hub cache), or a checkpoint
file in open_clip's format. A model name open_clip does not know (the demo's ``tiny-clip``) is registered from its
config JSON, ``<name>.json`` beside the checkpoint, with `open_clip.add_model_config`.

Targets are the official VideoMamba recipe's: the last block's patch tokens through the projection, one per patch
(`--clip_return_cls` skips ``ln_post``: video_sm/models/clip.py and video_mm/models/backbones/videomamba/clip.py;
``teacher.ln_post=true`` applies it first, UMT's ViT recipe), and, for the attention-guided mask, the last block's
[cls]->patch attention (softmax over all tokens, mean over heads).
"""
from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass
from typing import Optional

import fsspec
import open_clip
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import ConfigError, TeacherConfig


@dataclass
class TeacherFeatures:
    tokens: torch.Tensor  # (N, h*w, C): the last block's patch tokens (ln_post if asked) through the projection
    cls: torch.Tensor  # (N, C): its [CLS] token the same way (the official recipe's frame-averaged [CLS] target)
    cls_attention: Optional[torch.Tensor]  # (N, h*w): the last block's [cls]->patch attention, mean over heads


class ClipTeacher(nn.Module):
    """A frozen open_clip VisionTransformer that returns per-patch features (always in eval mode)."""

    def __init__(self, visual: nn.Module, name: str, ln_post: bool = False):
        super().__init__()
        self.ln_post = ln_post
        if not isinstance(visual, open_clip.transformer.VisionTransformer):
            raise ConfigError(f"teacher.model {name!r}: its vision tower is a {type(visual).__name__}; the teacher "
                              "needs an open_clip VisionTransformer (a ViT-* model)")
        if visual.attn_pool is not None:
            raise ConfigError(f"teacher.model {name!r} pools its tokens with an attentional pooler; its outputs are "
                              "not one per patch")
        self.visual = visual
        self.name = name
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "ClipTeacher":
        """Stays in eval mode: the teacher is frozen (no dropout, no patch dropout)."""
        return super().train(False)

    @property
    def grid(self) -> tuple[int, int]:
        """The patch grid (h, w) of one frame."""
        return tuple(self.visual.grid_size)

    @property
    def patch_size(self) -> int:
        return self.visual.patch_size[0]

    @property
    def image_size(self) -> int:
        return self.visual.image_size[0]

    @property
    def width(self) -> int:
        """The width C of the teacher's targets (the projection's output, else the transformer width)."""
        return self.visual.proj.shape[1] if self.visual.proj is not None else self.visual.transformer.width

    @torch.no_grad()
    def forward(self, frames: torch.Tensor, with_attention: bool = False) -> TeacherFeatures:
        """Returns the features of frames (N, 3, H, W); the same as `teacher_features`."""
        return self.teacher_features(frames, with_attention)

    @torch.no_grad()
    def teacher_features(self, frames: torch.Tensor, with_attention: bool = False) -> TeacherFeatures:
        """Returns the final patch tokens (N, h*w, C) and, if asked, the [cls]->patch attention (N, h*w)."""
        visual = self.visual
        expected = tuple(visual.image_size)
        if tuple(frames.shape[-2:]) != expected:
            raise ValueError(f"teacher {self.name!r} takes {expected[0]}x{expected[1]} frames, got "
                             f"{frames.shape[-2]}x{frames.shape[-1]}")
        frames = frames.to(visual.conv1.weight.dtype)
        x = visual._embeds(frames)
        blocks = visual.transformer.resblocks
        for block in blocks[:-1]:
            x = block(x)
        attention = _cls_attention(blocks[-1], x, self.name) if with_attention else None
        x = blocks[-1](x)
        x = visual.ln_post(x) if self.ln_post else x
        if visual.proj is not None:
            x = x @ visual.proj
        return TeacherFeatures(tokens=x[:, 1:], cls=x[:, 0], cls_attention=attention)


def build_teacher(teacher_cfg: TeacherConfig) -> ClipTeacher:
    """Returns the frozen teacher of `teacher_cfg` (open_clip model name + pretrained tag or checkpoint file).

    Raises ConfigError when the weights cannot be had (an unknown name or tag, a missing file, a tag that cannot be
    downloaded), naming the tag and how to provide a file instead. A teacher without weights is refused: random
    targets are not CLIP targets.
    """
    name, pretrained = teacher_cfg.model, teacher_cfg.pretrained
    if not pretrained:
        raise ConfigError(f"teacher.pretrained is empty: the teacher {name!r} needs weights (an open_clip pretrained "
                          "tag or a checkpoint file); random weights give meaningless targets")
    model = create_open_clip(name, pretrained, teacher_cfg.img_size)
    return ClipTeacher(model.visual, name, teacher_cfg.ln_post)


@dataclass(frozen=True)
class OpenClipKeys:
    """How the caller's config names the model and its weights (what the error messages tell the user to set)."""

    model: str = "teacher.model"
    weights: str = "teacher.pretrained"


def create_open_clip(name: str, pretrained: str, img_size: int, keys: OpenClipKeys = OpenClipKeys()) -> nn.Module:
    """Returns the whole open_clip model `name` (both towers) with the weights of `pretrained` (a pretrained tag, a
    checkpoint file or fsspec URL, with ``<name>.json`` beside it for a custom model) at `img_size` pixels.

    Raises ConfigError naming `keys` when the weights cannot be had (an unknown name or tag, a missing file, a tag
    that cannot be downloaded), with how to provide a file instead.
    """
    checkpoint = _local_checkpoint(pretrained, keys)
    _register_model_config(name, pretrained, checkpoint, keys)
    if checkpoint is None and not open_clip.pretrained.is_pretrained_cfg(name, pretrained):
        tags = open_clip.list_pretrained_tags_by_model(name)
        raise ConfigError(f"{keys.weights}={pretrained!r} is neither a checkpoint file nor a pretrained tag of "
                          f"open_clip model {name!r} (tags: {', '.join(tags) or 'none'})")
    # OpenAI's weights were trained with QuickGELU; open_clip only warns when the built-in config says GELU
    tag_cfg = open_clip.pretrained.get_pretrained_cfg(name, pretrained) if checkpoint is None else {}
    quick_gelu = bool(tag_cfg.get("quick_gelu"))
    try:
        model = open_clip.create_model(name, pretrained=checkpoint or pretrained,
                                       force_image_size=img_size, force_quick_gelu=quick_gelu)
    except Exception as e:
        if checkpoint is not None:
            raise ConfigError(f"{keys.weights}={pretrained!r}: cannot load it into open_clip model {name!r}: "
                              f"{_first_line(e)}") from None
        if not isinstance(e, RuntimeError):
            raise
        file_name = f"{name}{'-quickgelu' if quick_gelu else ''}"
        raise ConfigError(
            f"{keys.weights}={pretrained!r}: the weights of open_clip model {name!r} with tag {pretrained!r} "
            f"could not be downloaded or found in the hub cache ({_first_line(e)}). Without hub access, save them on "
            f"a machine that has it (model = open_clip.create_model({file_name!r}, pretrained={pretrained!r}); "
            f"torch.save(model.state_dict(), 'teacher.pt')), copy the file here and set "
            f"{keys.weights}=/path/to/teacher.pt {keys.model}={file_name} (or point HF_HUB_CACHE at a cache "
            f"that holds it)") from None
    return model


def check_teacher_grid(teacher: ClipTeacher, img_size: int, patch_size: int) -> None:
    """Raises ConfigError unless the teacher's patch grid is the student's (the targets are per patch)."""
    student = (img_size // patch_size, img_size // patch_size)
    if teacher.grid != student or teacher.patch_size != patch_size:
        raise ConfigError(
            f"the teacher's patch grid does not match the student's: teacher {teacher.name!r} sees "
            f"{teacher.image_size}px frames in {teacher.patch_size}px patches ({teacher.grid[0]}x{teacher.grid[1]}), "
            f"the student (data.img_size={img_size}, model.patch_size={patch_size}) has {student[0]}x{student[1]}; "
            f"set teacher.img_size={img_size} (a teacher with {patch_size}px patches) so that both see the same "
            f"patches")


def _cls_attention(block: nn.Module, x: torch.Tensor, name: str) -> torch.Tensor:
    """Returns the [cls]->patch attention (N, L-1) of `block` on its input x (N, L, D), mean over heads."""
    attn = getattr(block, "attn", None)
    if not isinstance(attn, nn.MultiheadAttention) or not attn._qkv_same_embed_dim:
        raise ConfigError(f"teacher {name!r}: the attention-guided mask needs a standard attention block "
                          f"(nn.MultiheadAttention); this model's last block has {type(attn).__name__}")
    y = block.ln_1(x)
    heads, width = attn.num_heads, y.shape[-1]
    w_q, w_k, _ = attn.in_proj_weight.chunk(3)
    b_q, b_k, _ = attn.in_proj_bias.chunk(3) if attn.in_proj_bias is not None else (None, None, None)
    q = F.linear(y[:, :1], w_q, b_q).view(y.shape[0], 1, heads, width // heads).transpose(1, 2)
    k = F.linear(y, w_k, b_k).view(y.shape[0], y.shape[1], heads, width // heads).transpose(1, 2)
    probs = (q @ k.transpose(-2, -1) / math.sqrt(width // heads)).softmax(dim=-1)  # (N, heads, 1, L)
    return probs[:, :, 0, 1:].mean(dim=1)


def _local_checkpoint(pretrained: str, keys: OpenClipKeys) -> Optional[str]:
    """Returns a local path for a checkpoint file or fsspec URL (remote files are cached locally), else None."""
    if "://" in pretrained:
        fs, path = fsspec.core.url_to_fs(pretrained)
        if not fs.exists(path):
            raise ConfigError(f"{keys.weights}={pretrained!r}: no such file")
        return fsspec.open_local(f"simplecache::{pretrained}")
    if os.path.isfile(pretrained):
        return pretrained
    if os.sep in pretrained or pretrained.endswith((".pt", ".pth", ".bin", ".safetensors")):
        raise ConfigError(f"{keys.weights}={pretrained!r}: no such checkpoint file")
    return None


def _register_model_config(name: str, pretrained: str, checkpoint: Optional[str], keys: OpenClipKeys) -> None:
    """Registers `<name>.json` beside the checkpoint (local or any fsspec URL) with open_clip, if there is one; it
    wins over a built-in config of that name. Raises ConfigError when there is none and open_clip does not know `name`.
    """
    beside = f"{pretrained.rsplit('/', 1)[0]}/{name}.json" if "/" in pretrained else f"{name}.json"
    fs, path = fsspec.core.url_to_fs(beside)
    if checkpoint is not None and fs.isfile(path):
        with tempfile.TemporaryDirectory(prefix="teacher_cfg_") as folder:  # open_clip names a config by its stem
            fs.get(path, os.path.join(folder, f"{name}.json"))
            open_clip.add_model_config(os.path.join(folder, f"{name}.json"))
    elif name not in open_clip.list_models():
        where = f" and there is no {beside}" if checkpoint is not None else ""
        raise ConfigError(f"{keys.model}={name!r} is not an open_clip model{where} (a custom model's config JSON, "
                          f"named after the model, goes beside its checkpoint)")


def _first_line(error: Exception) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
