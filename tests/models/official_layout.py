"""The official VideoMamba state-dict layout, derived by hand from the official code (OpenGVLab/VideoMamba:
mamba/mamba_ssm/modules/mamba_simple.py with bimamba=True, videomamba/video_sm/models/videomamba.py)."""
import math


def official_mixer_shapes(d_model, d_state=16, d_conv=4, expand=2):
    """The parameter shapes of the official `Mamba(bimamba=True)` (mamba_simple.py), derived by hand."""
    e, r = expand * d_model, math.ceil(d_model / 16)
    shapes = {"in_proj.weight": (2 * e, d_model), "out_proj.weight": (d_model, e),
              "A_log": (e, d_state), "A_b_log": (e, d_state), "D": (e,), "D_b": (e,)}
    for s in ("", "_b"):
        shapes.update({f"conv1d{s}.weight": (e, 1, d_conv), f"conv1d{s}.bias": (e,),
                       f"x_proj{s}.weight": (r + 2 * d_state, e), f"dt_proj{s}.weight": (e, r),
                       f"dt_proj{s}.bias": (e,)})
    return shapes


def official_state_shapes(depth, width, num_frames=8, img_size=224, patch=16, tubelet=1, num_classes=1000):
    """The state-dict shapes of the official VisionMamba (video_sm/models/videomamba.py), derived by hand."""
    grid = img_size // patch
    shapes = {"cls_token": (1, 1, width), "pos_embed": (1, grid * grid + 1, width),
              "temporal_pos_embedding": (1, num_frames // tubelet, width),
              "patch_embed.proj.weight": (width, 3, tubelet, patch, patch), "patch_embed.proj.bias": (width,),
              "norm_f.weight": (width,)}
    for i in range(depth):
        shapes[f"layers.{i}.norm.weight"] = (width,)
        shapes.update({f"layers.{i}.mixer.{k}": v for k, v in official_mixer_shapes(width).items()})
    if num_classes:
        shapes.update({"head.weight": (num_classes, width), "head.bias": (num_classes,)})
    return shapes
