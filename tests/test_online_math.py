"""The online objectives and the SDE sampler as pure functions: hand-computed values and invariants."""

import math

import pytest
import torch

from align.loss import adaptive_weights, dpo_loss, group_advantages, grpo_loss, nft_loss, optimality_probability
from align.online import dpo_pairs, old_policy_decay
from base_model.sampling import euler_times, gaussian_logprob, sde_sigma, sde_solve, sde_step, solve


def test_group_advantages_by_hand_and_zero_spread_groups():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.5, 0.5, 0.5, 0.5], [0.0, 0.0, 0.0, 1.0]])
    a = group_advantages(r, eps=0.0)
    assert torch.allclose(a[0], torch.tensor([1.0, -1.0, -1.0, 1.0]))  # mean 0.5, population std 0.5
    assert torch.equal(a[1], torch.zeros(4))  # no spread: no signal
    std = math.sqrt(0.75 * 0.25)
    assert torch.allclose(a[2], torch.tensor([-0.25, -0.25, -0.25, 0.75]) / std)
    with pytest.raises(ValueError):
        group_advantages(torch.ones(3, 1))
    # the round's std instead: every reward here has population std sqrt(mean r² − mean² r)
    g = group_advantages(r, eps=0.0, global_std=True)
    rstd = r.std(unbiased=False)
    assert torch.allclose(g[0], torch.tensor([0.5, -0.5, -0.5, 0.5]) / rstd)
    assert torch.equal(g[1], torch.zeros(4))
    assert torch.allclose(g[2], torch.tensor([-0.25, -0.25, -0.25, 0.75]) / rstd)


def test_optimality_probability_clips_and_maps_linearly():
    a = torch.tensor([-3.0, -1.0, 0.0, 0.5, 2.0])
    assert torch.allclose(optimality_probability(a, 1.0), torch.tensor([0.0, 0.0, 0.5, 0.75, 1.0]))
    assert torch.allclose(optimality_probability(a, 2.0), torch.tensor([0.0, 0.25, 0.5, 0.625, 1.0]))


def test_nft_loss_by_hand():
    # one sample, one pixel: x0 = 1, ε = 3, t = 0.5 → x_t = 2; v_old = 1, v_θ = 2, β = 0.5, r = 0.75
    x0, x_t, t = torch.ones(1, 1, 1, 1), torch.full((1, 1, 1, 1), 2.0), torch.tensor([0.5])
    v_old, v = torch.ones(1, 1, 1, 1), torch.full((1, 1, 1, 1), 2.0, requires_grad=True)
    loss, m = nft_loss(v, v_old, x_t, x0, t, torch.tensor([0.75]), beta=0.5)
    # v⁺ = 0.5·1 + 0.5·2 = 1.5 → x̂0⁺ − x0 = 2 − 0.75 − 1 = 0.25, weighted 0.25²/0.25 = 0.25
    # v⁻ = 1.5·1 − 0.5·2 = 0.5 → x̂0⁻ − x0 = 2 − 0.25 − 1 = 0.75, weighted 0.75²/0.75 = 0.75
    assert loss.item() == pytest.approx((0.75 * 0.25 + 0.25 * 0.75) / 0.5)
    assert m["nft/positive_loss"].item() == pytest.approx(0.25)
    loss.backward()
    # d/dv: r·2·e⁺·(−t·β)/w⁺ + (1−r)·2·e⁻·(t·β)/w⁻, all over β
    expected = (0.75 * 2 * 0.25 * (-0.25) / 0.25 + 0.25 * 2 * 0.75 * 0.25 / 0.75) / 0.5
    assert v.grad.item() == pytest.approx(expected)
    # scale = c with r = 0.5 + A/(2c): the pull is c·(2r − 1) = A whatever c (the paper code's choice)
    a = torch.tensor([0.8])
    grads = []
    for c in (1.0, 5.0):
        v = torch.full((1, 1, 1, 1), 1.0, requires_grad=True)  # at v_old: only the signal term
        nft_loss(v, v_old, x_t, x0, t, optimality_probability(a, c), beta=0.5, scale=c)[0].backward()
        grads.append(v.grad.item())
    assert grads[0] == pytest.approx(grads[1]) and grads[0] != 0


def test_adaptive_weights_by_hand_and_dpo_on_them_is_nfts_pull_on_a_pair():
    # two samples of 2 pixels: |v_ref − v*| = (1, 3) and (0.5, 0.5) → means 2 and 0.5; t = 0.5, 0.25
    v_ref = torch.tensor([[1.0, 3.0], [0.5, -0.5]]).view(2, 1, 1, 2)
    w = adaptive_weights(v_ref, torch.zeros_like(v_ref), torch.tensor([0.5, 0.25]))
    assert torch.allclose(w, torch.tensor([0.25, 0.5]))
    # NFT (β = 1) on a winner (r = 1) and a loser (r = 0) at v_θ = v_old pulls v like DPO on adaptively weighted
    # errors with the old policy as reference: their gradients are parallel
    torch.manual_seed(0)
    x0, eps, t = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4), torch.tensor([0.6, 0.6])
    x_t = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * eps
    target, v_old = eps - x0, eps - x0 + 0.5 * torch.randn(2, 3, 4, 4)
    v = v_old.clone().requires_grad_(True)
    nft_loss(v, v_old, x_t, x0, t, torch.tensor([1.0, 0.0]))[0].backward()
    u = v_old.clone().requires_grad_(True)
    wt = adaptive_weights(v_old, target, t)
    err = (u - target).pow(2).mean((1, 2, 3)) * wt
    dpo_loss(err, err.detach(), beta=1.0)[0].backward()
    cos = torch.nn.functional.cosine_similarity(v.grad.flatten(), u.grad.flatten(), dim=0)
    assert cos.item() == pytest.approx(1.0, abs=1e-5)


def test_nft_positive_samples_pull_toward_their_data_and_negatives_push_away():
    torch.manual_seed(0)
    x0, eps = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    t = torch.tensor([0.3, 0.7])
    x_t = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * eps
    target = eps - x0
    v_old = target + 0.5 * torch.randn_like(target)
    for r, sign in ((1.0, 1), (0.0, -1)):
        v = v_old.clone().requires_grad_(True)
        nft_loss(v, v_old, x_t, x0, t, torch.full((2,), r), beta=1.0)[0].backward()
        moved = v.detach() - 0.01 * v.grad
        gain = (v_old - target).pow(2).sum() - (moved - target).pow(2).sum()
        assert sign * gain > 0  # r = 1: closer to ε − x0; r = 0: further
    # at v_θ = v_old and r = ½ the two halves cancel: no gradient
    v = v_old.clone().requires_grad_(True)
    nft_loss(v, v_old, x_t, x0, t, torch.full((2,), 0.5), beta=1.0)[0].backward()
    assert v.grad.abs().max() < 1e-6


def test_old_policy_decay_is_constant_or_ramps_to_its_cap():
    assert old_policy_decay(0, 0.5) == old_policy_decay(10_000, 0.5) == 0.5  # no rate: the constant decay
    assert old_policy_decay(16, 0.0) == 0.0  # the default: the old adapter is a copy of the policy
    # DiffusionNFT's schedule, 0.001 a step up to 0.5: 16 steps a round → 0.016 after the first round
    assert old_policy_decay(0, 0.5, 0.001) == 0.0
    assert old_policy_decay(16, 0.5, 0.001) == pytest.approx(0.016)
    assert old_policy_decay(320, 0.5, 0.001) == pytest.approx(0.32)
    assert old_policy_decay(500, 0.5, 0.001) == pytest.approx(0.5)
    assert old_policy_decay(576, 0.5, 0.001) == 0.5


def test_grpo_loss_by_hand_and_on_policy_ratio_is_one():
    logp = torch.tensor([-1.0, -2.0], requires_grad=True)
    adv = torch.tensor([1.0, -2.0])
    loss, m = grpo_loss(logp, logp.detach(), adv, clip_range=0.2)
    assert m["grpo/ratio"].item() == 1.0 and loss.item() == pytest.approx(0.5)  # mean(−A)
    loss.backward()
    assert torch.allclose(logp.grad, -adv / 2)  # the policy gradient −A·∇log π / n
    # off-policy: ratio e^{0.5} ≈ 1.65 > 1.2 with A > 0 → clipped at 1.2 (no gradient)
    lp = torch.tensor([0.5], requires_grad=True)
    loss, m = grpo_loss(lp, torch.tensor([0.0]), torch.tensor([1.0]), clip_range=0.2)
    assert loss.item() == pytest.approx(-1.2)
    loss.backward()
    assert lp.grad.item() == 0.0 and m["grpo/clip_fraction"].item() == 1.0
    loss, m = grpo_loss(lp.detach(), torch.tensor([0.0]), torch.tensor([1.0]), 0.2, kl=torch.tensor([2.0]), kl_beta=0.1)
    assert loss.item() == pytest.approx(-1.2 + 0.2) and m["grpo/kl"].item() == 2.0


def test_dpo_pairs_best_vs_worst_skip_groups_without_spread():
    r = torch.tensor([[0.2, 1.0, 0.5], [0.5, 0.5, 0.5], [0.0, 0.3, 1.0]])
    best, worst = dpo_pairs(r)
    assert best.tolist() == [1, 8] and worst.tolist() == [0, 6]
    r4 = torch.tensor([[0.1, 0.9, 0.5, 0.7], [0.5, 0.5, 0.5, 1.0]])
    best, worst = dpo_pairs(r4, per_group=2)  # 2nd best vs 2nd worst too, where they differ
    assert best.tolist() == [1, 7, 3] and worst.tolist() == [0, 6, 2]


def test_sde_step_by_hand_and_sigma_zero_is_euler():
    x, v = torch.tensor([[1.0]]), torch.tensor([[2.0]])
    nxt, mean, std = sde_step(x, v, 0.5, 0.25, 1.0, torch.tensor([[1.0]]))
    # dt = −0.25; mean = 1 − 0.25·(2 + 1/(2·0.5)·(1 + 0.5·2)) = 1 − 0.25·4 = 0; std = sqrt(0.25) = 0.5
    assert mean.item() == pytest.approx(0.0) and std == pytest.approx(0.5) and nxt.item() == pytest.approx(0.5)
    euler, _, s0 = sde_step(x, v, 0.5, 0.25, 0.0, torch.tensor([[1.0]]))
    assert euler.item() == pytest.approx(1 - 0.25 * 2) and s0 == 0.0
    assert gaussian_logprob(torch.zeros(1, 2), torch.zeros(1, 2), 1.0).item() == pytest.approx(-0.5 * math.log(2 * math.pi))
    assert sde_sigma(torch.tensor(1.0), 0.7, 0.5).item() == pytest.approx(0.7)  # capped at t = 0.5


def gaussian_velocity(mu: float, s: float):
    """The exact velocity E[ε − x0 | x_t] when x0 ~ N(mu, s²) (per coordinate)."""
    def v(x, t):
        t = t.view(-1, *[1] * (x.dim() - 1))
        var = (1 - t) ** 2 * s ** 2 + t ** 2
        centred = x - (1 - t) * mu
        return t / var * centred - (mu + (1 - t) * s ** 2 / var * centred)
    return v


def test_sde_sampler_has_the_ode_marginals_on_a_known_velocity_field():
    mu, s = 1.5, 0.5
    v = gaussian_velocity(mu, s)
    torch.manual_seed(0)
    x1 = torch.randn(20000, 1, 1, 1)
    times = euler_times(200)
    ode = solve(v, x1, times, "euler")
    g = torch.Generator().manual_seed(1)
    sde, transitions = sde_solve(v, x1, times, 0.7, lambda j: torch.randn(x1.shape, generator=g))
    for x in (ode, sde):
        assert x.mean().item() == pytest.approx(mu, abs=0.02)
        assert x.std().item() == pytest.approx(s, abs=0.02)
    assert len(transitions) == 199 and not torch.equal(ode, sde)  # every step but the last is stochastic
    # a window: only those steps are stochastic
    _, few = sde_solve(v, x1[:10], times, 0.7, lambda j: torch.randn(10, 1, 1, 1), window=range(3, 5))
    assert [j for j, *_ in few] == [3, 4]


def test_the_prompt_pool_keeps_the_data_task_mix_or_each_caption_once_or_each_task_equally(tmp_path):
    import collections

    from align.online import prompt_pool, round_prompts
    from base_model.errors import InputError
    from base_model.shapes import TASKS, make_split
    from reward.compositional import scene_from_caption

    scenes, none = prompt_pool("train", "scenes")
    assert none is None and scenes == [s.caption for s in make_split("train", 5000)]  # repeats kept
    distinct, _ = prompt_pool("train")
    assert sorted(distinct) == sorted(set(scenes)) and len(distinct) < len(scenes) / 10

    def share(pool, task):
        return collections.Counter(scene_from_caption(p).task for p in pool)[task] / len(pool)

    # single objects have few distinct captions: the distinct pool nearly drops them, the scenes pool does not
    assert share(scenes, "single_object") > 0.1 > 0.05 > share(distinct, "single_object")
    # "tasks": the same prompts, drawn so that every task gets 1/6 of the draws (the scenes pool: 11% to 23%)
    same, weights = prompt_pool("train", "tasks")
    assert same == scenes and weights.shape == (len(scenes),)
    tasks = [s.task for s in make_split("train", 5000)]
    per_task = {task: float(sum(w for w, t in zip(weights.tolist(), tasks) if t == task)) for task in TASKS}
    assert all(abs(v - 1.0) < 1e-9 for v in per_task.values()), per_task
    drawn = collections.Counter(tasks[i] for r in range(40) for i in round_prompts(len(same), 300, 0, r, weights).tolist())
    assert all(abs(drawn[task] / 12000 - 1 / 6) < 0.015 for task in TASKS), drawn
    assert drawn["position"] / 12000 < share(scenes, "position") - 0.04  # the scenes pool's 22% is cut
    assert round_prompts(len(same), 32, 0, 3, weights).tolist() == round_prompts(len(same), 32, 0, 3, weights).tolist()
    lines = tmp_path / "p.txt"
    lines.write_text("a red square\na blue circle\na red square\n")
    assert prompt_pool(str(lines), "scenes") == (["a red square", "a blue circle", "a red square"], None)
    assert prompt_pool(str(lines)) == (["a red square", "a blue circle"], None)
    with pytest.raises(InputError, match="p.txt.*scenes or distinct"):
        prompt_pool(str(lines), "tasks")  # a file's lines name no task
