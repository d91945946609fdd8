"""eps/linear and v/cos beside rf: schedules, losses as weighted ε-losses, the exact optimum and
the sampler on a Gaussian toy (data N(μ, σ²), where E[x0 | z_t] and E[ε | z_t] are closed forms)."""

import types

import pytest
import torch

from base_model.flow import flow_loss
from base_model.formulations import (FORMULATIONS, T_TRAIN, as_velocity, coefficients, ddim_times, eps_weight,
                                     formulation_loss, native_time, noised, predict_x0_eps, rf_time, start_state,
                                     target)
from base_model.sampling import sample, solve, with_cfg

MU, SIGMA = 2.0, 0.5


def posterior_means(form, z, t):
    """E[x0 | z_t], E[ε | z_t] for x0 ~ N(μ, σ²), z_t = a·x0 + b·ε: Gaussian conditioning."""
    a, b = (c.view(-1, 1) for c in coefficients(form, t))
    var = a ** 2 * SIGMA ** 2 + b ** 2
    r = z.double() - a * MU
    return MU + a * SIGMA ** 2 * r / var, b * r / var


def exact_model(form):
    """The optimal network of `form` on the Gaussian toy, with a config naming its formulation."""
    class Exact(torch.nn.Module):
        config = types.SimpleNamespace(formulation=form)

        def __init__(self):
            super().__init__()
            self.dummy = torch.nn.Parameter(torch.zeros(1))  # `sample` reads the device from a parameter

        def forward(self, z, t, context=None, pooled=None):
            x0, eps = posterior_means(form, z, t)
            return target(form, x0, eps, t.double()).to(z.dtype)

    return Exact()


def test_eps_linear_is_ldm_scaled_linear_schedule():
    from diffusers import DDPMScheduler

    ref = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                        beta_schedule="scaled_linear").alphas_cumprod.double()
    a, b = coefficients("eps_linear", torch.arange(1, T_TRAIN + 1) / T_TRAIN)
    assert torch.allclose(a ** 2, ref, rtol=1e-5) and torch.allclose(a ** 2 + b ** 2, torch.ones(1000).double())
    a0, b0 = coefficients("eps_linear", torch.zeros(1))
    assert a0.item() == 1 and b0.item() == 0
    a, b = coefficients("v_cos", torch.rand(100))
    assert torch.allclose(a ** 2 + b ** 2, torch.ones(100).double())


@pytest.mark.parametrize("form", FORMULATIONS)
def test_native_loss_is_a_weighted_eps_loss_and_time_maps_invert(form):
    x0, noise, t = torch.randn(64, 3).double(), torch.randn(64, 3).double(), torch.rand(64).double() * 0.98 + 0.01
    z, pred = noised(form, x0, noise, t), torch.randn(64, 3).double()
    _, eps_hat = predict_x0_eps(form, pred, z, t)
    native = (pred - target(form, x0, noise, t)).pow(2).sum(1)
    assert torch.allclose(native, eps_weight(form, t) * (eps_hat - noise).pow(2).sum(1))
    assert torch.allclose(native_time(form, rf_time(form, t)), t, atol=1e-9)
    x0_hat, eps_hat = predict_x0_eps(form, target(form, x0, noise, t), z, t)  # the true target → the truth
    assert torch.allclose(x0_hat, x0) and torch.allclose(eps_hat, noise)


def test_rf_loss_is_the_flow_loss():
    model = lambda x, t, c: x * c  # noqa: E731
    x0, noise, t, c = torch.randn(4, 2), torch.randn(4, 2), torch.rand(4), torch.randn(4, 2)
    assert torch.equal(formulation_loss("rf", model, x0, noise, t, c), flow_loss(model, x0, noise, t, c))


@pytest.mark.parametrize("form", FORMULATIONS)
def test_closed_form_optimum_solves_the_regression(form):
    """The least-squares fit of the target on z_t (the optimum is affine in z for Gaussian data)
    finds the closed form, and the optimum's loss is below any perturbation's."""
    gen = torch.Generator().manual_seed(0)
    n = 400_000
    for t_value in (0.1, 0.5, 0.9):
        t = torch.full((n,), t_value, dtype=torch.float64)
        x0 = MU + SIGMA * torch.randn(n, 1, generator=gen, dtype=torch.float64)
        noise = torch.randn(n, 1, generator=gen, dtype=torch.float64)
        z, y = noised(form, x0, noise, t), target(form, x0, noise, t)
        design = torch.cat([z, torch.ones_like(z)], 1)
        fit = torch.linalg.lstsq(design, y).solution
        opt = exact_model(form)(z, t)
        slope = (opt[1] - opt[0]) / (z[1] - z[0])
        assert fit[0].item() == pytest.approx(slope.item(), abs=5e-3)
        assert fit[1].item() == pytest.approx((opt[0] - slope * z[0]).item(), abs=1e-2)
        base = formulation_loss(form, lambda x, s: exact_model(form)(x, s), x0, noise, t).mean()
        for delta in (-0.05, 0.05):
            worse = formulation_loss(form, lambda x, s: exact_model(form)(x, s) + delta, x0, noise, t).mean()
            assert worse > base


@pytest.mark.parametrize("form", FORMULATIONS)
def test_sampler_maps_noise_to_the_data_distribution(form):
    """With the exact network, 50 midpoint steps carry each seed's noise ε to the flow's image of it:
    μ + σ·(ε − a₁μ)/sqrt(a₁²σ² + b₁²), the standardised start (a₁ = 0 for rf and v_cos)."""
    seeds = list(range(2000))
    out = sample(exact_model(form), torch.zeros(2000, 1), torch.zeros(2000, 1), seeds, (1,), steps=50,
                 batch_size=2000, progress=False, solver="midpoint")
    eps = torch.stack([torch.randn((1,), generator=torch.Generator().manual_seed(s)) for s in seeds])
    a1, b1 = (c.item() for c in coefficients(form, torch.ones(1)))
    expected = MU + SIGMA * (eps - a1 * MU) / (a1 ** 2 * SIGMA ** 2 + b1 ** 2) ** 0.5
    assert torch.allclose(out, expected.float(), atol=1e-2)
    # eps_linear's start z = ε is off its t = 1 marginal (ᾱ₁ > 0): its samples are biased by −σ·a₁μ ≈ −0.07
    bias = -SIGMA * a1 * MU / (a1 ** 2 * SIGMA ** 2 + b1 ** 2) ** 0.5
    assert out.mean().item() == pytest.approx(MU + bias, abs=0.03) and out.std().item() == pytest.approx(SIGMA, abs=0.03)


@pytest.mark.parametrize("form", ["eps_linear", "v_cos"])
def test_euler_on_the_converted_velocity_is_ddim(form):
    """A literal DDIM loop (z ← a'·x̂0 + b'·ε̂ from z = ε at t = 1) equals the shared Euler solver on
    `as_velocity` over `ddim_times`, step for step; CFG on the velocity is CFG on the output."""
    model, steps = exact_model(form), 7
    noise = torch.randn(50, 1)
    grid = torch.cat([torch.linspace(1.0, 1 / T_TRAIN, steps, dtype=torch.float64), torch.zeros(1).double()])
    z = noise.double()
    for t, t_next in zip(grid[:-1], grid[1:]):
        tt = t.expand(50)
        x0, eps = predict_x0_eps(form, model(z, tt), z, tt)
        a, b = coefficients(form, t_next)
        z = a * x0 + b * eps
    times = ddim_times(form, steps)
    out = solve(as_velocity(model, form), start_state(form, noise, times[0]), times)
    assert torch.allclose(out, z.float(), atol=1e-4)

    cond, uncond = (torch.full((50, 1), 0.3),), (torch.full((50, 1), -0.2),)
    net = lambda x, t, c: model(x, t) + c  # noqa: E731
    s = torch.full((50,), 0.6)
    guided_out = lambda x, t, c, u: net(x, t, u) + 3.0 * (net(x, t, c) - net(x, t, u))  # noqa: E731
    lhs = with_cfg(as_velocity(net, form), 3.0, cond, uncond)(noise, s)
    rhs = as_velocity(lambda x, t, c: guided_out(x, t, c, uncond[0]), form)(noise, s, cond[0])
    assert torch.allclose(lhs, rhs, atol=1e-5)
