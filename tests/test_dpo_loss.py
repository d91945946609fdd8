"""Diffusion-DPO loss: hand-computed values, log 2 at a zero LoRA, symmetry, only LoRA moves."""

import math

import pytest
import torch

from align.loss import dpo_loss
from align.lora import add_lora, loraplus_groups, merged, snapshot_adapter
from base_model.flow import flow_loss
from base_model.mmdit import MMDiT, preset
from tests.conftest import randomize

POLICY = torch.tensor([0.30, 0.50, 0.40, 0.20])  # [w1, w2; l1, l2]
REF = torch.tensor([0.35, 0.45, 0.38, 0.25])


def hand_inside(beta):
    # pair 1: (0.30-0.35) - (0.40-0.38) = -0.07;  pair 2: (0.50-0.45) - (0.20-0.25) = 0.10
    return torch.tensor([-beta / 2 * -0.07, -beta / 2 * 0.10])


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "ipo"])
def test_loss_matches_hand_computation(loss_type):
    beta = 10.0
    inside = hand_inside(beta)  # [0.35, -0.5]
    expected = {
        "sigmoid": sum(math.log(1 + math.exp(-v)) for v in inside.tolist()) / 2,
        "hinge": sum(max(0.0, 1 - v) for v in inside.tolist()) / 2,
        "ipo": sum((v / beta - 1 / (2 * beta)) ** 2 for v in inside.tolist()) / 2,
    }[loss_type]
    loss, m = dpo_loss(POLICY, REF, beta, loss_type)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert m["rewards/accuracies"].item() == 0.5
    assert m["rewards/margins"].item() == pytest.approx(inside.mean().item(), rel=1e-5)
    assert m["rewards/chosen"].item() == pytest.approx(-beta / 2 * ((0.30 - 0.35) + (0.50 - 0.45)) / 2, abs=1e-6)


def test_sft_term_and_sft_mode():
    base, _ = dpo_loss(POLICY, REF, 10.0)
    with_sft, _ = dpo_loss(POLICY, REF, 10.0, sft_weight=3.0)
    assert (with_sft - base).item() == pytest.approx(3.0 * 0.40, rel=1e-5)  # mean of the winners' errors
    sft, m = dpo_loss(POLICY, None, 10.0, "sft")
    assert sft.item() == pytest.approx(0.40, rel=1e-6) and "rewards/margins" not in m


def test_swapping_winner_and_loser_flips_the_margin():
    _, m = dpo_loss(POLICY, REF, 10.0)
    swapped = lambda x: torch.cat(x.chunk(2)[::-1])  # noqa: E731
    _, s = dpo_loss(swapped(POLICY), swapped(REF), 10.0)
    assert s["rewards/margins"].item() == pytest.approx(-m["rewards/margins"].item(), rel=1e-6)
    assert m["rewards/margins"].item() != 0


def test_bad_shapes_and_types_are_named():
    with pytest.raises(ValueError, match="loss_type"):
        dpo_loss(POLICY, REF, 1.0, "kto")
    with pytest.raises(ValueError, match="2B"):
        dpo_loss(POLICY[:3], REF[:3], 1.0)


def lora_toy():
    base = randomize(MMDiT(preset("toy", depth=2, hidden=32, heads=2)))
    return add_lora(base.requires_grad_(False), r=4, alpha=4)


def pair_batch(B=4):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2 * B, 3, 32, 32, generator=g)
    noise, t = torch.randn(B, 3, 32, 32, generator=g).repeat(2, 1, 1, 1), torch.rand(B, generator=g).repeat(2)
    ctx, pooled = torch.randn(B, 5, 384, generator=g).repeat(2, 1, 1), torch.randn(B, 384, generator=g).repeat(2, 1)
    return x, noise, t, ctx, pooled


def test_zero_lora_gives_log2_and_half_accuracy():
    model = lora_toy()
    batch = pair_batch()
    with torch.no_grad(), model.disable_adapter():
        ref = flow_loss(model, *batch)
    policy = flow_loss(model, *batch)
    loss, m = dpo_loss(policy, ref, 5000.0)
    assert loss.item() == torch.tensor(math.log(2)).item()  # exactly log 2 in float32
    assert m["rewards/margins"].item() == 0.0
    assert m["rewards/accuracies"].item() == 0.5


def test_a_step_moves_only_lora_parameters():
    model = lora_toy()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batch = pair_batch()
    for _ in range(2):  # B starts at 0, so the first step moves only B; the second moves A too
        with torch.no_grad(), model.disable_adapter():
            ref = flow_loss(model, *batch)
        loss, _ = dpo_loss(flow_loss(model, *batch), ref, 100.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert moved and all("lora_" in n for n in moved)
    assert {n for n in moved if "lora_A" in n} and {n for n in moved if "lora_B" in n}


def test_loraplus_steps_b_at_ratio_times_the_rate_of_a():
    model = moved_lora_toy()  # B ≠ 0: A has gradients on the first step too
    snapshot_adapter(model, "old")  # a frozen copy stays out of the groups
    groups = loraplus_groups(model, 1e-3, 4.0)
    assert [g["lr"] for g in groups] == [1e-3, 4e-3] and all(p.requires_grad for g in groups for p in g["params"])
    names = {id(p): n for n, p in model.named_parameters()}
    assert all("lora_A" in names[id(p)] for p in groups[0]["params"])
    assert all("lora_B" in names[id(p)] for p in groups[1]["params"])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW(groups, weight_decay=0.0)
    y = model(*_toy_inputs())
    y.square().mean().backward()
    opt.step()  # Adam's first step moves each element by its group's lr (|g| ≫ eps)
    step = {k: max((p - before[n]).abs().max().item() for n, p in model.named_parameters() if f"{k}.default" in n)
            for k in ("lora_A", "lora_B")}
    assert step["lora_A"] == pytest.approx(1e-3, rel=1e-3) and step["lora_B"] == pytest.approx(4e-3, rel=1e-3)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters() if ".old." in n or "lora_" not in n)


def moved_lora_toy():
    """lora_toy with B ≠ 0: an adapter that changes the outputs."""
    model = lora_toy()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    return model


def _toy_inputs(B=3):
    g = torch.Generator().manual_seed(2)
    return (torch.randn(B, 3, 32, 32, generator=g), torch.rand(B, generator=g),
            torch.randn(B, 5, 384, generator=g), torch.randn(B, 384, generator=g))


def test_merged_adapter_runs_like_the_adapter_and_restores_the_base_exactly():
    model = moved_lora_toy()
    snapshot_adapter(model, "old")
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B.default" in n:
                p.add_(0.05)  # the policy moves on; "old" stays
    inputs = _toy_inputs()
    weights = {n: (p, p.detach().clone()) for n, p in model.named_parameters() if "base_layer" in n}
    with torch.no_grad():
        policy = model(*inputs)
        model.base_model.set_adapter("old")
        old = model(*inputs)
        model.base_model.set_adapter("default")
    with merged(model, "old"):
        fast = model(*inputs)
    torch.testing.assert_close(fast, old, rtol=1e-5, atol=1e-5)
    assert (fast - policy).abs().max() > 1e-3  # it ran "old", not the policy
    assert all(torch.equal(p, before) for p, before in weights.values())  # restored bit-exactly
    assert torch.equal(model(*inputs), policy)  # and the policy trains as before, with gradients
    assert all(p.requires_grad == ("lora_" in n and ".default." in n) for n, p in model.named_parameters())


def test_merged_falls_back_to_the_adapter_where_weights_cannot_be_merged():
    model = moved_lora_toy()
    inputs = _toy_inputs()
    with torch.no_grad():
        expected = model(*inputs)
    weight = next(p for n, p in model.named_parameters() if "base_layer" in n)
    weight.ds_id = 0  # as ZeRO-3 marks a partitioned parameter: not to be merged in place
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with merged(model, "default"):
        out = model(*inputs)
    assert torch.equal(out, expected)  # the unmerged adapter's own forward
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


@pytest.mark.parametrize("guided", [False, True])
def test_nft_step_loss_is_nft_loss_on_the_conditional_or_the_guided_velocity(guided):
    """`--nft_guided`: v_θ and v_old are the CFG velocities v_u + w·(v_c − v_u) that drew the rollouts
    (the unconditional branch: zeroed text); without it, the conditional ones."""
    from align.loss import nft_loss
    from align.online import OLD, OnlineConfig, step_loss
    from base_model.flow import interpolate, sample_t

    model = moved_lora_toy()
    snapshot_adapter(model, OLD)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B.default" in n:
                p.add_(0.3)  # the policy has moved away from the old adapter
    B, w = 3, 2.0
    x0, _, c, p = _toy_inputs(B)
    buf = {"x0": x0, "prompt": torch.arange(B), "context": c, "pooled": p, "uncond": None,
           "r": torch.tensor([0.9, 0.2, 0.5])}
    cfg = OnlineConfig(method="nft", guidance=w, nft_guided=guided, logit_mean=1.0)
    loss, _ = step_loss(model, model, cfg, buf, torch.arange(B), torch.Generator().manual_seed(5), slice(0, B), False)

    g = torch.Generator().manual_seed(5)  # the same draws, in step_loss's order: t, then noise
    t = sample_t(B, "logit_normal", 1.0, 1.0, 1.29, 1.0, generator=g)
    x_t = interpolate(x0, torch.randn(x0.shape, generator=g), t)

    def velocity(with_cfg):
        v_c, v_u = model(x_t, t, c, p), model(x_t, t, 0 * c, 0 * p)
        return v_u + w * (v_c - v_u) if with_cfg else v_c

    def expected(with_cfg):
        with torch.no_grad():
            model.base_model.set_adapter(OLD)
            v_old = velocity(with_cfg)
            model.base_model.set_adapter("default")
            return nft_loss(velocity(with_cfg), v_old, x_t, x0, t, buf["r"])[0].item()

    assert loss.item() == pytest.approx(expected(guided), rel=1e-5)
    assert loss.item() != pytest.approx(expected(not guided), rel=1e-4)  # 30× the match tolerance apart here
    loss.backward()
    assert all(q.grad is not None for n, q in model.named_parameters() if "lora_A.default" in n)
