import torch
from conftest import randomize

from base_model.mmdit import MMDiT, MMDiTConfig
from base_model.flow import flow_loss, sample_t
from base_model.sampling import euler_times, solve, noise_from_seeds, sample, with_cfg

TINY = dict(depth=2, hidden=32, heads=2, patch_size=4, in_channels=3, sample_size=16,
            pos_embed_max_size=4, context_dim=12, pooled_dim=10)


def test_euler_exact_on_a_point_mass():
    """Data = one point x*: v(x, t) = (x − x*)/t is exact and linear in t, so Euler lands on x*."""
    target = torch.randn(2, 3, 4, 4)
    v = lambda x, t: (x - target) / t.view(-1, 1, 1, 1)  # noqa: E731
    out = solve(v, torch.randn(2, 3, 4, 4), euler_times(5, shift=3.0))
    assert torch.allclose(out, target, atol=1e-5)


MU, SIGMA = 2.0, 0.5


def gaussian_velocity(x, t):
    """Data N(μ, σ²): x_t = (1−t)μ + s_t·ε with s_t² = (1−t)²σ² + t², so the flow maps ε to μ + σ·ε."""
    t = t.view(-1, 1).double()
    s2 = (1 - t) ** 2 * SIGMA**2 + t**2
    return (t - (1 - t) * SIGMA**2) / s2 * (x.double() - (1 - t) * MU) - MU


def test_euler_transports_a_gaussian():
    eps = torch.randn(1000, 1)
    out = solve(gaussian_velocity, eps, euler_times(200))
    assert torch.allclose(out.float(), MU + SIGMA * eps, atol=2e-2)


def test_midpoint_is_second_order_and_euler_first():
    """Halving the step divides the error by ~4 for midpoint, ~2 for Euler (its last step into
    t = 0 is an Euler step, whose local error is also O(dt²))."""
    eps = torch.randn(100, 1).double()
    err = {(solver, n): (solve(gaussian_velocity, eps, torch.linspace(1, 0, n + 1).double(), solver)
                         - (MU + SIGMA * eps)).abs().max().item()
           for solver in ("euler", "midpoint") for n in (8, 16)}
    assert 1.7 < err["euler", 8] / err["euler", 16] < 2.3
    assert err["midpoint", 8] / err["midpoint", 16] > 3.3
    assert err["midpoint", 8] < err["euler", 16] / 2  # 15 calls of midpoint beat 16 of Euler
    try:
        solve(gaussian_velocity, eps, torch.linspace(1, 0, 3), "heun")
    except ValueError as e:
        assert "heun" in str(e)
    else:
        raise AssertionError("an unknown solver must raise")


def test_cfg_wrapper_is_the_linear_combination():
    vel = lambda x, t, c: x * c  # noqa: E731
    x, t = torch.randn(3, 4), torch.rand(3)
    cond, uncond = (torch.full((3, 4), 2.0),), (torch.full((3, 4), -1.0),)
    for w in (0.0, 1.0, 4.5):
        assert torch.allclose(with_cfg(vel, w, cond, uncond)(x, t), -x + w * (2 * x + x))


def test_same_seed_same_sample_whatever_the_batch():
    model = randomize(MMDiT(MMDiTConfig(**TINY)), std=0.1).eval()
    ctx, pooled = torch.randn(5, 6, 12), torch.randn(5, 10)
    seeds = [11, 12, 13, 14, 15]
    a = sample(model, ctx, pooled, seeds, (3, 16, 16), steps=4, guidance=3.0, batch_size=5, progress=False)
    b = sample(model, ctx, pooled, seeds, (3, 16, 16), steps=4, guidance=3.0, batch_size=2, progress=False)
    c = sample(model, ctx[3:4], pooled[3:4], seeds[3:4], (3, 16, 16), steps=4, guidance=3.0, progress=False)
    assert a.shape == (5, 3, 16, 16)
    assert torch.allclose(a, b, atol=1e-5) and torch.allclose(a[3:4], c, atol=1e-5)
    assert not torch.allclose(a[0], a[1])  # different seeds differ
    assert torch.equal(noise_from_seeds([4], (2, 2)), noise_from_seeds([9, 4], (2, 2))[1:])


def test_tiny_model_overfits_one_pair():
    torch.manual_seed(0)
    model = MMDiT(MMDiTConfig(**{**TINY, "hidden": 64}))
    x0 = torch.rand(1, 3, 16, 16) * 2 - 1
    ctx, pooled = torch.randn(1, 6, 12), torch.randn(1, 10)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0)
    gen = torch.Generator().manual_seed(0)
    losses = []
    for step in range(300):
        B = 16
        t = sample_t(B, "logit_normal", generator=gen)
        noise = torch.randn(B, 3, 16, 16, generator=gen)
        loss = flow_loss(model, x0.expand(B, -1, -1, -1), noise, t, ctx.expand(B, -1, -1), pooled.expand(B, -1)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    first, last = sum(losses[:10]) / 10, sum(losses[-20:]) / 20
    assert last < 0.1 * first, (first, last)
    out = sample(model.eval(), ctx, pooled, [1, 2], (3, 16, 16), steps=20, progress=False)
    assert (out - x0).pow(2).mean() < 0.05 * x0.pow(2).mean()  # sampling reproduces the pair's image
