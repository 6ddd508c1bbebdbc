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


def official_bert_shapes(hidden=768, layers=12, fusion_layer=9, encoder_width=576, vocab=30522, max_positions=512,
                         type_vocab=2, intermediate=None):
    """The state-dict shapes of the official text encoder (video_mm models/backbones/bert/xbert.py BertForMaskedLM
    with `fusion_layer` and `encoder_width`, as builder.py build_bert makes it), derived by hand; `position_ids` is
    the persistent buffer of the transformers 4.x it was saved with."""
    intermediate = intermediate or 4 * hidden
    shapes = {"bert.embeddings.position_ids": (1, max_positions),
              "bert.embeddings.word_embeddings.weight": (vocab, hidden),
              "bert.embeddings.position_embeddings.weight": (max_positions, hidden),
              "bert.embeddings.token_type_embeddings.weight": (type_vocab, hidden),
              "bert.embeddings.LayerNorm.weight": (hidden,), "bert.embeddings.LayerNorm.bias": (hidden,)}

    def attention(prefix, kv_width):
        return {f"{prefix}.self.query.weight": (hidden, hidden), f"{prefix}.self.query.bias": (hidden,),
                f"{prefix}.self.key.weight": (hidden, kv_width), f"{prefix}.self.key.bias": (hidden,),
                f"{prefix}.self.value.weight": (hidden, kv_width), f"{prefix}.self.value.bias": (hidden,),
                f"{prefix}.output.dense.weight": (hidden, hidden), f"{prefix}.output.dense.bias": (hidden,),
                f"{prefix}.output.LayerNorm.weight": (hidden,), f"{prefix}.output.LayerNorm.bias": (hidden,)}

    for i in range(layers):
        p = f"bert.encoder.layer.{i}"
        shapes.update(attention(f"{p}.attention", hidden))
        if i >= fusion_layer:
            shapes.update(attention(f"{p}.crossattention", encoder_width))
        shapes.update({f"{p}.intermediate.dense.weight": (intermediate, hidden),
                       f"{p}.intermediate.dense.bias": (intermediate,),
                       f"{p}.output.dense.weight": (hidden, intermediate), f"{p}.output.dense.bias": (hidden,),
                       f"{p}.output.LayerNorm.weight": (hidden,), f"{p}.output.LayerNorm.bias": (hidden,)})
    shapes.update({"cls.predictions.bias": (vocab,),
                   "cls.predictions.transform.dense.weight": (hidden, hidden),
                   "cls.predictions.transform.dense.bias": (hidden,),
                   "cls.predictions.transform.LayerNorm.weight": (hidden,),
                   "cls.predictions.transform.LayerNorm.bias": (hidden,),
                   "cls.predictions.decoder.weight": (vocab, hidden), "cls.predictions.decoder.bias": (vocab,)})
    return shapes


def official_clip_teacher_shapes(width=768, layers=12, output_dim=512, img_size=224, patch=16):
    """The state-dict shapes of the official CLIP teacher (video_mm models/backbones/videomamba/clip.py
    VisionTransformer, clip_b16), derived by hand."""
    shapes = {"conv1.weight": (width, 3, 1, patch, patch), "class_embedding": (width,),
              "positional_embedding": ((img_size // patch) ** 2 + 1, width),
              "ln_pre.weight": (width,), "ln_pre.bias": (width,), "ln_post.weight": (width,),
              "ln_post.bias": (width,), "proj": (width, output_dim)}
    for i in range(layers):
        p = f"transformer.resblocks.{i}"
        shapes.update({f"{p}.attn.in_proj_weight": (3 * width, width), f"{p}.attn.in_proj_bias": (3 * width,),
                       f"{p}.attn.out_proj.weight": (width, width), f"{p}.attn.out_proj.bias": (width,),
                       f"{p}.ln_1.weight": (width,), f"{p}.ln_1.bias": (width,),
                       f"{p}.mlp.c_fc.weight": (4 * width, width), f"{p}.mlp.c_fc.bias": (4 * width,),
                       f"{p}.mlp.c_proj.weight": (width, 4 * width), f"{p}.mlp.c_proj.bias": (width,),
                       f"{p}.ln_2.weight": (width,), f"{p}.ln_2.bias": (width,)})
    return shapes


def official_video_mm_shapes(depth=32, width=576, num_frames=8, img_size=224, patch=16, embed_dim=512, bert=None,
                             clip_teacher=None, clip_output_dim=512):
    """The state-dict shapes of the official UMT_VIDEOMAMBA (video_mm models/umt_videomamba.py) as its pretraining
    saves it (exp_pt/videomamba_middle_*/config.py: VideoMamba-M, BERT-base fused from layer 9, embed_dim 512, the
    CLIP-B/16 teacher included), derived by hand. `bert` / `clip_teacher`: keyword arguments of
    official_bert_shapes / official_clip_teacher_shapes (clip_teacher=False leaves the teacher out)."""
    grid = img_size // patch
    vision = {"cls_token": (1, 1, width), "pos_embed": (1, grid * grid + 1, width),
              "temporal_pos_embedding": (1, num_frames, width),
              "patch_embed.proj.weight": (width, 3, 1, patch, patch), "patch_embed.proj.bias": (width,),
              "norm.weight": (width,), "pool_norm.weight": (width,), "pool_norm.bias": (width,),
              "clip_decoder.0.head.weight": (clip_output_dim, width), "clip_decoder.0.head.bias": (clip_output_dim,),
              "clip_decoder.0.norm.weight": (clip_output_dim,), "clip_decoder.0.norm.bias": (clip_output_dim,)}
    for i in range(depth):
        vision[f"layers.{i}.norm.weight"] = (width,)
        vision.update({f"layers.{i}.mixer.{k}": v for k, v in official_mixer_shapes(width).items()})
    bert = {"encoder_width": width, **(bert or {})}
    text = official_bert_shapes(**bert)
    hidden = text["bert.embeddings.LayerNorm.weight"][0]
    shapes = {f"vision_encoder.{k}": v for k, v in vision.items()}
    shapes.update({f"text_encoder.{k}": v for k, v in text.items()})
    shapes.update({"vision_proj.weight": (embed_dim, width), "vision_proj.bias": (embed_dim,),
                   "text_proj.weight": (embed_dim, hidden), "text_proj.bias": (embed_dim,), "temp": (),
                   "itm_head.weight": (2, hidden), "itm_head.bias": (2,)})
    if clip_teacher is not False:
        shapes.update({f"clip_teacher.{k}": v for k, v in official_clip_teacher_shapes(**(clip_teacher or {})).items()})
    return shapes


def fake_official_video_mm(seed=0, **kwargs):
    """Random tensors in the official video_mm layout (official_video_mm_shapes(**kwargs)), tied as the official model
    ties them (the MLM decoder = the word embeddings, its bias = the head's bias), in the saved container."""
    import torch
    g = torch.Generator().manual_seed(seed)
    state = {}
    for k, shape in official_video_mm_shapes(**kwargs).items():
        state[k] = (torch.arange(shape[1]).expand(shape).clone() if k.endswith("position_ids")
                    else torch.full(shape, 0.07) if k == "temp" else torch.randn(shape, generator=g) * 0.02)
    state["text_encoder.cls.predictions.decoder.weight"] = state["text_encoder.bert.embeddings.word_embeddings.weight"]
    state["text_encoder.cls.predictions.decoder.bias"] = state["text_encoder.cls.predictions.bias"]
    return {"model": state, "epoch": 9, "global_step": 1234}
