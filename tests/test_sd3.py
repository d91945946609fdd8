"""SD3 folders: a tiny random StableDiffusion3Pipeline written with diffusers' and transformers' own
`save_pretrained`, offline, then loaded by `base_model.sd3` and checked against the pipeline itself:
the text conditioning equals `encode_prompt`, and the same prompt and seed give the same latents
and image, with classifier-free guidance on the encoded empty prompt. MMDiT-X is refused clearly."""

import json
import os

import pytest
import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
from transformers import (CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer, T5Config, T5EncoderModel,
                          T5Tokenizer)

from base_model.sampling import sample
from base_model.sd3 import SD3TextEncoder, is_sd3_folder, load_sd3, sample_sd3

torch.set_num_threads(1)  # other torch jobs may share the two cores

LETTERS = "abcdefghijklmnopqrstuvwxyz"
WORDS = "a red blue green square circle left right of".split()
PROMPTS = ["a red square left of a blue circle", "a green circle"]
SEEDS = [3, 7]
T5_WIDTH = 96  # ≥ CLIP-L + CLIP-G widths (32 + 48), as 4096 ≥ 768 + 1280 in SD3
# Measured (4 steps, float32, CPU): latents (max |z| ≈ 4) differ by ≤ 7.8e-7 at guidance 3 and
# 2.4e-7 at 1, images in [0, 1] by ≤ 1.2e-6: float32 rounding in the timestep embedding and the
# Euler step. The tolerance leaves room for other BLAS builds; zeros as the unconditional branch
# miss by 0.42, so it still sees that difference.
LATENT_ATOL = IMAGE_ATOL = 1e-5


def tiny_clip(hidden: int, projection: int, pad_token: str):
    """A random 2-layer CLIP text tower with a letter-level BPE vocabulary. CLIP-G's tokenizer pads
    with "!" in SD3, CLIP-L's with <|endoftext|>: both are kept, as they change the states."""
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "!": 2}
    for c in LETTERS:
        vocab[c], vocab[c + "</w>"] = len(vocab), len(vocab) + 1
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], pad_token=pad_token, model_max_length=77)
    cfg = CLIPTextConfig(vocab_size=len(vocab), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                         num_attention_heads=2, projection_dim=projection, max_position_embeddings=77,
                         bos_token_id=0, eos_token_id=1, pad_token_id=1)
    return CLIPTextModelWithProjection(cfg), tokenizer


def tiny_t5():
    """A random 2-layer T5 encoder with a small unigram word vocabulary."""
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -3.0)]
    vocab += [("▁" + w, -1.0) for w in WORDS] + [(c, -5.0) for c in LETTERS]
    tokenizer = T5Tokenizer(vocab=vocab, extra_ids=0)
    cfg = T5Config(vocab_size=len(tokenizer), d_model=T5_WIDTH, d_kv=16, d_ff=64, num_layers=2, num_heads=2,
                   pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    return T5EncoderModel(cfg), tokenizer


def tiny_transformer(**overrides):
    """SD3.5-style (QK RMSNorm); 8×8 latents of 4 channels, 2 blocks of width 16."""
    kw = dict(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8,
              num_attention_heads=2, joint_attention_dim=T5_WIDTH, caption_projection_dim=16,
              pooled_projection_dim=16 + 24, pos_embed_max_size=8, qk_norm="rms_norm")
    return SD3Transformer2DModel(**{**kw, **overrides})


@pytest.fixture(scope="module")
def sd3_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("sd3"))
    torch.manual_seed(0)
    (clip_l, tok_l), (clip_g, tok_g) = tiny_clip(32, 16, "<|endoftext|>"), tiny_clip(48, 24, "!")
    t5, tok_t5 = tiny_t5()
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                        latent_channels=4, norm_num_groups=4, sample_size=16, scaling_factor=1.5305,
                        shift_factor=0.0609)
    StableDiffusion3Pipeline(transformer=tiny_transformer(), scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                             vae=vae, text_encoder=clip_l, tokenizer=tok_l, text_encoder_2=clip_g,
                             tokenizer_2=tok_g, text_encoder_3=t5, tokenizer_3=tok_t5).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def pipe(sd3_dir):
    p = StableDiffusion3Pipeline.from_pretrained(sd3_dir, local_files_only=True)
    p.set_progress_bar_config(disable=True)
    return p


@pytest.fixture(scope="module")
def sd3(sd3_dir):
    return load_sd3(sd3_dir)


def generators(seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


def test_folder_and_parts(sd3_dir, sd3, tmp_path):
    assert is_sd3_folder(sd3_dir) and not is_sd3_folder(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="not a diffusers SD3 folder"):
        load_sd3(str(tmp_path))
    model, text, vae, info = sd3
    cfg = model.config
    assert (cfg.depth, cfg.hidden, cfg.heads, cfg.qk_norm, cfg.context_dim, cfg.pooled_dim) == (2, 16, 2, True, 96, 40)
    assert (vae.channels, vae.downsample, vae.scaling_factor, vae.shift_factor) == (4, 2, 1.5305, 0.0609)
    assert (text.context_dim, text.pooled_dim, text.context_len) == (96, 40, 77 + 256)
    assert [(p.name, p.seq, p.pooled, p.width) for p in text.layout] == [
        ("clip", (0, 77), (0, 40), 80), ("t5", (77, 333), (40, 40), 96)]
    assert info["shift"] == 3.0 and info["resolution"] == 16 and info["t5"]


def test_text_conditioning_equals_encode_prompt(sd3, pipe):
    """Positive prompts and the negative branch (diffusers encodes "", not zeros), with and without T5."""
    _, text, _, _ = sd3
    with torch.no_grad():
        ctx, neg_ctx, pooled, neg_pooled = pipe.encode_prompt(PROMPTS, None, None, do_classifier_free_guidance=True)
    ours, ours_pooled = text.encode(PROMPTS)
    empty, empty_pooled = text.encode([""])
    assert ours.shape == (2, 333, 96) and ours_pooled.shape == (2, 40)
    torch.testing.assert_close(ours, ctx, atol=0, rtol=0)  # the same modules on the same ids
    torch.testing.assert_close(ours_pooled, pooled, atol=0, rtol=0)
    # "" is encoded once (the cache), diffusers encodes it per prompt: batch-1 vs batch-2 matmul
    # blocking differs in the last bits (measured 2.4e-7 on the pooled vector)
    torch.testing.assert_close(empty.expand(2, -1, -1), neg_ctx, atol=1e-6, rtol=0)
    torch.testing.assert_close(empty_pooled.expand(2, -1), neg_pooled, atol=1e-6, rtol=0)
    assert empty.abs().amax() > 0.1  # SD3's unconditional input is not zeros
    assert (ours[:, :77, 80:] == 0).all()  # CLIP-L ⊕ CLIP-G (80 wide) zero-padded to T5's width


def test_without_t5_its_block_is_zeros(sd3_dir):
    no_t5 = StableDiffusion3Pipeline.from_pretrained(sd3_dir, text_encoder_3=None, tokenizer_3=None,
                                                     local_files_only=True)
    text = SD3TextEncoder(sd3_dir, t5=False)
    with torch.no_grad():
        ctx, _, pooled, _ = no_t5.encode_prompt(PROMPTS, None, None, do_classifier_free_guidance=False)
    ours, ours_pooled = text.encode(PROMPTS)
    torch.testing.assert_close(ours, ctx, atol=0, rtol=0)
    torch.testing.assert_close(ours_pooled, pooled, atol=0, rtol=0)
    assert (ours[:, 77:] == 0).all()


@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_same_prompt_and_seed_give_the_same_image(sd3, pipe, guidance):
    """Noise: seed s is diffusers' `generator=torch.Generator().manual_seed(s)`, one per image.
    guidance 3 runs CFG against the encoded empty prompt; guidance 1 none (as diffusers)."""
    model, text, _, info = sd3
    kw = dict(num_inference_steps=4, guidance_scale=guidance)
    with torch.no_grad():
        ref_latents = pipe(PROMPTS, generator=generators(SEEDS), output_type="latent", **kw).images
        ref_images = pipe(PROMPTS, generator=generators(SEEDS), output_type="pt", **kw).images  # [0, 1]
    context, pooled = text.encode(PROMPTS)
    latents = sample(model, context, pooled, SEEDS, (4, 8, 8), steps=4, shift=info["shift"], guidance=guidance,
                     uncond=text.encode([""]), progress=False)
    torch.testing.assert_close(latents, ref_latents, atol=LATENT_ATOL, rtol=0)
    images = sample_sd3(sd3, PROMPTS, SEEDS, steps=4, guidance=guidance)
    torch.testing.assert_close((images + 1) / 2, ref_images, atol=IMAGE_ATOL, rtol=0)
    assert (latents[0] - latents[1]).abs().amax() > 0.1  # prompts and seeds matter
    if guidance > 1:  # and the comparison sees the unconditional branch: zeros would not match SD3
        zeros = sample(model, context, pooled, SEEDS, (4, 8, 8), steps=4, shift=info["shift"], guidance=guidance,
                       progress=False)
        assert (zeros - ref_latents).abs().amax() > 100 * LATENT_ATOL


def test_mmdit_x_is_refused_clearly(tmp_path):
    """SD3.5-Medium's extra image-only attention: the converter's message, before any weights load."""
    tiny_transformer(dual_attention_layers=(0,)).save_pretrained(tmp_path / "transformer")
    with open(tmp_path / "model_index.json", "w") as f:
        json.dump({"_class_name": "StableDiffusion3Pipeline"}, f)
    assert is_sd3_folder(str(tmp_path))
    with pytest.raises(ValueError, match="MMDiT-X.*not supported") as err:
        load_sd3(str(tmp_path))
    assert os.fspath(tmp_path) in str(err.value)


def test_sd3_folder_runs_pretraining_continuation_dpo_and_eval(sd3_dir, tmp_path):
    """--init_from / --base / --model take the SD3 folder: its transformer, text encoders, VAE and
    schedule are used end to end (tiny sizes: 16-px images, 2 steps each)."""
    import numpy as np
    from accelerate.state import AcceleratorState, PartialState

    from align import dpo
    from align.pairs import encode_png, pairs_dataset
    from base_model import pretrain
    from base_model.adapters import load
    from base_model.cli import parse
    from reward import eval as reval

    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (16, 16, 3), dtype=np.uint8) for _ in range(8)]
    rows = [{"image": encode_png(im), "caption": PROMPTS[i % 2]} for i, im in enumerate(images)]
    import datasets
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "data.parquet"))

    def reset():
        AcceleratorState._reset_state(True)
        PartialState._reset_state()

    pretrain.main(parse(pretrain.PretrainConfig, [
        "--init_from", sd3_dir, "--dataset", str(tmp_path / "data.parquet"), "--resolution", "16", "--num_val", "2",
        "--max_steps", "2", "--per_device_train_batch_size", "2", "--eval_steps", "2", "--save_steps", "2",
        "--num_samples", "2", "--sample_steps", "2", "--report_to", "none", "--output_dir", str(tmp_path / "pt")]))
    reset()
    cont = load(str(tmp_path / "pt" / "final"))
    assert cont.image_space == "sd3" and cont.shift == 3.0 and cont.uncond is not None  # SD3's schedule and CFG
    assert cont.generate(["a red square"], [0], steps=2, guidance=3.0, progress=False).shape == (1, 3, 16, 16)

    pairs = [{"caption": PROMPTS[0], "jpg_0": encode_png(images[i]), "jpg_1": encode_png(images[i + 1]),
              "label_0": 1.0, "label_1": 0.0} for i in range(0, 8, 2)]
    pairs_dataset(pairs).to_parquet(str(tmp_path / "pairs.parquet"))
    dpo.main(parse(dpo.DPOConfig, [
        "--base", sd3_dir, "--pairs", str(tmp_path / "pairs.parquet"), "--max_steps", "2",
        "--per_device_train_batch_size", "2", "--lora_r", "2", "--lora_alpha", "2", "--num_samples", "1",
        "--sample_steps", "2", "--report_to", "none", "--output_dir", str(tmp_path / "dpo")]))
    reset()
    out = reval.main(["--model", f"sd3={sd3_dir}", "--model", f"dpo={sd3_dir}+{tmp_path / 'dpo' / 'final'}",
                      "--prompts", str(_prompt_file(tmp_path)), "--n_per_prompt", "1", "--steps", "2",
                      "--scorers", "compositional", "--output_dir", str(tmp_path / "eval")])
    assert set(out["models"]) == {"sd3", "dpo"} and os.path.exists(tmp_path / "eval" / "report.html")


def _prompt_file(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("a red square\na blue circle\n")
    return path
