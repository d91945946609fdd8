"""Community reward models on tiny random stand-ins built offline: the same architectures, saved in
the folder layouts `load` reads. Checks the preprocessing against PIL, each score's formula by hand,
that scores do not depend on the batch, where text is cut, and the missing-file errors."""

import importlib
import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file
from transformers import (BertTokenizer, BlipConfig, BlipForImageTextRetrieval, CLIPConfig, CLIPModel,
                          CLIPTokenizer)

from base_model.text import minilm_path
from reward import aesthetic, clipscore, hpsv2, imagereward, pickscore
from reward.clipscore import OPENAI_MEAN, OPENAI_STD, to_model_pixels
from reward.scorers import get_scorer
from tests.conftest import randomize

torch.set_num_threads(1)  # other torch jobs may share the two cores

LETTERS = "abcdefghijklmnopqrstuvwxyz"
PROMPTS = ["a red square", "two blue circles left of a green triangle", "yellow", "a cat on a mat",
           "ab " * 60]  # the last is 120 letter tokens: past CLIP's 77 and ImageReward's 35
LONG = PROMPTS[-1]


def clip_tokenizer() -> CLIPTokenizer:
    """Letter-level CLIP BPE; start/end-of-text take the two highest ids, as in CLIP's vocabulary."""
    vocab = {}
    for c in LETTERS:
        vocab[c], vocab[c + "</w>"] = len(vocab), len(vocab) + 1
    vocab["<|startoftext|>"], vocab["<|endoftext|>"] = len(vocab), len(vocab) + 1
    return CLIPTokenizer(vocab=vocab, merges=[])


def tiny_clip(tok: CLIPTokenizer, image_size: int = 32) -> CLIPModel:
    cfg = CLIPConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=image_size, patch_size=8),
        projection_dim=16)
    torch.manual_seed(0)
    model = CLIPModel(cfg)  # CLIP's own init: cosines of both signs (randomize biases them all one way)
    with torch.no_grad():
        model.logit_scale.fill_(np.log(100.0))
    return model.eval()


@pytest.fixture(scope="module")
def images():
    g = torch.Generator().manual_seed(0)
    return torch.rand(len(PROMPTS), 3, 40, 48, generator=g) * 2 - 1  # not square, not the model's size


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    """A CLIP folder whose processor resizes the short side to 36 and crops 32."""
    path = str(tmp_path_factory.mktemp("clip"))
    tok = clip_tokenizer()
    tiny_clip(tok).save_pretrained(path)
    tok.save_pretrained(path)
    with open(os.path.join(path, "preprocessor_config.json"), "w") as f:
        json.dump({"size": {"shortest_edge": 36}, "crop_size": {"height": 32, "width": 32},
                   "image_mean": list(OPENAI_MEAN), "image_std": list(OPENAI_STD), "resample": 3}, f)
    return path


@pytest.fixture(scope="module")
def aesthetic_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("aesthetic"))
    tiny_clip(clip_tokenizer()).save_pretrained(path)
    save_file(randomize(aesthetic.MLP(16), std=0.3).state_dict(), os.path.join(path, aesthetic.MLP_FILE))
    return path


# open_clip's config format, shrunk; its state dict is written by hand below under open_clip's names
OPEN_CLIP_CFG = {"embed_dim": 16,
                 "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
                 "text_cfg": {"context_length": 77, "vocab_size": 54, "width": 32, "heads": 2, "layers": 2}}


def open_clip_state(oc: dict) -> dict:
    g = torch.Generator().manual_seed(1)
    r = lambda *shape: torch.randn(*shape, generator=g) * 0.1  # noqa: E731
    v, t, e = oc["vision_cfg"], oc["text_cfg"], oc["embed_dim"]
    vw, tw, p = v["width"], t["width"], v["patch_size"]
    sd = {"visual.conv1.weight": r(vw, 3, p, p), "visual.class_embedding": r(vw),
          "visual.positional_embedding": r((v["image_size"] // p) ** 2 + 1, vw),
          "visual.ln_pre.weight": 1 + r(vw), "visual.ln_pre.bias": r(vw),
          "visual.ln_post.weight": 1 + r(vw), "visual.ln_post.bias": r(vw), "visual.proj": r(vw, e),
          "token_embedding.weight": r(t["vocab_size"], tw), "positional_embedding": r(t["context_length"], tw),
          "ln_final.weight": 1 + r(tw), "ln_final.bias": r(tw), "text_projection": r(tw, e),
          "logit_scale": torch.tensor(4.6), "attn_mask": torch.zeros(77, 77)}
    towers = (("visual.transformer.resblocks.", vw, v["layers"]), ("transformer.resblocks.", tw, t["layers"]))
    for prefix, d, n in towers:
        for i in range(n):
            b = f"{prefix}{i}."
            sd |= {b + "ln_1.weight": 1 + r(d), b + "ln_1.bias": r(d),
                   b + "ln_2.weight": 1 + r(d), b + "ln_2.bias": r(d),
                   b + "attn.in_proj_weight": r(3 * d, d), b + "attn.in_proj_bias": r(3 * d),
                   b + "attn.out_proj.weight": r(d, d), b + "attn.out_proj.bias": r(d),
                   b + "mlp.c_fc.weight": r(4 * d, d), b + "mlp.c_fc.bias": r(4 * d),
                   b + "mlp.c_proj.weight": r(d, 4 * d), b + "mlp.c_proj.bias": r(d)}
    return sd


def open_clip_cosine(sd: dict, oc: dict, pixels: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """open_clip's CLIP forward written out (seq-first nn.MultiheadAttention blocks, ln_post on the
    class token, argmax/eot pooling): an independent reference for the key mapping."""
    def block(x, b, heads, mask=None):
        d = x.shape[-1]
        h = F.layer_norm(x, (d,), sd[b + "ln_1.weight"], sd[b + "ln_1.bias"])
        h = F.multi_head_attention_forward(h, h, h, d, heads, sd[b + "attn.in_proj_weight"],
                                           sd[b + "attn.in_proj_bias"], None, None, False, 0.0,
                                           sd[b + "attn.out_proj.weight"],
                                           sd[b + "attn.out_proj.bias"], training=False, need_weights=False,
                                           attn_mask=mask)[0]
        x = x + h
        h = F.layer_norm(x, (d,), sd[b + "ln_2.weight"], sd[b + "ln_2.bias"])
        h = F.linear(F.gelu(F.linear(h, sd[b + "mlp.c_fc.weight"], sd[b + "mlp.c_fc.bias"])),
                     sd[b + "mlp.c_proj.weight"], sd[b + "mlp.c_proj.bias"])
        return x + h

    v, t = oc["vision_cfg"], oc["text_cfg"]
    x = F.conv2d(pixels, sd["visual.conv1.weight"], stride=v["patch_size"]).flatten(2).transpose(1, 2)
    x = torch.cat([sd["visual.class_embedding"].expand(len(x), 1, -1), x], 1) + sd["visual.positional_embedding"]
    x = F.layer_norm(x, (v["width"],), sd["visual.ln_pre.weight"], sd["visual.ln_pre.bias"]).transpose(0, 1)
    for i in range(v["layers"]):
        x = block(x, f"visual.transformer.resblocks.{i}.", v["width"] // v["head_width"])
    img = F.layer_norm(x[0], (v["width"],), sd["visual.ln_post.weight"], sd["visual.ln_post.bias"]) @ sd["visual.proj"]

    n = ids.shape[1]  # open_clip pads to the full 77 with id 0
    causal = torch.full((n, n), float("-inf")).triu(1)
    x = (sd["token_embedding.weight"][ids] + sd["positional_embedding"][:n]).transpose(0, 1)
    for i in range(t["layers"]):
        x = block(x, f"transformer.resblocks.{i}.", t["heads"], causal)
    x = F.layer_norm(x.transpose(0, 1), (t["width"],), sd["ln_final.weight"], sd["ln_final.bias"])
    txt = x[torch.arange(len(ids)), ids.argmax(-1)] @ sd["text_projection"]
    return (F.normalize(img, dim=-1) * F.normalize(txt, dim=-1)).sum(-1)


@pytest.fixture(scope="module")
def hps_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("hpsv2"))
    tok = clip_tokenizer()
    assert len(tok) == OPEN_CLIP_CFG["text_cfg"]["vocab_size"]
    tok.save_pretrained(path)
    with open(os.path.join(path, "open_clip_config.json"), "w") as f:
        json.dump(OPEN_CLIP_CFG, f)
    torch.save({"epoch": 1, "state_dict": open_clip_state(OPEN_CLIP_CFG)}, os.path.join(path, hpsv2.CHECKPOINTS[0]))
    return path


TINY_BLIP = {"vision_config": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                   image_size=32, patch_size=8, layer_norm_eps=1e-6),
             "text_config": dict(vocab_size=30524, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=2, max_position_embeddings=64),
             "image_text_hidden_size": 16}


@pytest.fixture(scope="module")
def ir_dir(tmp_path_factory):
    """ImageReward's layout: a BLIP retrieval model, the MLP head and BLIP's BERT tokenizer."""
    path = str(tmp_path_factory.mktemp("imagereward"))
    torch.manual_seed(0)
    randomize(BlipForImageTextRetrieval(BlipConfig(**TINY_BLIP)), std=0.1).save_pretrained(path)
    save_file(randomize(aesthetic.MLP(32), std=0.3).state_dict(), os.path.join(path, aesthetic.MLP_FILE))
    tok = BertTokenizer(os.path.join(minilm_path(), "vocab.txt"), do_lower_case=True)
    tok.add_special_tokens({"bos_token": "[DEC]", "additional_special_tokens": ["[ENC]"]})
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def folders(clip_dir, aesthetic_dir, hps_dir, ir_dir):
    return {"clipscore": clip_dir, "pickscore": clip_dir, "hpsv2": hps_dir, "imagereward": ir_dir,
            "aesthetic": aesthetic_dir}


# ---------------------------------------------------------------- preprocessing


@pytest.mark.parametrize("hw, size", [((40, 48), 24), ((20, 26), 36)])  # down- and upsampling
def test_pixels_match_pil_bicubic(hw, size):
    """to_model_pixels reproduces the PIL pipeline (8-bit image, BICUBIC resize of the short side,
    centre crop) to within one 8-bit level."""
    x = torch.rand(1, 3, *hw) * 2 - 1
    ours = to_model_pixels(x, size, size - 4, (0, 0, 0), (1, 1, 1))[0]
    u8 = np.round((x[0].clamp(-1, 1).numpy() + 1) * 127.5).astype(np.uint8).transpose(1, 2, 0)
    h, w = hw
    new_h, new_w = (size, int(size * w / h)) if h <= w else (int(size * h / w), size)
    pil = np.asarray(Image.fromarray(u8).resize((new_w, new_h), Image.BICUBIC), np.float32) / 255
    top, left = round((new_h - size + 4) / 2), round((new_w - size + 4) / 2)
    ref = torch.from_numpy(pil[top:top + size - 4, left:left + size - 4]).permute(2, 0, 1)
    assert ours.shape == ref.shape
    assert (ours - ref).abs().max() <= 1 / 255 + 1e-6


# ---------------------------------------------------------------- formulas


def clip_cosine(path, images, prompts, size=36, crop=32):
    model = CLIPModel.from_pretrained(path, local_files_only=True).eval()
    tok = CLIPTokenizer.from_pretrained(path, local_files_only=True)
    with torch.no_grad():
        pixels = to_model_pixels(images, size, crop, OPENAI_MEAN, OPENAI_STD)
        ids = tok(prompts, padding=True, truncation=True, max_length=77, return_tensors="pt")
        img = model.get_image_features(pixel_values=pixels).pooler_output
        txt = model.get_text_features(**ids).pooler_output
    return F.cosine_similarity(img, txt, dim=-1), model


def test_clipscore_is_hessel_formula(clip_dir, images):
    scores = clipscore.load(clip_dir, batch_size=2)(images, PROMPTS)
    cos, _ = clip_cosine(clip_dir, images, ["A photo depicts " + p for p in PROMPTS])
    assert scores.shape == (len(PROMPTS),) and scores.dtype == torch.float32
    assert (cos > 0).any() and (cos < 0).any(), "the tiny CLIP should exercise both sides of the clamp"
    torch.testing.assert_close(scores, 2.5 * cos.clamp(min=0), atol=1e-5, rtol=1e-5)


def test_clipscore_torchmetrics_variant(clip_dir, images):
    scores = clipscore.load(clip_dir, variant="torchmetrics", batch_size=2)(images[:4], PROMPTS[:4])
    cos, _ = clip_cosine(clip_dir, images[:4], PROMPTS[:4])
    torch.testing.assert_close(scores, (100 * cos).clamp(min=0), atol=1e-4, rtol=1e-5)
    with pytest.raises(ValueError, match="variant"):
        clipscore.load(clip_dir, variant="nope")


def test_pickscore_is_scaled_cosine(clip_dir, images):
    scores = pickscore.load(clip_dir, batch_size=3)(images, PROMPTS)
    cos, model = clip_cosine(clip_dir, images, PROMPTS)
    torch.testing.assert_close(scores, model.logit_scale.exp().item() * cos, atol=1e-4, rtol=1e-5)


def test_hpsv2_matches_open_clip_forward(hps_dir, images):
    """The mapped checkpoint gives open_clip's cosine, with open_clip's own padding (zeros to 77)."""
    scores = hpsv2.load(hps_dir, batch_size=2)(images, PROMPTS)
    tok = CLIPTokenizer.from_pretrained(hps_dir, local_files_only=True)
    ids = tok(PROMPTS, padding="max_length", truncation=True, max_length=77, return_tensors="pt")["input_ids"]
    first_eot = (ids == tok.eos_token_id).int().argmax(-1, keepdim=True)
    ids = ids.masked_fill(torch.arange(77) > first_eot, 0)  # open_clip pads with id 0
    pixels = to_model_pixels(images, 32, 32, OPENAI_MEAN, OPENAI_STD, pil=False)
    ref = open_clip_cosine(open_clip_state(OPEN_CLIP_CFG), OPEN_CLIP_CFG, pixels, ids)
    torch.testing.assert_close(scores, ref, atol=1e-5, rtol=1e-5)
    assert scores.abs().max() <= 1


def test_hpsv2_checkpoint_must_fit(hps_dir, tmp_path):
    with pytest.raises(ValueError, match="unexpected keys"):
        hpsv2.from_open_clip({"visual.trunk.stem.weight": torch.zeros(1)})
    for f in os.listdir(hps_dir):  # the tokenizer and the config, without the checkpoint
        if not f.endswith(".pt"):
            (tmp_path / f).write_bytes(open(os.path.join(hps_dir, f), "rb").read())
    state = open_clip_state(OPEN_CLIP_CFG)
    del state["visual.ln_post.bias"]
    torch.save({"state_dict": state}, tmp_path / "HPS_v2_compressed.pt")
    with pytest.raises(ValueError, match="missing.*post_layernorm.bias"):
        hpsv2.load(str(tmp_path))


def imagereward_by_hand(path, images, prompts):
    blip = BlipForImageTextRetrieval.from_pretrained(path, local_files_only=True).eval()
    mlp = aesthetic.load_mlp(path)
    tok = BertTokenizer.from_pretrained(path, local_files_only=True)
    with torch.no_grad():
        pixels = to_model_pixels(images, 32, 32, OPENAI_MEAN, OPENAI_STD)
        embeds = blip.vision_model(pixel_values=pixels).last_hidden_state
        t = tok(prompts, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
        out = blip.text_encoder(input_ids=t["input_ids"], attention_mask=t["attention_mask"],
                                encoder_hidden_states=embeds,
                                encoder_attention_mask=torch.ones(embeds.shape[:-1], dtype=torch.long))
        r = mlp(out.last_hidden_state[:, 0]).squeeze(-1)
    return r, mlp


def test_imagereward_formula(ir_dir, images):
    scores = imagereward.load(ir_dir, batch_size=2)(images, PROMPTS)
    r, mlp = imagereward_by_hand(ir_dir, images, PROMPTS)
    torch.testing.assert_close(scores, (r - 0.16717362830052426) / 1.0333394966054072, atol=1e-5, rtol=1e-5)
    # the head has no activations: it is affine
    x, y = torch.randn(2, 32), torch.randn(2, 32)
    torch.testing.assert_close(mlp(0.3 * x + 0.7 * y), 0.3 * mlp(x) + 0.7 * mlp(y), atol=1e-4, rtol=1e-4)


def test_imagereward_cross_attends_to_the_image(ir_dir, images):
    scorer = imagereward.load(ir_dir)
    same_prompt = [PROMPTS[0]] * 2
    a, b = scorer(images[:2], same_prompt)
    assert not torch.isclose(a, b)


def test_imagereward_convert_from_original(ir_dir, images, tmp_path):
    """The authors' key layout (BLIP's timm ViT and med.py BERT, `mlp.layers.*`) converts back."""
    blip = BlipForImageTextRetrieval.from_pretrained(ir_dir, local_files_only=True)
    vit = {"embeddings.class_embedding": "cls_token", "embeddings.position_embedding": "pos_embed",
           "embeddings.patch_embedding": "patch_embed.proj", "post_layernorm": "norm", "encoder.layers.": "blocks.",
           "layer_norm1": "norm1", "layer_norm2": "norm2", "self_attn.qkv": "attn.qkv",
           "self_attn.projection": "attn.proj"}
    original = {"blip.text_encoder.embeddings.position_ids": torch.arange(64)[None]}
    for key, value in blip.state_dict().items():
        if key.startswith("vision_model."):
            key = key.removeprefix("vision_model.")
            for new, old in vit.items():
                key = key.replace(new, old)
            original["blip.visual_encoder." + key] = value
        elif key.startswith(("text_encoder.", "vision_proj.", "text_proj.")):
            original["blip." + key] = value
    original |= {"mlp." + k: v for k, v in aesthetic.load_mlp(ir_dir).state_dict().items()}
    assert "blip.visual_encoder.blocks.1.attn.qkv.weight" in original
    assert "blip.text_encoder.encoder.layer.1.crossattention.self.key.weight" in original
    torch.save(original, tmp_path / "ImageReward.pt")
    out = imagereward.convert(str(tmp_path / "ImageReward.pt"), str(tmp_path / "converted"), config=TINY_BLIP)
    expected = imagereward.load(ir_dir)(images, PROMPTS)
    torch.testing.assert_close(imagereward.load(out)(images, PROMPTS), expected, atol=1e-6, rtol=1e-6)


def test_aesthetic_is_mlp_of_normalised_embedding(aesthetic_dir, images):
    scores = aesthetic.load(aesthetic_dir, batch_size=2)(images, ["ignored"] * len(images))
    model = CLIPModel.from_pretrained(aesthetic_dir, local_files_only=True).eval()
    with torch.no_grad():
        pixels = to_model_pixels(images, 32, 32, OPENAI_MEAN, OPENAI_STD)
        emb = model.get_image_features(pixel_values=pixels).pooler_output
        expected = aesthetic.load_mlp(aesthetic_dir)(emb / emb.norm(dim=-1, keepdim=True)).squeeze(-1)
    torch.testing.assert_close(scores, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(aesthetic.load(aesthetic_dir)(images[:2], ["x", "something else"]), scores[:2])


# ---------------------------------------------------------------- batching, truncation, errors


@pytest.mark.parametrize("name", ["clipscore", "pickscore", "hpsv2", "imagereward", "aesthetic"])
def test_scores_do_not_depend_on_batch(name, folders, images):
    module = importlib.import_module(f"reward.{name}")
    one = module.load(folders[name], batch_size=1)(images, PROMPTS)
    four = module.load(folders[name], batch_size=4)(images, PROMPTS)
    assert one.shape == (len(PROMPTS),)
    torch.testing.assert_close(one, four, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["clipscore", "pickscore", "hpsv2", "imagereward"])
def test_text_past_the_limit_is_ignored(name, folders, images):
    """77 CLIP tokens (35 for ImageReward): words beyond the cut change nothing."""
    scorer = importlib.import_module(f"reward.{name}").load(folders[name])
    base = scorer(images[:2], [LONG, PROMPTS[0]])
    torch.testing.assert_close(scorer(images[:2], [LONG + " more words here", PROMPTS[0]]), base)
    if name != "clipscore":  # (whose clamp at 0 could hide a change)
        assert scorer(images[:1], [LONG[:20]])[0] != base[0]  # ...while words inside the cut count


def test_truncation_keeps_end_of_text_except_torchmetrics(clip_dir):
    tok = CLIPTokenizer.from_pretrained(clip_dir, local_files_only=True)
    kept = clipscore.tokenize_clip(tok, [LONG, "ab"], 77)["input_ids"]
    sliced = clipscore.tokenize_clip(tok, [LONG, "ab"], 77, slice_ids=True)["input_ids"]
    assert kept.shape == sliced.shape == (2, 77)
    assert kept[0, -1] == tok.eos_token_id and sliced[0, -1] != tok.eos_token_id
    assert torch.equal(kept[1], sliced[1])  # short prompts are the same either way


@pytest.mark.parametrize("name, lacks", [("clipscore", "model.safetensors"), ("pickscore", "vocab.json"),
                                         ("hpsv2", "HPS_v2.1_compressed.pt"), ("imagereward", "mlp.safetensors"),
                                         ("aesthetic", "mlp.safetensors")])
def test_missing_folder_or_files_are_named(name, lacks, tmp_path):
    module = importlib.import_module(f"reward.{name}")
    for path in (None, str(tmp_path / "absent")):
        with pytest.raises(FileNotFoundError, match="does not exist") as err:
            module.load(path)
        assert name in str(err.value)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError) as err:
        module.load(str(tmp_path))
    assert str(tmp_path) in str(err.value) and lacks in str(err.value)


def test_scorer_spec_resolves(clip_dir, images):
    scores = get_scorer(f"pickscore:{clip_dir}")(images[:2], PROMPTS[:2])
    assert scores.shape == (2,) and torch.isfinite(scores).all()
