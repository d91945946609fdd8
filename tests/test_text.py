"""Text conditioning: MiniLM offline, token order, no padding leak, the cache, encoder dropout, and
tiny CLIP / T5 folders loaded through the real "clip:PATH" / "t5:PATH" loaders."""

import socket

import pytest
import torch
from transformers import (CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer, T5Config,
                          T5EncoderModel, T5Tokenizer)

from base_model.text import MAX_LENGTH, Part, TextEmbedder, TextEncoder, drop_encoders, zero_encoders, zero_parts

torch.set_num_threads(1)  # other torch jobs may share the two cores

LETTERS = "abcdefghijklmnopqrstuvwxyz"
WORDS = "a red blue green yellow square circle triangle left right of above below two three and".split()
CAPTIONS = ["a red square left of a blue circle", "a blue circle left of a red square",
            "three yellow triangles", "a green circle above a red triangle"]


@pytest.fixture(scope="module")
def minilm():
    return TextEncoder("minilm")


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    """A random 2-layer CLIP text tower with a letter-level BPE vocabulary, built offline."""
    path = tmp_path_factory.mktemp("clip")
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in LETTERS:
        vocab[c], vocab[c + "</w>"] = len(vocab), len(vocab) + 1
    tok = CLIPTokenizer(vocab=vocab, merges=[])
    cfg = CLIPTextConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, projection_dim=16, max_position_embeddings=77,
                         bos_token_id=0, eos_token_id=1, pad_token_id=1)
    torch.manual_seed(0)
    CLIPTextModelWithProjection(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory):
    """A random 2-layer T5 encoder with a small unigram word vocabulary, built offline."""
    path = tmp_path_factory.mktemp("t5")
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -3.0)]
    vocab += [("▁" + w, -1.0) for w in WORDS] + [(c, -5.0) for c in LETTERS]
    tok = T5Tokenizer(vocab=vocab, extra_ids=0)
    cfg = T5Config(vocab_size=len(tok), d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2,
                   pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    torch.manual_seed(0)
    T5EncoderModel(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def encoders(minilm, clip_dir, t5_dir):
    return [minilm, TextEncoder(f"clip:{clip_dir}"), TextEncoder(f"t5:{t5_dir}")]


def count_forwards(encoder: TextEncoder, calls: list):
    """Record the batch size of every forward of the encoder's network."""
    return encoder.model.register_forward_hook(lambda m, args, kwargs, out: calls.append(
        kwargs["input_ids"].shape[0]), with_kwargs=True)


def test_minilm_loads_offline(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("network access while loading MiniLM")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    enc = TextEncoder("minilm")
    tokens, pooled = enc(["a red square"])
    assert tokens.shape == (1, MAX_LENGTH["minilm"], 384) and pooled.shape == (1, 384)
    assert tokens.dtype == pooled.dtype == torch.float32 and not enc.model.training
    torch.testing.assert_close(pooled.norm(dim=-1), torch.ones(1))  # L2-normalised as the model card
    # the pooled vector is the masked mean of the token states (the zeroed padding excluded)
    n = enc.tokenizer("a red square", return_tensors="pt")["input_ids"].shape[1]
    torch.testing.assert_close(pooled[0], torch.nn.functional.normalize(tokens[0, :n].mean(0), dim=0))


def test_token_order_changes_context(minilm):
    context, pooled = TextEmbedder([minilm]).encode(CAPTIONS[:2])  # same words, swapped roles
    assert (context[0] - context[1]).abs().max() > 0.1
    assert not torch.allclose(pooled[0], pooled[1])


def test_padding_zeroed_and_batch_invariant(encoders):
    alone = TextEmbedder(encoders).encode([CAPTIONS[2]])
    batched = TextEmbedder(encoders).encode(CAPTIONS)  # longer captions beside it, separate cache
    for a, b in zip(alone, batched):
        # fixed max_length + attention masks: only matmul blocking may differ, in the last bits
        torch.testing.assert_close(a[0], b[2], atol=1e-6, rtol=0)
    emb = TextEmbedder(encoders)
    context, _ = emb.encode(CAPTIONS)
    for enc, part in zip(encoders, emb.layout):
        lengths = enc.tokenizer(CAPTIONS, return_tensors="pt", padding=True)["attention_mask"].sum(1)
        for i, n in enumerate(lengths.tolist()):
            tokens = context[i, part.seq[0]:part.seq[1]]
            assert (tokens[:n].abs().sum(-1) > 0).all()  # every caption token carries something
            assert (tokens[n:] == 0).all()  # padding positions carry nothing


def test_concatenated_layout(encoders, clip_dir, t5_dir):
    emb = TextEmbedder(encoders)
    assert [p.name for p in emb.layout] == ["minilm", "clip", "t5"]
    assert [(p.seq, p.pooled, p.width) for p in emb.layout] == [
        ((0, 16), (0, 384), 384), ((16, 93), (384, 400), 32), ((93, 170), (400, 400), 32)]
    assert (emb.context_dim, emb.pooled_dim, emb.context_len) == (384, 400, 170)
    context, pooled = emb.encode(CAPTIONS)
    assert context.shape == (4, 170, 384) and pooled.shape == (4, 400)
    assert (context[:, 16:, 32:] == 0).all()  # CLIP and T5 zero-padded to 384 channels
    # CLIP: penultimate hidden states and projected pooled vector, as SD3
    clip = CLIPTextModelWithProjection.from_pretrained(clip_dir).eval()
    batch = encoders[1].tokenizer(CAPTIONS, padding="max_length", max_length=77, return_tensors="pt")
    with torch.no_grad():
        out = clip(**batch, output_hidden_states=True)
    mask = batch["attention_mask"][..., None].bool()
    torch.testing.assert_close(context[:, 16:93, :32], out.hidden_states[-2] * mask)
    torch.testing.assert_close(pooled[:, 384:], out.text_embeds)
    # T5: last hidden state, no pooled part
    t5 = T5EncoderModel.from_pretrained(t5_dir).eval()
    batch = encoders[2].tokenizer(CAPTIONS, padding="max_length", max_length=77, return_tensors="pt")
    with torch.no_grad():
        out = t5(**batch)
    torch.testing.assert_close(context[:, 93:, :32], out.last_hidden_state * batch["attention_mask"][..., None])
    # a wider context, as SD3's 4096
    wide = TextEmbedder(encoders, context_dim=4096)
    context_wide, _ = wide.encode(CAPTIONS[:1])
    assert context_wide.shape == (1, 170, 4096)
    torch.testing.assert_close(context_wide[..., :384], context[:1])
    assert (context_wide[..., 384:] == 0).all()
    with pytest.raises(ValueError, match="narrower"):
        TextEmbedder(encoders, context_dim=100)


def test_repeated_kind_gets_distinct_names(minilm):
    assert [p.name for p in TextEmbedder([minilm, minilm, minilm]).layout] == ["minilm", "minilm_2", "minilm_3"]


def test_cache_encodes_each_caption_once(encoders):
    emb = TextEmbedder(encoders)
    calls = [[] for _ in encoders]
    hooks = [count_forwards(e, c) for e, c in zip(encoders, calls)]
    try:
        first = emb.encode(["a", "b", "a"])
        assert calls == [[2]] * 3  # one batch per encoder, the repeated caption encoded once
        again = emb.encode(["b", "a"])
        assert calls == [[2]] * 3  # all cached: no encoder ran
        emb.encode(["c", "a"])
        assert calls == [[2, 1]] * 3  # only the new caption
    finally:
        for h in hooks:
            h.remove()
    for x, y in zip(first, again):
        assert torch.equal(x[0], y[1]) and torch.equal(x[1], y[0]) and torch.equal(x[0], x[2])
    direct = emb.run_encoders(["a", "b"])
    torch.testing.assert_close(first[0][:2], direct[0], atol=1e-6, rtol=0)


def test_cache_save_load_roundtrip(minilm, tmp_path):
    emb = TextEmbedder([minilm])
    context, pooled = emb.encode(CAPTIONS)
    path = str(tmp_path / "text_cache.safetensors")
    emb.save(path)
    fresh = TextEmbedder([minilm])
    fresh.load(path)
    assert list(fresh.cache) == CAPTIONS
    calls = []
    hook = count_forwards(minilm, calls)
    try:
        context2, pooled2 = fresh.encode(CAPTIONS[::-1])
    finally:
        hook.remove()
    assert calls == []
    assert torch.equal(context2, context.flip(0)) and torch.equal(pooled2, pooled.flip(0))
    with pytest.raises(ValueError, match="layout"):
        TextEmbedder([minilm], context_dim=512).load(path)  # another layout: refuse the cache


LAYOUT = [Part("clip", (0, 3), (0, 2), 4), Part("clip_2", (3, 5), (2, 5), 4), Part("t5", (5, 9), (5, 5), 6)]


def test_drop_encoders_independently_with_probability_p():
    N, p = 4000, 0.464
    context, pooled = torch.randn(N, 9, 6), torch.randn(N, 5)
    before = context.clone(), pooled.clone()
    gen = torch.Generator().manual_seed(0)
    c, y = drop_encoders(context, pooled, LAYOUT, p, gen)
    assert torch.equal(context, before[0]) and torch.equal(pooled, before[1])  # pure: inputs untouched
    dropped = []
    for part in LAYOUT:
        seq, pool = slice(*part.seq), slice(*part.pooled)
        zero = (c[:, seq] == 0).flatten(1).all(1)
        kept = (c[:, seq] == context[:, seq]).flatten(1).all(1)
        assert (zero ^ kept).all()  # each sample: the encoder's part fully zero or untouched
        # the pooled part follows the same draw (T5's is empty)
        assert ((y[:, pool] == 0).all(1) | ~zero).all() and ((y[:, pool] == pooled[:, pool]).all(1) | zero).all()
        dropped.append(zero)
    rates = torch.stack(dropped, 1).float()  # (N, 3)
    sd = (p * (1 - p) / N) ** 0.5
    assert ((rates.mean(0) - p).abs() < 4 * sd).all()
    # independence: pairs and the all-dropped (unconditional) fraction match products of p
    assert abs((rates[:, 0] * rates[:, 1]).mean() - p ** 2) < 0.025
    assert abs(rates.prod(1).mean() - p ** 3) < 0.02  # SD3: ~10% unconditional
    # same generator seed, same draw; p = 0 keeps all, p = 1 drops all
    again = drop_encoders(context, pooled, LAYOUT, p, torch.Generator().manual_seed(0))
    assert torch.equal(again[0], c) and torch.equal(again[1], y)
    assert torch.equal(drop_encoders(context, pooled, LAYOUT, 0.0)[0], context)
    assert (drop_encoders(context, pooled, LAYOUT, 1.0)[0] == 0).all()


def test_zero_encoders_for_inference():
    context, pooled = torch.randn(3, 9, 6), torch.randn(3, 5)
    c, y = zero_encoders(context, pooled, LAYOUT, ["t5"])  # SD3 without T5
    assert (c[:, 5:] == 0).all() and torch.equal(c[:, :5], context[:, :5]) and torch.equal(y, pooled)
    c, y = zero_encoders(context, pooled, LAYOUT, ["clip_2"])
    assert (c[:, 3:5] == 0).all() and (y[:, 2:5] == 0).all()
    assert torch.equal(c[:, :3], context[:, :3]) and torch.equal(y[:, :2], pooled[:, :2])
    c, y = zero_encoders(context, pooled, LAYOUT, [p.name for p in LAYOUT])  # the unconditional branch
    assert (c == 0).all() and (y == 0).all()
    drop = torch.tensor([[True, False, False], [False, False, True], [False, False, False]])
    c, y = zero_parts(context, pooled, LAYOUT, drop)  # a caller's own draw
    assert (c[0, :3] == 0).all() and (y[0, :2] == 0).all() and torch.equal(c[0, 3:], context[0, 3:])
    assert (c[1, 5:] == 0).all() and torch.equal(c[1, :5], context[1, :5]) and torch.equal(y[1], pooled[1])
    assert torch.equal(c[2], context[2]) and torch.equal(y[2], pooled[2])
    with pytest.raises(ValueError, match="unknown encoders"):
        zero_encoders(context, pooled, LAYOUT, ["clip_3"])


def test_missing_path_errors(tmp_path):
    missing = str(tmp_path / "no_such_t5")
    with pytest.raises(FileNotFoundError, match="no_such_t5") as err:
        TextEncoder(f"t5:{missing}")
    assert "config.json" in str(err.value) and "tokenizer" in str(err.value)
    only_config = tmp_path / "clip"
    only_config.mkdir()
    CLIPTextConfig(hidden_size=32).save_pretrained(only_config)
    with pytest.raises(FileNotFoundError, match="model weights") as err:
        TextEncoder(f"clip:{only_config}")
    assert "tokenizer files" in str(err.value) and "lacks config.json" not in str(err.value)
    with pytest.raises(ValueError, match="needs a local folder"):
        TextEncoder("clip")
    with pytest.raises(ValueError, match="unknown text encoder"):
        TextEncoder("bert:/x")
