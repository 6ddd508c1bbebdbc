"""VideoMamba (Li et al., ECCV 2024) as the official OpenGVLab implementation defines it
(videomamba/video_sm/models/videomamba.py), with the same state-dict keys and shapes:

    patch_embed.proj  Conv3d(3, D, (tubelet, p, p))          cls_token (1, 1, D)
    pos_embed (1, h*w + 1, D) (spatial, [cls] first)          temporal_pos_embedding (1, t, D)
    layers.{i}.mixer.* (bidirectional Mamba), layers.{i}.norm.weight (RMSNorm)     norm_f.weight     head.*

Tokens are laid out spatial-first (index t*h*w + y*w + x) with [cls] in front; every block is
"add residual -> RMSNorm -> mixer", the residual stream optionally kept in fp32, and the final RMSNorm is applied to
the stream after the last block. Token order, masking, activation checkpointing and intermediate layers are options
of `forward_features`/the constructor; the default path computes exactly the official model's function.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

import fsspec
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor

from pipeline import safe_load
from pipeline.models.mamba import BidirectionalMamba

# size -> (depth, width); d_state 16 and expand 2 for all
SIZES = {"tiny": (24, 192), "small": (24, 384), "middle": (32, 576), "base": (24, 768)}
# Drop-path rate of each size when the config leaves it unset (the official pretraining recipes' values)
SIZE_DROP_PATH = {"tiny": 0.1, "small": 0.15, "middle": 0.4, "base": 0.4}
TOKEN_ORDERS = ("spatial_first", "temporal_first", "st_interleave", "ts_interleave")


@dataclass
class VideoMambaOutput:
    cls: Tensor  # (B, D) final-normed [cls]
    tokens: Tensor  # (B, N_visible, D) final-normed visible tokens, in spatial-first (canonical) order
    layers: list[Tensor] = field(default_factory=list)  # (B, 1 + N_visible, D) per requested block, [cls] first
    # (B, 1 + N_visible, D) the residual stream entering the last block's mixer, before that block's output is added:
    # un-normed, [cls] first, spatial-first order, fp32 with residual_in_fp32. What the official pretraining model's
    # alignment decoder reads (video_sm/models/videomamba_pretrain.py and video_mm/models/backbones/videomamba/
    # videomamba.py forward_features: with fused_add_norm the final norm runs with prenorm=False, so `residual` stays
    # the last block's input stream, and `x_clip_vis.append(residual)`); pipeline.models.heads.ClipDecoder
    stream: Optional[Tensor] = None


class RMSNorm(nn.Module):
    """RMSNorm with a weight only (the official mamba-ssm one), computed in fp32, returned in the input dtype."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        y = x32 * torch.rsqrt(x32.square().mean(-1, keepdim=True) + self.eps) * self.weight.float()
        return y.to(x.dtype)


class DropPath(nn.Module):
    """Stochastic depth: zeroes a sample's branch with probability p in training, scaling the rest by 1/(1-p)."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(1.0 - self.p)
        return x * keep / (1.0 - self.p)


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, tubelet_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.patch_size, self.tubelet_size = patch_size, tubelet_size
        kernel = (tubelet_size, patch_size, patch_size)
        self.proj = nn.Conv3d(in_chans, embed_dim, kernel_size=kernel, stride=kernel)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x)


def _autocast_dtype(x: Tensor) -> Optional[torch.dtype]:
    """The dtype autocast casts x's matmul inputs to, or None where autocast is off for x's device."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None


class Block(nn.Module):
    """residual += drop_path(hidden); hidden = mixer(norm(residual)) -> (hidden, residual), as the official block.
    With the Triton mixer the add and the norm run as one fused kernel (pipeline.models.ops.rmsnorm_triton)."""

    def __init__(self, dim: int, drop_path: float, residual_in_fp32: bool, norm_epsilon: float, **mixer_kwargs):
        super().__init__()
        self.mixer = BidirectionalMamba(dim, **mixer_kwargs)
        self.norm = RMSNorm(dim, eps=norm_epsilon)
        self.drop_path = DropPath(drop_path)
        self.residual_in_fp32 = residual_in_fp32

    def forward(self, hidden: Tensor, residual: Optional[Tensor]) -> tuple[Tensor, Tensor]:
        if residual is not None:
            hidden = self.drop_path(hidden)
        if self.mixer.resolved_backend(hidden.device) == "triton":
            from pipeline.models.ops.rmsnorm_triton import add_rms_norm
            normed, residual = add_rms_norm(hidden, residual, self.norm.weight, self.norm.eps, self.residual_in_fp32,
                                            _autocast_dtype(hidden))
            return self.mixer(normed), residual
        residual = hidden if residual is None else residual + hidden
        if self.residual_in_fp32:
            residual = residual.float()
        # the norm runs in the module's dtype (bf16 under DeepSpeed's bf16) while the residual stream stays fp32
        return self.mixer(self.norm(residual.to(dtype=self.norm.weight.dtype))), residual


class VideoMamba(nn.Module):
    def __init__(self, img_size: int = 224, patch_size: int = 16, depth: int = 24, embed_dim: int = 192,
                 channels: int = 3, num_classes: int = 0, num_frames: int = 8, tubelet_size: int = 1,
                 drop_rate: float = 0.0, drop_path_rate: float = 0.0, fc_drop_rate: float = 0.0, d_state: int = 16,
                 expand: int = 2, norm_epsilon: float = 1e-5, residual_in_fp32: bool = True,
                 token_order: str = "spatial_first", checkpoint_blocks: int = 0, scan_backend: str = "auto"):
        super().__init__()
        if token_order not in TOKEN_ORDERS:
            raise ValueError(f"token_order {token_order!r} is not one of {', '.join(TOKEN_ORDERS)}")
        if img_size % patch_size or num_frames % tubelet_size:
            raise ValueError(f"img_size {img_size} must be a multiple of patch_size {patch_size} and num_frames "
                             f"{num_frames} a multiple of tubelet_size {tubelet_size}")
        self.embed_dim = self.num_features = embed_dim
        self.num_classes = num_classes
        self.patch_grid = token_grid(num_frames, img_size, patch_size, tubelet_size)
        self.token_order = token_order
        self.checkpoint_blocks = checkpoint_blocks
        _, h, w = self.patch_grid
        self.patch_embed = PatchEmbed(patch_size, tubelet_size, channels, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, h * w + 1, embed_dim))
        self.temporal_pos_embedding = nn.Parameter(torch.zeros(1, self.patch_grid[0], embed_dim))
        self.pos_drop = nn.Dropout(drop_rate)
        # the official schedule: linspace(0, rate, depth) shifted by one block (block i gets entry i - 1)
        rates = [0.0] + [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        self.layers = nn.ModuleList([
            Block(embed_dim, rates[i], residual_in_fp32, norm_epsilon, d_state=d_state, expand=expand,
                  backend=scan_backend) for i in range(depth)])
        self.drop_path = DropPath(drop_path_rate)
        self.norm_f = RMSNorm(embed_dim, eps=norm_epsilon)
        self.head_drop = nn.Dropout(fc_drop_rate)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self._init_official(depth)

    def _init_official(self, depth: int) -> None:
        """The official initialisation: every Linear trunc_normal(0.02) with zero bias (this overrides the mixer's
        dt init, as the official code does), pos_embed trunc_normal(0.02), cls/temporal embeddings zero, and each
        out_proj re-drawn kaiming-uniform / sqrt(depth)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for block in self.layers:
            nn.init.kaiming_uniform_(block.mixer.out_proj.weight, a=math.sqrt(5))
            with torch.no_grad():
                block.mixer.out_proj.weight /= math.sqrt(depth)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token", "temporal_pos_embedding"}

    def block_orders(self) -> list[str]:
        """Returns each block's token order: "spatial_first" or "temporal_first" (the interleaved orders alternate
        them block by block, starting with the first-named one)."""
        if self.token_order in ("spatial_first", "temporal_first"):
            return [self.token_order] * len(self.layers)
        pair = ["spatial_first", "temporal_first"]
        if self.token_order == "ts_interleave":
            pair.reverse()
        return [pair[i % 2] for i in range(len(self.layers))]

    def chained_blocks(self) -> list[nn.Module]:
        """The blocks that each step runs one after another, each on the previous one's (hidden, residual): all but
        the activation-checkpointed ones (which run again in the backward pass). What `train.cuda_graphs` replays."""
        return list(self.layers)[self.checkpoint_blocks:]

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.head_drop(self.forward_features(x).cls))

    def forward_features(self, x: Tensor, mask: Optional[Tensor] = None,
                         return_layers: Sequence[int] = ()) -> VideoMambaOutput:
        """x (B, 3, T, H, W); mask (B, T'*H'*W') bool, True = dropped, the same count in every row; return_layers:
        block indices (negative ones count from the end) whose output stream (residual + block output, without drop
        path) is returned normed by the shared norm_f (as the official pretraining model's intermediate features).
        The output also carries the un-normed stream entering the last block (`VideoMambaOutput.stream`)."""
        stream, visible, (T, H, W) = self._embedded_tokens(x, mask)
        B = stream.shape[0]
        wanted = self._layer_indices(return_layers)
        to_temporal = _order_index(visible, B, T, H, W, stream.device) if "temporal_first" in self.block_orders() \
            else None
        from_temporal = to_temporal.argsort(dim=1) if to_temporal is not None else None

        hidden, residual, current, layers = stream, None, "spatial_first", {}
        for i, (block, order) in enumerate(zip(self.layers, self.block_orders())):
            if order != current:
                index = to_temporal if order == "temporal_first" else from_temporal
                hidden = _reorder(hidden, index)
                residual = _reorder(residual, index) if residual is not None else None
                current = order
            if i < self.checkpoint_blocks and torch.is_grad_enabled():
                hidden, residual = torch.utils.checkpoint.checkpoint(block, hidden, residual, use_reentrant=False)
            else:
                hidden, residual = block(hidden, residual)
            if i in wanted:
                out = self.norm_f(residual + hidden).to(hidden.dtype)
                layers[i] = _reorder(out, from_temporal) if current == "temporal_first" else out
        out = self.norm_f(residual + self.drop_path(hidden)).to(hidden.dtype)
        last_input = residual  # the stream entering the last block (VideoMambaOutput.stream)
        if current == "temporal_first":
            out, last_input = _reorder(out, from_temporal), _reorder(last_input, from_temporal)
        return VideoMambaOutput(cls=out[:, 0], tokens=out[:, 1:], layers=[layers[i] for i in wanted],
                                stream=last_input)

    def _embedded_tokens(self, x: Tensor, mask: Optional[Tensor]) -> tuple[Tensor, Optional[Tensor], tuple]:
        """Returns ([cls] + the visible patch tokens with position embeddings (B, 1 + N_visible, D) in spatial-first
        order, the canonical indices of the visible tokens (B, N_visible) or None without a mask, the patch grid)."""
        tokens = self.patch_embed(x)  # (B, D, T', H', W')
        B, D, T, H, W = tokens.shape
        spatial, temporal = self._position_embeddings(T, H, W)
        tokens = tokens.flatten(3).permute(0, 2, 3, 1) + spatial[:, None, 1:]
        if not self.is_image(T):
            tokens = tokens + temporal[:, :, None]
        tokens = tokens.reshape(B, T * H * W, D)
        visible = _visible_index(mask, B, T * H * W, tokens.device)
        if visible is not None:
            tokens = tokens.gather(1, visible[..., None].expand(-1, -1, D))
        cls = (self.cls_token + spatial[:, :1]).expand(B, -1, -1)
        return self.pos_drop(torch.cat([cls, tokens], dim=1)), visible, (T, H, W)

    def is_image(self, t: int) -> bool:
        """Whether an input of `t` tokens in time is an image: one frame to a model built for several, which gets no
        temporal position embedding (the official `use_image` path, T == 1: video_mm/models/umt_videomamba.py
        encode_vision, backbones/videomamba/videomamba.py forward_features). A model built for one frame keeps it."""
        return t == 1 and self.temporal_pos_embedding.shape[1] > 1

    def _layer_indices(self, requested: Sequence[int]) -> list[int]:
        depth = len(self.layers)
        for i in requested:
            if not -depth <= i < depth:
                raise ValueError(f"return_layers: block {i} does not exist (the model has {depth} blocks)")
        return [i % depth for i in requested]

    def _position_embeddings(self, t: int, h: int, w: int) -> tuple[Tensor, Tensor]:
        """Returns (spatial (1, 1+h*w, D), temporal (1, t, D)), interpolated as the official finetuning code does
        when the input's patch grid differs from the one the model was built for."""
        spatial, temporal = self.pos_embed, self.temporal_pos_embedding
        if (h, w) != self.patch_grid[1:]:
            spatial = interpolate_spatial_pos_embed(spatial, (h, w))
        if t != temporal.shape[1]:
            temporal = interpolate_temporal_pos_embed(temporal, t)
        return spatial, temporal


def token_grid(num_frames: int, img_size: int, patch_size: int = 16, tubelet_size: int = 1) -> tuple[int, int, int]:
    """Returns the (T', h, w) token grid of clips of `num_frames` frames of `img_size`² pixels: one token per tubelet
    of `tubelet_size` frames and `patch_size`² pixels."""
    return num_frames // tubelet_size, img_size // patch_size, img_size // patch_size


def build_videomamba(size: str, num_frames: int = 8, img_size: int = 224, num_classes: int = 0,
                     **overrides) -> VideoMamba:
    """Returns VideoMamba-Ti/S/M/B ("tiny" | "small" | "middle" | "base"); `overrides` are VideoMamba's keyword
    arguments (depth, embed_dim, patch_size, tubelet_size, drop_path_rate, token_order, scan_backend, ...)."""
    if size not in SIZES:
        raise ValueError(f"model size {size!r} is not one of {', '.join(SIZES)}")
    depth, width = SIZES[size]
    kwargs = {"depth": depth, "embed_dim": width, **{k: v for k, v in overrides.items() if v is not None}}
    return VideoMamba(img_size=img_size, num_frames=num_frames, num_classes=num_classes, **kwargs)


# ------------------------------------------------------------------------------------------------- token routing
def _visible_index(mask: Optional[Tensor], batch: int, num_tokens: int, device) -> Optional[Tensor]:
    """Returns the canonical indices (B, N_visible) of the kept tokens, ascending, or None without a mask."""
    if mask is None:
        return None
    if mask.dtype != torch.bool or tuple(mask.shape) != (batch, num_tokens):
        raise ValueError(f"mask must be a bool tensor of shape {(batch, num_tokens)} (True = dropped), "
                         f"got {mask.dtype} {tuple(mask.shape)}")
    kept = (~mask).sum(1)
    if (kept != kept[0]).any():
        raise ValueError(f"mask keeps a different number of tokens per row: {kept.tolist()}")
    return (~mask).to(device).nonzero()[:, 1].reshape(batch, -1)


def _order_index(visible: Optional[Tensor], batch: int, t: int, h: int, w: int, device) -> Tensor:
    """Returns (B, 1+N_visible): for each position of the temporal-first stream, the position in the spatial-first
    stream it comes from ([cls] stays first)."""
    order = torch.arange(t * h * w, device=device).reshape(t, h * w).t().reshape(-1)  # canonical index per slot
    rank = order.argsort()  # canonical index -> its slot in the temporal-first order
    keys = rank[visible] if visible is not None else rank.expand(batch, -1)
    index = keys.argsort(dim=1) + 1
    return torch.cat([index.new_zeros(batch, 1), index], dim=1)


def _reorder(x: Tensor, index: Tensor) -> Tensor:
    return x.gather(1, index[..., None].expand(-1, -1, x.shape[-1]))


# ------------------------------------------------------------------------------------ position-embedding resizing
def interpolate_spatial_pos_embed(pos_embed: Tensor, grid: tuple[int, int]) -> Tensor:
    """(1, 1 + s*s, D) -> (1, 1 + h*w, D): the patch part resized bicubically on its square grid, [cls] kept."""
    extra, patches = pos_embed[:, :1], pos_embed[:, 1:]
    side = int(round(math.sqrt(patches.shape[1])))
    if side * side != patches.shape[1]:
        raise ValueError(f"pos_embed has {patches.shape[1]} patch positions, not a square grid")
    if (side, side) == tuple(grid):
        return pos_embed
    dim = patches.shape[-1]
    patches = patches.reshape(1, side, side, dim).permute(0, 3, 1, 2).float()
    patches = F.interpolate(patches, size=tuple(grid), mode="bicubic", align_corners=False)
    patches = patches.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], dim).to(pos_embed.dtype)
    return torch.cat([extra, patches], dim=1)


def interpolate_temporal_pos_embed(temporal: Tensor, t: int) -> Tensor:
    """(1, t0, D) -> (1, t, D), linear, align_corners=False (the official finetuning code's choice)."""
    if temporal.shape[1] == t:
        return temporal
    resized = F.interpolate(temporal.permute(0, 2, 1).float(), size=(t,), mode="linear", align_corners=False)
    return resized.permute(0, 2, 1).to(temporal.dtype)


# ------------------------------------------------------------------------------------------ official checkpoints
_WRAPPERS = ("model", "module", "state_dict", "model_state")
_PREFIXES = ("module.", "backbone.", "encoder.", "vision_encoder.")


def load_official_checkpoint(model: VideoMamba, source: Union[str, dict[str, Tensor]]) -> list[str]:
    """Loads an official VideoMamba image, video or masked-pretraining checkpoint (a file at any fsspec URL, or a
    state dict already read) into `model` with strict=True after adapting it: wrappers ({"model": sd},
    {"module": sd}) and prefixes (module., backbone., encoder., vision_encoder.) are removed, a 2D patch kernel
    (image model) is inflated to the tubelet (centre frame, as the official code), the spatial and temporal position
    embeddings are interpolated to the model's grid (a missing temporal one, as in image checkpoints, starts at
    zero), a pretraining model's final `norm` is taken as `norm_f` and its CLIP decoder left out, and a head that the
    model lacks or whose class count differs is left out (the model keeps its own). Returns the list of adaptations
    made, one line each."""
    path_or_url = source if isinstance(source, str) else "the given state dict"
    state = _read_state_dict(source) if isinstance(source, str) else _unwrapped(source, path_or_url)
    state, notes = adapt_state_dict(model, state)
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        mismatches = [f"{k} {tuple(state[k].shape)} vs model {tuple(own[k].shape)}" for k in wrong]
        detail = [f"missing keys: {_capped(missing)}" if missing else "",
                  f"unexpected keys: {_capped(unexpected)}" if unexpected else "",
                  f"shape mismatches: {_capped(mismatches)}" if wrong else ""]
        raise ValueError(f"{path_or_url}: not a checkpoint of this VideoMamba: " + "; ".join(d for d in detail if d))
    model.load_state_dict(state, strict=True)
    return notes


def _capped(items: list[str], limit: int = 8) -> str:
    return str(items[:limit]) + (f" and {len(items) - limit} more" if len(items) > limit else "")


def _read_state_dict(path_or_url: str) -> dict[str, Tensor]:
    with fsspec.open(path_or_url, "rb") as f:
        raw = f.read()
    # never an unrestricted unpickle: official training checkpoints also pickle their run's config (argparse
    # Namespace, EasyDict), which safe_load reads as plain dicts; anything else is refused (UnsafeFile, exit 2)
    obj = safe_load.load(raw, path_or_url, foreign_configs=True)
    return _unwrapped(obj, path_or_url)


def _unwrapped(obj, name: str) -> dict[str, Tensor]:
    """Returns the model's tensors in a checkpoint object: out of a wrapper dict, and out of a prefix when the
    model's keys carry one (a stage-1 run's state dict keeps its backbone under "backbone.")."""
    for key in _WRAPPERS:
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise ValueError(f"{name}: no state dict found (expected tensors, or one under "
                         f"{' / '.join(repr(k) for k in _WRAPPERS)})")
    for prefix in _PREFIXES:
        inner = {k[len(prefix):]: v for k, v in obj.items() if k.startswith(prefix)}
        if "pos_embed" in inner:
            obj = inner
    return obj


def adapt_state_dict(model: VideoMamba, state: dict[str, Tensor]) -> tuple[dict[str, Tensor], list[str]]:
    """Returns (a copy of `state` fitted to `model`'s grid, tubelet and head, the adaptations made)."""
    state, notes = dict(state), []
    own = model.state_dict()
    t, h, w = model.patch_grid
    kernel = state.get("patch_embed.proj.weight")
    if kernel is not None and kernel.dim() == 4:
        inflated = kernel.new_zeros(kernel.shape[:2] + (model.patch_embed.tubelet_size,) + kernel.shape[2:])
        inflated[:, :, model.patch_embed.tubelet_size // 2] = kernel
        state["patch_embed.proj.weight"] = inflated
        notes.append(f"patch_embed.proj.weight: 2D kernel inflated to tubelet {model.patch_embed.tubelet_size} "
                     f"(centre frame)")
    pos = state.get("pos_embed")
    if pos is not None and pos.shape[1] != h * w + 1:
        state["pos_embed"] = interpolate_spatial_pos_embed(pos, (h, w))
        side = int(round(math.sqrt(pos.shape[1] - 1)))
        notes.append(f"pos_embed: {side}x{side} -> {h}x{w} (bicubic)")
    temporal = state.get("temporal_pos_embedding")
    if temporal is None and "pos_embed" in state:
        state["temporal_pos_embedding"] = torch.zeros_like(own["temporal_pos_embedding"])
        notes.append("temporal_pos_embedding: absent (image checkpoint), starts at zero")
    elif temporal is not None and temporal.shape[1] != t:
        state["temporal_pos_embedding"] = interpolate_temporal_pos_embed(temporal, t)
        notes.append(f"temporal_pos_embedding: {temporal.shape[1]} -> {t} (linear)")
    if "norm.weight" in state and "norm_f.weight" not in state and "norm_f.weight" in own:
        for part in ("weight", "bias"):
            if f"norm.{part}" in state:
                state[f"norm_f.{part}"] = state.pop(f"norm.{part}")
        notes.append("norm: the masked-pretraining model's final norm, loaded as norm_f")
    decoder = [k for k in state if k.startswith("clip_decoder.")]
    for k in decoder:
        del state[k]
    if decoder:
        notes.append(f"clip_decoder: the pretraining model's CLIP decoder ({len(decoder)} tensors) left out")
    head_keys = [k for k in state if k.startswith("head.")]
    if head_keys and any(k not in own or own[k].shape != state[k].shape for k in head_keys):
        for k in head_keys:
            del state[k]
        for k in own:
            if k.startswith("head."):
                state[k] = own[k]
        notes.append(f"head: checkpoint head ({', '.join(head_keys)}) not used; the model keeps its own")
    return state, notes
