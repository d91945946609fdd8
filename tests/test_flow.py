import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from base_model.flow import (density, flow_loss, interpolate, per_sample_mse, sample_t, shift_t,
                             validation_loss, velocity_target)
from base_model.sampling import euler_times


def test_time_convention_t0_data_t1_noise():
    x0, eps = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)
    assert torch.equal(interpolate(x0, eps, torch.zeros(4)), x0)
    assert torch.equal(interpolate(x0, eps, torch.ones(4)), eps)
    t, h = torch.full((4,), 0.3), 1e-3  # the target is dx_t/dt
    fd = (interpolate(x0, eps, t + h) - interpolate(x0, eps, t - h)) / (2 * h)
    assert torch.allclose(fd, velocity_target(x0, eps), atol=1e-3)


def test_per_sample_loss_shape_and_value():
    x0, eps = torch.randn(5, 3, 4, 4), torch.randn(5, 3, 4, 4)
    perfect = lambda x_t, t: eps - x0  # noqa: E731
    zero = lambda x_t, t: torch.zeros_like(x_t)  # noqa: E731
    t = torch.rand(5)
    assert flow_loss(perfect, x0, eps, t).shape == (5,)
    assert torch.all(flow_loss(perfect, x0, eps, t) == 0)
    assert torch.allclose(flow_loss(zero, x0, eps, t), per_sample_mse(eps - x0, torch.zeros_like(x0)))


@pytest.mark.parametrize("kind, kw", [("uniform", {}), ("logit_normal", dict(m=0.0, s=1.0)),
                                      ("logit_normal", dict(m=0.5, s=0.6)), ("mode", dict(mode_scale=1.29)),
                                      ("mode", dict(mode_scale=-0.5)), ("cosmap", {})])
def test_timestep_histogram_matches_density(kind, kw):
    n, bins = 400_000, 40
    t = sample_t(n, kind, generator=torch.Generator().manual_seed(1), **kw)
    assert t.min() >= 0 and t.max() <= 1
    counts = torch.histc(t, bins=bins, min=0, max=1).double() / n
    edges = torch.linspace(0, 1, bins + 1, dtype=torch.float64)
    grid = edges[:-1, None] + (edges[1:] - edges[:-1])[:, None] * (torch.arange(32) + 0.5) / 32
    p = density(grid.clamp(1e-9, 1 - 1e-9), kind, **kw)
    p_bin = p.mean(1) / bins  # midpoint rule inside each bin
    assert p_bin.sum().item() == pytest.approx(1.0, abs=2e-3)
    tol = 5 * torch.sqrt(p_bin / n) + 2e-4  # ~5 standard errors
    assert torch.all((counts - p_bin).abs() < tol), (counts - p_bin).abs().max()


def test_unknown_density_is_named():
    with pytest.raises(ValueError, match="unknown timestep density 'lognorm'"):
        sample_t(4, "lognorm")


def test_shift_formula_and_sampled_shift():
    t = torch.linspace(0, 1, 11)
    assert torch.allclose(shift_t(t, 3.0), 3 * t / (1 + 2 * t))
    assert torch.equal(shift_t(t, 1.0), t)
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    assert torch.allclose(sample_t(100, shift=3.0, generator=g()), shift_t(sample_t(100, generator=g()), 3.0))
    assert (shift_t(t, 3.0) >= t).all()  # α > 1 moves t toward noise


@pytest.mark.parametrize("steps", [1, 2, 10, 28, 50])
@pytest.mark.parametrize("shift", [1.0, 3.0, 6.0])
def test_shifted_sigmas_match_diffusers_scheduler(steps, shift):
    sched = FlowMatchEulerDiscreteScheduler(shift=shift)
    sched.set_timesteps(steps)
    assert torch.allclose(euler_times(steps, shift), sched.sigmas, atol=1e-6)


def test_validation_loss_levels_fixed_noise():
    x0 = torch.randn(10, 3, 4, 4)
    zero = lambda x_t, t, c: torch.zeros_like(x_t) * c.sum()  # noqa: E731
    cond = (torch.ones(10, 2),)
    a = validation_loss(zero, x0, cond, seed=7, batch_size=3)
    b = validation_loss(zero, x0, cond, seed=7, batch_size=10)
    assert len(a["loss_t"]) == 8 and a["loss"] == pytest.approx(b["loss"])
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(7))
    assert a["loss"] == pytest.approx(per_sample_mse(eps - x0, torch.zeros_like(x0)).mean().item(), rel=1e-5)
    # the levels are 0, 1/8, …, 7/8: a model exact only at t = 1 would not be rewarded
    seen = []
    validation_loss(lambda x_t, t, c: (seen.append(t[0].item()), x_t)[1], x0, cond)
    assert sorted(set(seen)) == pytest.approx([i / 8 for i in range(8)])
    assert math.isfinite(a["loss"])
