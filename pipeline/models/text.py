"""Stage 2's text side: UMT's BERT text encoder with fusion layers, built from transformers' BERT parts. The only module
of the project that imports transformers (and tokenizers).

The design is the official one (OpenGVLab/VideoMamba videomamba/video_mm/models/backbones/bert/xbert.py and
builder.py, from UMT/ALBEF): a BERT (`BertForMaskedLM`'s body and MLM head) whose first `fusion_layer` layers are
text-only and whose remaining layers add, between self-attention and the MLP, a cross-attention to the video tokens
(keys and values from the video width, `encoder_width`). The text embedding of the contrastive loss is the text-only
layers' [CLS]; the matching head and the MLM head read the fused states. BERT-base with `fusion_layer=9` (the
official configs/config_bert.json) has three cross-attention layers.

Parameter names mirror the official container (`bert.embeddings.*`, `bert.encoder.layer.{i}.attention|crossattention|
intermediate|output.*`, `cls.predictions.*`), so an official checkpoint's `text_encoder.*` keys load as they are and a
transformers `BertForMaskedLM` directory loads with only the cross-attention layers new (initialised as BERT's
`_init_weights`: normal(0, 0.02), LayerNorm 1/0, as `from_pretrained` does for the official model's missing keys).

Weights and tokenizer come from `text.pretrained`: a local directory in the transformers layout (config.json, model
weights, vocab.txt / tokenizer files) or a hub name already in the local Hugging Face cache; nothing is downloaded.
`build_tiny_bert` writes such a directory from a list of captions (a WordPiece vocabulary of their characters and
words, and a small random BERT), so the demo and the tests run the same code as BERT-base.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Iterable, Optional

import torch
from torch import Tensor, nn

from pipeline.errors import ConfigError

log = logging.getLogger(__name__)


def _quiet_transformers() -> None:
    """No progress bars or load reports on every build: the caller logs what was loaded."""
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()

# the official text-encoder defaults (video_mm configs/model.py TextEncoders["bert"])
BERT_BASE = "bert-base-uncased"
OFFICIAL_FUSION_LAYER = 9


# ------------------------------------------------------------------------------------------------ weights on disk
def resolve_pretrained(name: str) -> str:
    """The local directory of `text.pretrained`: the path itself when it is a directory with a config.json, else the
    snapshot of hub name `name` in the local Hugging Face cache. Raises ConfigError, naming the path and how to get
    the files, when neither exists (nothing is downloaded)."""
    if os.path.isdir(name):
        if not os.path.isfile(os.path.join(name, "config.json")):
            raise ConfigError(f"text.pretrained={name}: the directory has no config.json (a BERT in the transformers "
                              f"layout: config.json, model.safetensors or pytorch_model.bin, vocab.txt)")
        return name
    if not os.path.isabs(name) and name.count("/") <= 1 and not name.startswith("."):
        from huggingface_hub import snapshot_download
        for repo in (name, f"google-bert/{name}") if "/" not in name else (name,):
            try:
                path = snapshot_download(repo_id=repo, local_files_only=True)
            except Exception:  # noqa: BLE001 - any failure means "not in the cache"; the error below says what to do
                continue
            if os.path.isfile(os.path.join(path, "config.json")):
                return path
    repo = name if "/" in name and not os.path.isabs(name) else BERT_BASE
    raise ConfigError(
        f"text.pretrained={name}: no BERT directory at that path and no such model in the local Hugging Face cache "
        f"(this run does not download). Get the files once, e.g. `huggingface-cli download {repo} --local-dir DIR` "
        f"(or `hf download {repo} --local-dir DIR`), and set text.pretrained=DIR; `videomamba run --config "
        f"configs/demo.yaml` builds a tiny one offline")


def bert_config(path: str):
    """The transformers BertConfig of a resolved BERT directory."""
    from transformers import BertConfig
    return BertConfig.from_pretrained(path, local_files_only=True)


# --------------------------------------------------------------------------------------------------- tokenizer
@dataclass
class Tokenized:
    ids: Tensor  # (B, L) token ids, [CLS] first, padded with [PAD] to L
    attention_mask: Tensor  # (B, L) 1 = token, 0 = padding (transformers' convention, as the official code)


class BertTextTokenizer:
    """The BERT tokenizer of a directory (uncased WordPiece, transformers 5's tokenizers-backed `BertTokenizer`);
    `__call__(texts, max_len)` pads every text to `max_len` ids and truncates longer ones, as the official
    `tokenizer(text, padding="max_length", truncation=True, max_length=max_txt_l)`."""

    def __init__(self, path: str):
        from transformers import BertTokenizer
        self._tok = BertTokenizer.from_pretrained(path, local_files_only=True)  # transformers 5: tokenizers-backed
        self.pad_token_id = self._tok.pad_token_id
        self.cls_token_id = self._tok.cls_token_id
        self.sep_token_id = self._tok.sep_token_id
        self.mask_token_id = self._tok.mask_token_id
        self.vocab_size = len(self._tok)

    def __call__(self, texts: list[str], max_len: int) -> Tokenized:
        out = self._tok(list(texts), padding="max_length", truncation=True, max_length=max_len, return_tensors="pt")
        return Tokenized(out["input_ids"], out["attention_mask"])


# ----------------------------------------------------------------------------------------------------- encoder
def _extended_mask(attention_mask: Tensor, dtype: torch.dtype) -> Tensor:
    """(B, L) 1/0 -> additive (B, 1, 1, L): 0 where attended, -10000 where masked (the official xbert value)."""
    return (1.0 - attention_mask[:, None, None, :].to(dtype)) * -10000.0


class BertFusionLayer(nn.Module):
    """One BERT layer: self-attention, then (fusion layers only) cross-attention to the video tokens, then the MLP;
    each sub-block post-norm with its residual (xbert.py BertLayer). The parts are transformers' BERT modules; the
    cross-attention's key and value take the video width (xbert's `encoder_width`)."""

    def __init__(self, config, cross_width: Optional[int]):
        super().__init__()
        from transformers.models.bert.modeling_bert import BertAttention, BertIntermediate, BertOutput
        self.attention = BertAttention(config)
        if cross_width is not None:
            self.crossattention = BertAttention(config, is_cross_attention=True)
            heads = self.crossattention.self
            heads.key = nn.Linear(cross_width, heads.all_head_size)
            heads.value = nn.Linear(cross_width, heads.all_head_size)
        self.intermediate = BertIntermediate(config)
        self.output = BertOutput(config)

    @property
    def has_cross_attention(self) -> bool:
        return hasattr(self, "crossattention")

    def forward(self, hidden: Tensor, mask: Tensor, video: Optional[Tensor] = None,
                video_mask: Optional[Tensor] = None) -> tuple[Tensor, ...]:
        """Returns the new hidden states followed by what the layer only reads, passed on unchanged: (hidden, mask)
        from a text-only layer, (hidden, mask, video, video_mask) from a fusion layer. So each layer's call takes
        the previous one's outputs, and a run of layers is a chain that `train.cuda_graph_chains` can replay
        (pipeline.engine.graphs)."""
        out = self.attention(hidden, mask)[0]
        if not self.has_cross_attention:
            return self.output(self.intermediate(out), out), mask
        out = self.crossattention(out, None, video, video_mask)[0]
        return self.output(self.intermediate(out), out), mask, video, video_mask


class _Encoder(nn.Module):
    def __init__(self, config, fusion_layer: int, cross_width: int):
        super().__init__()
        self.layer = nn.ModuleList([BertFusionLayer(config, cross_width if i >= fusion_layer else None)
                                    for i in range(config.num_hidden_layers)])


class _Bert(nn.Module):
    def __init__(self, config, fusion_layer: int, cross_width: int):
        super().__init__()
        from transformers.models.bert.modeling_bert import BertEmbeddings
        self.embeddings = BertEmbeddings(config)
        self.encoder = _Encoder(config, fusion_layer, cross_width)


class BertTextEncoder(nn.Module):
    """UMT's text encoder (the official `text_encoder`, a `BertForMaskedLM` with fusion layers): `encode` runs the
    embeddings and the text-only layers, `fuse` the cross-attention layers, `mlm_logits` BERT's MLM head (decoder tied
    to the word embeddings)."""

    def __init__(self, config, fusion_layer: int, cross_width: int):
        super().__init__()
        from transformers.models.bert.modeling_bert import BertOnlyMLMHead
        if not 0 <= fusion_layer < config.num_hidden_layers:
            raise ValueError(f"fusion_layer={fusion_layer} must be in 0..{config.num_hidden_layers - 1} "
                             f"(the BERT has {config.num_hidden_layers} layers; at least one must fuse)")
        config._attn_implementation = getattr(config, "_attn_implementation", None) or "sdpa"
        self.config, self.fusion_layer = config, fusion_layer
        self.bert = _Bert(config, fusion_layer, cross_width)
        self.cls = BertOnlyMLMHead(config)
        self.apply(self._init_weights)
        self.tie_weights()

    @property
    def width(self) -> int:
        return self.config.hidden_size

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    def tie_weights(self) -> None:
        """The MLM decoder's weight is the word-embedding matrix and its bias the head's bias, as in BERT."""
        predictions = self.cls.predictions
        predictions.decoder.weight = self.bert.embeddings.word_embeddings.weight
        predictions.decoder.bias = predictions.bias

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """BERT's initialisation (transformers BertPreTrainedModel._init_weights with initializer_range)."""
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            module.weight.normal_(0.0, std)
            if module.bias is not None:
                module.bias.zero_()
        elif isinstance(module, nn.Embedding):
            module.weight.normal_(0.0, std)
            if module.padding_idx is not None:
                module.weight[module.padding_idx].zero_()
        elif isinstance(module, nn.LayerNorm):
            module.weight.fill_(1.0)
            module.bias.zero_()
        if module is getattr(getattr(self, "cls", None), "predictions", None):
            module.bias.zero_()

    def text_layers(self) -> list[BertFusionLayer]:
        """The text-only layers, in order: the chain `encode` runs (`train.cuda_graph_chains`'s "text")."""
        return list(self.bert.encoder.layer[:self.fusion_layer])

    def fusion_layers(self) -> list[BertFusionLayer]:
        """The cross-attention layers, in order: the chain `fuse` runs (`train.cuda_graph_chains`'s "fusion")."""
        return list(self.bert.encoder.layer[self.fusion_layer:])

    def encode(self, ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Token ids (B, L) -> the text-only layers' hidden states (B, L, H) (the official mode="text")."""
        hidden = self.bert.embeddings(input_ids=ids)
        mask = _extended_mask(attention_mask, hidden.dtype)
        for layer in self.text_layers():
            hidden, mask = layer(hidden, mask)
        return hidden

    def fuse(self, hidden: Tensor, attention_mask: Tensor, video: Tensor,
             video_mask: Optional[Tensor] = None) -> Tensor:
        """Text states (B, L, H) from `encode` + video tokens (B, N, D) -> fused states (B, L, H) (mode="fusion");
        every video token is attended to unless `video_mask` (B, N) marks it 0."""
        mask = _extended_mask(attention_mask, hidden.dtype)
        video = video.to(hidden.dtype)
        vmask = None if video_mask is None else _extended_mask(video_mask, hidden.dtype)
        for layer in self.fusion_layers():
            hidden, mask, video, vmask = layer(hidden, mask, video, vmask)
        return hidden

    def mlm_logits(self, hidden: Tensor) -> Tensor:
        """Fused states (..., H) -> vocabulary logits (..., V)."""
        return self.cls(hidden)


def load_bert_text_encoder(pretrained: str, fusion_layer: int, cross_width: int, weights: bool = True,
                           attn_implementation: str = "sdpa") -> tuple[BertTextEncoder, BertTextTokenizer]:
    """The text encoder and tokenizer of `text.pretrained` (a directory or a cached hub name): BERT's weights (a
    `BertForMaskedLM` / `BertForPreTraining` / `BertModel` checkpoint; an MLM head the checkpoint lacks starts fresh)
    with fresh cross-attention in layers fusion_layer.. ; `weights=False` keeps BERT's random initialisation (for a
    caller that loads a whole checkpoint next). Raises ConfigError when the files cannot be found."""
    path = resolve_pretrained(pretrained)
    _quiet_transformers()
    encoder = bert_text_encoder(bert_config(path), fusion_layer, cross_width, attn_implementation)
    if not weights:
        return encoder, BertTextTokenizer(path)
    missing = load_bert_weights(encoder, path)
    fresh = sorted({k.split(".crossattention.")[0] for k in missing if ".crossattention." in k})
    log.info("text encoder from %s: %d layers (%d text-only), cross-attention new in %s%s", path,
             encoder.config.num_hidden_layers, fusion_layer, ", ".join(k.rsplit(".", 1)[-1] for k in fresh) or "-",
             "; also new: " + ", ".join(k for k in missing if ".crossattention." not in k) if
             any(".crossattention." not in k for k in missing) else "")
    return encoder, BertTextTokenizer(path)


def bert_text_encoder(config, fusion_layer: int, cross_width: int,
                      attn_implementation: str = "sdpa") -> BertTextEncoder:
    """A randomly initialised text encoder of `config` (a transformers BertConfig)."""
    config._attn_implementation = attn_implementation
    return BertTextEncoder(config, fusion_layer, cross_width)


def load_bert_weights(encoder: BertTextEncoder, path: str) -> list[str]:
    """Loads a transformers BERT directory's weights into `encoder`; returns the encoder's keys it did not hold (the
    cross-attention layers, and the MLM head for a checkpoint without one). Raises ConfigError for a directory whose
    weights are not a BERT of this shape."""
    from transformers import BertForMaskedLM
    try:
        source = BertForMaskedLM.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as e:
        raise ConfigError(f"text.pretrained={path}: cannot read its BERT weights ({e})") from None
    state = {k: v for k, v in source.state_dict().items() if not k.endswith(("position_ids", "token_type_ids"))}
    result = encoder.load_state_dict(state, strict=False)
    if result.unexpected_keys:
        raise ConfigError(f"text.pretrained={path}: weights the text encoder does not have: "
                          f"{sorted(result.unexpected_keys)[:6]}")
    encoder.tie_weights()
    return sorted(result.missing_keys)


# -------------------------------------------------------------------------------------------------- tiny BERT
SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


BERT_INIT_STD = 0.02  # BERT's initializer_range (BERT-base: 768 wide)
BERT_BASE_WIDTH = 768


def width_scaled_init_std(hidden: int) -> float:
    """BERT's initializer_range scaled to a `hidden`-wide model, 0.02 * sqrt(768 / hidden): weights of this std give
    a layer's outputs the size BERT-base's 0.02 gives at 768 (an output is a sum over `hidden` inputs). At 128 wide
    it is 0.049. BERT's 0.02 at 128 makes each fresh linear layer's output 0.4 of BERT-base's, and the new
    cross-attention's contribution to a fusion layer (value, then output projection) a sixth; the demo's matching
    head then stays at its prior for hundreds of steps (README, the demo)."""
    return BERT_INIT_STD * (BERT_BASE_WIDTH / hidden) ** 0.5


def tiny_vocabulary(texts: Iterable[str], vocab_size: int) -> list[str]:
    """A WordPiece vocabulary for `texts`, the same list for the same texts on every run: the special tokens, every
    character (alone and as a ##continuation, so any word of these characters tokenizes), then the texts' words
    (split as BERT's uncased tokenizer splits them) by falling count, ties in alphabetical order, up to `vocab_size`
    ids. `tokenizers`' WordPiece trainer is not used: it breaks ties between equally frequent merges in hash-map
    order, so each run made another vocabulary and the demo's stage 2 another run. Raises ValueError when the
    characters alone need more than `vocab_size` ids."""
    from collections import Counter

    from tokenizers.normalizers import BertNormalizer
    from tokenizers.pre_tokenizers import BertPreTokenizer

    normalizer, splitter = BertNormalizer(lowercase=True), BertPreTokenizer()
    words = Counter(word for text in texts
                    for word, _ in splitter.pre_tokenize_str(normalizer.normalize_str(text)))
    chars = sorted({c for word in words for c in word})
    pieces = SPECIAL_TOKENS + chars + ["##" + c for c in chars]
    if len(pieces) > vocab_size:
        raise ValueError(f"vocab_size={vocab_size}: the texts' {len(chars)} characters need {len(pieces)} ids")
    ranked = sorted((w for w in words if len(w) > 1), key=lambda w: (-words[w], w))
    return pieces + ranked[:vocab_size - len(pieces)]


def build_tiny_bert(texts: Iterable[str], out_dir: str, hidden: int = 128, layers: int = 4, heads: int = 4,
                    vocab_size: int = 2000, max_positions: int = 64, seed: int = 0,
                    embedding_rows: Optional[int] = None, initializer_range: float = BERT_INIT_STD,
                    dropout: float = 0.1) -> str:
    """Writes a small BERT in the transformers layout to `out_dir` (config.json, model.safetensors, vocab.txt,
    tokenizer files): an uncased WordPiece vocabulary of at most `vocab_size` ids made from `texts`
    (`tiny_vocabulary`: the same files for the same arguments on every run), and a randomly initialised
    `BertForMaskedLM` (seeded) with one embedding row per id, or `embedding_rows` (e.g. BERT-base's 30,522, for a
    random model of BERT-base's shape). Its weights are drawn with std `initializer_range`, which config.json keeps,
    so stage 2's new cross-attention layers are drawn with it too (see `width_scaled_init_std`); `dropout` is its
    hidden and attention dropout (BERT's 0.1). Loads with `text.pretrained=out_dir` exactly as BERT-base does.
    Returns `out_dir`."""
    from transformers import BertConfig, BertForMaskedLM, BertTokenizer

    _quiet_transformers()
    os.makedirs(out_dir, exist_ok=True)
    vocabulary = tiny_vocabulary(texts, vocab_size)
    tokenizer = BertTokenizer(vocab={token: i for i, token in enumerate(vocabulary)}, do_lower_case=True)
    tokenizer.save_pretrained(out_dir)  # tokenizer.json, tokenizer_config.json
    with open(os.path.join(out_dir, "vocab.txt"), "w", encoding="utf-8") as f:  # for readers of the classic layout
        f.write("".join(token + "\n" for token in vocabulary))
    config = BertConfig(vocab_size=max(len(tokenizer), embedding_rows or 0), hidden_size=hidden,
                        num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=4 * hidden,
                        max_position_embeddings=max_positions, pad_token_id=tokenizer.pad_token_id,
                        initializer_range=initializer_range, hidden_dropout_prob=dropout,
                        attention_probs_dropout_prob=dropout)
    torch.manual_seed(seed)
    BertForMaskedLM(config).save_pretrained(out_dir)
    return out_dir
