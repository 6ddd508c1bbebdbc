"""The BERT text encoder of stage 2: the text-only layers are transformers' BERT, a fusion layer computes the
official xbert layer with cross-attention, the MLM head is tied, the tokenizer is the directory's, and a missing
`text.pretrained` stops with a ConfigError that says how to get the files."""
import math

import pytest
import torch
import torch.nn.functional as F
from transformers import BertForMaskedLM, BertModel

from pipeline.errors import ConfigError
from pipeline.models.text import BertTextTokenizer, load_bert_text_encoder, resolve_pretrained


def test_text_only_layers_give_bertmodels_hidden_states(tiny_bert_dir):
    encoder, tokenizer = load_bert_text_encoder(tiny_bert_dir, fusion_layer=2, cross_width=24)
    reference = BertModel.from_pretrained(tiny_bert_dir, add_pooling_layer=False).eval()
    encoder.eval()
    tokens = tokenizer(["a red ball rolls", "the yellow triangle jumps to the right slowly"], 16)
    assert tokens.attention_mask[0].sum() < tokens.attention_mask[1].sum()  # padding is exercised
    with torch.no_grad():
        expected = reference(input_ids=tokens.ids, attention_mask=tokens.attention_mask,
                             output_hidden_states=True).hidden_states[2]
        hidden = encoder.encode(tokens.ids, tokens.attention_mask)
    assert torch.allclose(hidden, expected, atol=1e-5, rtol=0)


def test_pretrained_weights_are_loaded_and_the_mlm_decoder_is_tied(tiny_bert_dir):
    encoder, _ = load_bert_text_encoder(tiny_bert_dir, fusion_layer=2, cross_width=24)
    source = BertForMaskedLM.from_pretrained(tiny_bert_dir).state_dict()
    own = encoder.state_dict()
    for key, value in source.items():
        if key in own:
            assert torch.equal(own[key], value), key
    assert {k for k in own if k not in source} == {k for k in own if ".crossattention." in k}
    predictions = encoder.cls.predictions
    assert predictions.decoder.weight is encoder.bert.embeddings.word_embeddings.weight
    assert predictions.decoder.bias is predictions.bias
    assert [hasattr(layer, "crossattention") for layer in encoder.bert.encoder.layer] == [False, False, True]
    assert encoder.bert.encoder.layer[2].crossattention.self.key.weight.shape == (32, 24)  # from the video width


def _official_attention(attention, hidden, mask, memory=None):
    """xbert.py BertSelfAttention + BertSelfOutput (eval mode): scores / sqrt(head size) + additive mask."""
    heads = attention.self.num_attention_heads
    source = hidden if memory is None else memory

    def split(x):
        return x.view(x.shape[0], x.shape[1], heads, -1).permute(0, 2, 1, 3)

    q, k, v = split(attention.self.query(hidden)), split(attention.self.key(source)), split(attention.self.value(source))
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if mask is not None:
        scores = scores + mask
    context = (scores.softmax(-1) @ v).permute(0, 2, 1, 3).reshape(hidden.shape)
    return attention.output.LayerNorm(attention.output.dense(context) + hidden)


def test_a_fusion_layer_computes_the_official_cross_attention_layer(tiny_bert_dir):
    encoder, tokenizer = load_bert_text_encoder(tiny_bert_dir, fusion_layer=2, cross_width=24)
    encoder.eval()
    layer = encoder.bert.encoder.layer[2]
    tokens = tokenizer(["a red ball", "two blue squares move up slowly"], 10)
    text = torch.randn(2, 10, 32)
    video = torch.randn(2, 7, 24)
    mask = (1.0 - tokens.attention_mask[:, None, None, :].float()) * -10000.0  # BertModel.get_extended_attention_mask
    with torch.no_grad():
        x = _official_attention(layer.attention, text, mask)
        x = _official_attention(layer.crossattention, x, None, video)  # encoder_attention_mask of ones -> 0
        expected = layer.output.LayerNorm(layer.output.dense(F.gelu(layer.intermediate.dense(x))) + x)
        fused = encoder.fuse(text, tokens.attention_mask, video)
    assert torch.allclose(fused, expected, atol=1e-5, rtol=0)
    with torch.no_grad():
        other = encoder.fuse(text, tokens.attention_mask, video.flip(0))
    assert not torch.allclose(fused, other)  # the video matters


def test_tokenizer_is_the_directorys_uncased_wordpiece(tiny_bert_dir):
    tokenizer = BertTextTokenizer(tiny_bert_dir)
    tokens = tokenizer(["A RED Ball", "a red ball rolls to the left and then to the right again"], 8)
    assert tokens.ids.shape == (2, 8)
    assert torch.equal(tokens.ids[0, :5], tokenizer(["a red ball"], 8).ids[0, :5])  # uncased
    assert tokens.ids[0, 0] == tokenizer.cls_token_id and tokens.ids[0, 4] == tokenizer.sep_token_id
    assert tokens.ids[0, 5:].eq(tokenizer.pad_token_id).all() and tokens.attention_mask[0].tolist() == [1] * 5 + [0] * 3
    assert tokens.ids[1, -1] == tokenizer.sep_token_id  # truncated, still closed


def test_a_missing_bert_stops_with_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError, match=r"text.pretrained=bert-base-uncased: .*huggingface-cli download "
                                          r"bert-base-uncased --local-dir DIR"):
        resolve_pretrained("bert-base-uncased")
    missing = str(tmp_path / "nowhere")
    with pytest.raises(ConfigError, match=f"text.pretrained={missing}"):
        resolve_pretrained(missing)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="has no config.json"):
        resolve_pretrained(str(tmp_path / "empty"))


def test_a_tiny_bert_keeps_its_weight_scale_and_dropout_and_its_new_cross_attention_is_drawn_at_that_scale(tmp_path):
    """build_tiny_bert(initializer_range, dropout) (the demo's text step: BERT's 0.02 scaled to the width, no dropout):
    config.json keeps both, so stage 2's fresh cross-attention is drawn with the same std as the BERT's weights."""
    from pipeline.models.text import build_tiny_bert, width_scaled_init_std
    from tests.conftest import TINY_BERT_CAPTIONS

    assert width_scaled_init_std(768) == pytest.approx(0.02)
    assert width_scaled_init_std(128) == pytest.approx(0.049, abs=1e-3)
    path = build_tiny_bert(TINY_BERT_CAPTIONS * 4, str(tmp_path / "bert"), hidden=64, layers=2, heads=2,
                           initializer_range=0.08, dropout=0.0)
    encoder, _ = load_bert_text_encoder(path, fusion_layer=1, cross_width=48)
    assert encoder.config.initializer_range == 0.08
    assert encoder.config.hidden_dropout_prob == 0.0 and encoder.config.attention_probs_dropout_prob == 0.0
    words = encoder.bert.embeddings.word_embeddings.weight
    fresh = encoder.bert.encoder.layer[1].crossattention.self.key.weight  # (64, 48), not in the directory
    assert words.std().item() == pytest.approx(0.08, rel=0.15) and fresh.std().item() == pytest.approx(0.08, rel=0.1)
    default = build_tiny_bert(TINY_BERT_CAPTIONS * 4, str(tmp_path / "default"), hidden=64, layers=2, heads=2)
    assert load_bert_text_encoder(default, 1, 48)[0].config.initializer_range == 0.02  # BERT's own by default


def test_encode_and_fuse_run_their_layers_as_chains_each_layer_on_the_previous_ones_outputs(tiny_bert_dir):
    """The layers `encode` and `fuse` call are `text_layers()` and `fusion_layers()` themselves, each on the previous
    layer's outputs, so `train.cuda_graph_chains` can replay them (pipeline.engine.graphs): off CUDA each call falls
    back to the layer's own forward, counted, with the same states and gradients as the plain encoder."""
    from pipeline.engine.graphs import graph_chain

    torch.manual_seed(0)
    graphed, _ = load_bert_text_encoder(tiny_bert_dir, fusion_layer=1, cross_width=24)
    plain, _ = load_bert_text_encoder(tiny_bert_dir, fusion_layer=1, cross_width=24)
    plain.load_state_dict(graphed.state_dict())
    graphed.eval(), plain.eval()
    chains = [graph_chain(graphed.text_layers()), graph_chain(graphed.fusion_layers())]
    assert [len(c.modules) for c in chains] == [1, 2]
    ids = torch.randint(5, 60, (3, 12))
    attention_mask = torch.ones(3, 12, dtype=torch.long)
    attention_mask[0, 7:] = 0
    video = torch.randn(3, 5, 24)
    losses = []
    for encoder in (graphed, plain):
        v = video.clone().requires_grad_()
        fused = encoder.fuse(encoder.encode(ids, attention_mask), attention_mask, v)
        loss = encoder.mlm_logits(fused).logsumexp(-1).mean()
        loss.backward()
        losses.append((float(loss.detach()), v.grad))
    assert losses[0][0] == losses[1][0]
    assert torch.equal(losses[0][1], losses[1][1]) and float(losses[0][1].abs().sum()) > 0  # the video gets its grad
    assert [c.eager_calls for c in chains] == [1, 2]  # every layer's call went through its chain
    for (name, p), q in zip(graphed.named_parameters(), plain.parameters()):
        assert (p.grad is None) == (q.grad is None) and (p.grad is None or torch.equal(p.grad, q.grad)), name
    layer = graphed.fusion_layers()[0]
    h, m = torch.randn(3, 12, 32), torch.zeros(3, 1, 1, 12)
    outputs = layer(h, m, video, None)
    assert len(outputs) == 4 and outputs[1] is m and outputs[2] is video and outputs[3] is None
    assert len(graphed.text_layers()[0](h, m)) == 2


def test_a_tiny_bert_is_the_same_files_on_every_build_and_tokenizes_unseen_words(tmp_path):
    """The demo's text step builds its BERT anew each run; the same captions must give the same vocabulary and ids
    (tokenizers' trainer ordered equally frequent pieces differently from run to run, so stage 2 did not repeat)."""
    from pipeline.models.text import build_tiny_bert, tiny_vocabulary
    from tests.conftest import TINY_BERT_CAPTIONS

    texts = TINY_BERT_CAPTIONS * 4 + ["Zebra's café!"]
    first = build_tiny_bert(reversed(texts), str(tmp_path / "a"), hidden=32, layers=1, heads=2)
    second = build_tiny_bert(texts, str(tmp_path / "b"), hidden=32, layers=1, heads=2)
    for name in ("vocab.txt", "tokenizer.json", "model.safetensors"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    vocabulary = (tmp_path / "a" / "vocab.txt").read_text().split("\n")[:-1]
    assert vocabulary == tiny_vocabulary(texts, 2000) and len(set(vocabulary)) == len(vocabulary)
    assert vocabulary[:5] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] and "zebra" in vocabulary
    tokenizer = BertTextTokenizer(first)
    ids = tokenizer(["zebra's cafe", "abracadabra"], 12).ids
    pieces = [tokenizer._tok.convert_ids_to_tokens(row) for row in ids.tolist()]
    assert pieces[0][:6] == ["[CLS]", "zebra", "'", "s", "cafe", "[SEP]"]  # whole words; accents stripped
    assert "[UNK]" not in pieces[1] and "##b" in pieces[1]  # an unseen word: its characters
    cut = len(vocabulary) - 3
    assert tiny_vocabulary(texts, cut) == vocabulary[:cut]  # the least frequent words go first
    counts = [sum(t.lower().split().count(w) for t in texts) for w in vocabulary[-4:]]
    assert counts == sorted(counts, reverse=True), counts
    with pytest.raises(ValueError, match="characters need"):
        tiny_vocabulary(texts, 20)
