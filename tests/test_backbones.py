"""The baselines beside MM-DiT: same call and checkpoint format, gradients everywhere, they learn."""

import json

import pytest
import torch
from conftest import randomize

from base_model.backbones import MODEL_CLASSES, build_model, forward_flops
from base_model.formulations import formulation_loss
from base_model.mmdit import MMDiT, count_flops, count_params, preset
from base_model.sampling import sample

TINY = dict(depth=3, hidden=32, heads=2, patch_size=4, in_channels=3, sample_size=16, pos_embed_max_size=4,
            context_dim=12, pooled_dim=10)


def inputs(n=2):
    return torch.randn(n, 3, 16, 16), torch.rand(n), torch.randn(n, 5, 12), torch.randn(n, 10)


@pytest.mark.parametrize("backbone", sorted(MODEL_CLASSES))
def test_shapes_gradients_and_round_trip(backbone, tmp_path):
    model = randomize(build_model(preset("toy", **TINY, backbone=backbone, formulation="v_cos")))
    assert type(model) is MODEL_CLASSES[backbone]
    x, t, context, pooled = inputs()
    out = model(x, t, context, pooled)
    assert out.shape == x.shape
    out.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters()), backbone
    model.save_pretrained(str(tmp_path / "ckpt"))
    with open(tmp_path / "ckpt" / "config.json") as f:
        assert json.load(f)["backbone"] == backbone
    loaded = MMDiT.from_pretrained(str(tmp_path / "ckpt"))
    assert type(loaded) is type(model) and loaded.config == model.config
    assert torch.equal(loaded(x, t, context, pooled), model(x, t, context, pooled))
    model.gradient_checkpointing = True  # the same numbers through torch.utils.checkpoint
    assert torch.allclose(model(x, t, context, pooled), out, atol=1e-6)


def test_a_checkpoint_without_the_new_keys_is_mmdit_rf(tmp_path):
    MMDiT(preset("toy", **TINY)).save_pretrained(str(tmp_path / "old"))
    cfg_file = tmp_path / "old" / "config.json"
    cfg = json.loads(cfg_file.read_text())
    del cfg["backbone"], cfg["formulation"]
    cfg_file.write_text(json.dumps(cfg))
    model = MMDiT.from_pretrained(str(tmp_path / "old"))
    assert (model.config.backbone, model.config.formulation) == ("mmdit", "rf")


def test_flops_counted_by_tracing_agree_with_count_flops():
    cfg = preset("toy")
    traced, formula = forward_flops(cfg, 32, 16), count_flops(cfg, 32, 16)
    assert abs(traced - formula) / formula < 0.03  # count_flops leaves out the adaLN and embedder matmuls
    assert count_params(preset("toy", backbone="dit")) < count_params(cfg)  # one weight set instead of two


@pytest.mark.parametrize("backbone", sorted(MODEL_CLASSES))
def test_a_few_steps_reduce_the_loss_and_sampling_reads_the_formulation(backbone):
    torch.manual_seed(0)
    model = build_model(preset("toy", **TINY, backbone=backbone, formulation="eps_linear"))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    x0 = torch.rand(8, 3, 16, 16) * 2 - 1
    _, _, context, pooled = inputs(8)
    gen = torch.Generator().manual_seed(0)
    noise, t = torch.randn(8, 3, 16, 16, generator=gen), torch.rand(8, generator=gen)

    def loss():
        return formulation_loss("eps_linear", model, x0, noise, t, context, pooled).mean()

    first = loss().item()
    for _ in range(15):
        opt.zero_grad()
        loss().backward()
        opt.step()
    assert loss().item() < 0.8 * first
    images = sample(model.eval(), context[:2], pooled[:2], [0, 1], (3, 16, 16), steps=3, guidance=2.0, progress=False)
    assert images.shape == (2, 3, 16, 16) and torch.isfinite(images).all()


def test_alignment_refuses_a_base_trained_as_eps(tmp_path):
    from base_model.adapters import Loaded, require_rf
    from base_model.errors import InputError

    loaded = Loaded(MMDiT(preset("toy", **TINY, formulation="eps_linear")), None, None, 1.0, None, "pixels", {})
    with pytest.raises(InputError, match="trained as 'eps_linear'"):
        require_rf(loaded)
