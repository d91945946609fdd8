import os

import pytest
import torch
from conftest import randomize
from diffusers import SD3Transformer2DModel

from base_model.convert import from_diffusers, to_diffusers
from base_model.mmdit import GELUTanh, MMDiT, MMDiTConfig, count_flops, count_params, preset

TINY = dict(depth=2, hidden=32, heads=2, patch_size=2, in_channels=3, sample_size=16,
            pos_embed_max_size=16, context_dim=12, pooled_dim=10)


def inputs(cfg, B=3, H=16, W=16, L=5):
    return (torch.randn(B, cfg.in_channels, H, W), torch.rand(B),
            torch.randn(B, L, cfg.context_dim), torch.randn(B, cfg.pooled_dim))


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_shapes_and_adaln_zero_init():
    cfg = MMDiTConfig(**TINY)
    model = MMDiT(cfg)
    x, t, ctx, pooled = inputs(cfg, H=16, W=12)
    v = model(x, t, ctx, pooled)
    assert v.shape == x.shape
    assert torch.all(v == 0), "zero-initialised modulation and output must give v = 0 at init"
    assert model.blocks[-1].ctx.pre_only and not hasattr(model.blocks[-1].ctx, "mlp")


def test_paper_size_rule_and_presets():
    cfg = preset("d24")
    assert (cfg.hidden, cfg.heads) == (64 * 24, 24)
    with pytest.raises(ValueError, match="unknown preset"):
        preset("d7")
    with pytest.raises(ValueError, match="unknown MMDiTConfig keys"):
        MMDiTConfig.from_dict({"depth": 2, "widht": 3})


@pytest.mark.parametrize("name, expected", [("d24", 2.0e9), ("d38", 8.1e9)])
def test_param_counts_on_meta_device(name, expected):
    n = count_params(preset(name))
    assert abs(n - expected) / expected < 0.02, n


def test_flop_counter_matches_the_weights_each_token_touches():
    cfg = preset("d24")
    Ti, Tc = 64 * 64, 154  # a 1024² image (128² latents, patch 2) and SD3's context
    with torch.device("meta"):
        model = MMDiT(cfg)
    expected = 4 * (Ti + Tc) ** 2 * cfg.hidden * cfg.depth  # QKᵀ and AV
    for block in model.blocks:
        for stream, tokens in ((block.img, Ti), (block.ctx, Tc)):
            for name, m in stream.named_modules():
                if isinstance(m, torch.nn.Linear) and name != "adaLN":
                    expected += 2 * tokens * m.weight.numel()
    expected += 2 * Ti * (model.x_embedder.weight.numel() + model.final_linear.weight.numel())
    expected += 2 * Tc * model.context_embedder.weight.numel()
    assert count_flops(cfg, image_size=128, context_len=Tc) == pytest.approx(expected, rel=1e-3)


PARITY = [  # (diffusers config, input H, W)
    (dict(patch_size=2, qk_norm=None), 16, 12),
    (dict(patch_size=2, qk_norm="rms_norm"), 12, 16),
    (dict(patch_size=1, qk_norm=None), 8, 10),
    (dict(patch_size=1, qk_norm="rms_norm"), 14, 14),
    (dict(patch_size=4, qk_norm=None, num_layers=1), 24, 32),
]


@pytest.mark.parametrize("dcfg, H, W", PARITY)
def test_parity_with_diffusers_both_directions(dcfg, H, W):
    dcfg = {**dict(sample_size=16, in_channels=4, num_layers=3, attention_head_dim=8, num_attention_heads=4,
                   joint_attention_dim=24, caption_projection_dim=32, pooled_projection_dim=20, out_channels=4,
                   pos_embed_max_size=16 if dcfg["patch_size"] < 4 else 8), **dcfg}
    theirs = SD3Transformer2DModel(**dcfg).eval()
    ours = from_diffusers(theirs).eval()
    x, t, ctx, pooled = inputs(ours.config, H=H, W=W, L=7)
    with torch.no_grad():
        ref = theirs(hidden_states=x, encoder_hidden_states=ctx, pooled_projections=pooled, timestep=1000 * t).sample
        out = ours(x, t, ctx, pooled)
        assert rel_err(out, ref) <= 1e-5
        # and back: a randomised MMDiT converted to diffusers
        randomize(ours)
        back = to_diffusers(ours).eval()
        ref = back(hidden_states=x, encoder_hidden_states=ctx, pooled_projections=pooled, timestep=1000 * t).sample
        out = ours(x, t, ctx, pooled)
        assert rel_err(out, ref) <= 1e-5
        assert torch.equal(back.pos_embed.pos_embed, theirs.pos_embed.pos_embed)


def test_conversion_rejects_mmdit_x():
    d = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
                              num_attention_heads=2, joint_attention_dim=8, caption_projection_dim=16,
                              pooled_projection_dim=8, out_channels=4, pos_embed_max_size=8,
                              dual_attention_layers=(0,))
    with pytest.raises(ValueError, match="dual_attention_layers"):
        from_diffusers(d)


def test_position_table_rejects_too_large_grid():
    model = MMDiT(MMDiTConfig(**TINY))
    with pytest.raises(ValueError, match="pos_embed_max_size"):
        model(*inputs(model.config, H=40, W=16))


def test_save_load_identical(tmp_path):
    model = randomize(MMDiT(MMDiTConfig(**TINY, qk_norm=True)))
    path = tmp_path / "ckpt"
    model.save_pretrained(str(path))
    model.save_pretrained(str(path))  # overwriting an existing checkpoint is atomic too
    assert sorted(os.listdir(path)) == ["config.json", "model.safetensors"]
    assert [p for p in os.listdir(tmp_path) if p != "ckpt"] == []  # no temporary folder left
    loaded = MMDiT.from_pretrained(str(path))
    args = inputs(model.config)
    assert torch.equal(model(*args), loaded(*args))
    with pytest.raises(FileNotFoundError, match="no config.json"):
        MMDiT.from_pretrained(str(tmp_path))


def test_gradient_checkpointing_same_gradients():
    model = randomize(MMDiT(MMDiTConfig(**TINY)))
    args = inputs(model.config)
    grads = []
    for ckpt in (False, True):
        model.zero_grad()
        model.gradient_checkpointing = ckpt
        model(*args).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_gelu_tanh_matches_torch_in_value_and_gradient():
    x = (torch.randn(4096, dtype=torch.float64) * 4).requires_grad_()
    ours, ref = GELUTanh()(x), torch.nn.functional.gelu(x, approximate="tanh")
    assert (ours - ref).abs().max() < 1e-12
    g = torch.randn_like(x)
    (gx_ours,) = torch.autograd.grad(ours, x, g)
    (gx_ref,) = torch.autograd.grad(ref, x, g)
    assert (gx_ours - gx_ref).abs().max() < 1e-12
    xf = x.detach().float().requires_grad_()
    recorded = GELUTanh()(xf)
    with torch.no_grad():  # the path without autograd (a DPO reference) gives the same bits
        assert torch.equal(GELUTanh()(xf), recorded.detach())
    xb = xf.detach().bfloat16()  # other dtypes (and GPUs) use torch's kernel itself
    assert torch.equal(GELUTanh()(xb), torch.nn.functional.gelu(xb, approximate="tanh"))
