"""The paper's formulations in its unified notation (arXiv 2403.03206, section 2 and appendix B):

    z_t = a_t·x0 + b_t·ε,   t in [0, 1], t = 1 (nearly) pure noise,   λ_t = log(a_t² / b_t²).

    rf          a = 1 − t,                  b = t,                  the network predicts v = ε − x0
    eps_linear  a = sqrt(ᾱ_t),              b = sqrt(1 − ᾱ_t),      the network predicts ε
                ᾱ of LDM's "scaled linear" β schedule (β from 0.00085 to 0.012 on a sqrt scale,
                T = 1000), continued in t by interpolating log ᾱ between t = k/T, with ᾱ(0) = 1
    v_cos       a = cos(πt/2),              b = sin(πt/2),          the network predicts v = a·ε − b·x0

The same network serves every formulation; only the meaning of its output changes. Each loss is
its own regression (native), which is a weighted ε-loss: ‖pred − target‖² = w_t·‖ε̂ − ε‖² with
w_t = `eps_weight` (rf: (1 + e^(−λ/2))² = 1/(1 − t)², eps: 1, v_cos: 1 + e^(−λ) = 1/a_t²).

Sampling reuses the rectified-flow solvers: any formulation is an rf velocity field after the change
of variables x = z / (a + b), s = b / (a + b), because x is then exactly the rf path at time s,
x = (1 − s)·x0 + s·ε. With the prediction turned into (x̂0, ε̂), the velocity is ε̂ − x̂0, and one
Euler step in (x, s) is one DDIM step z ← a'·x̂0 + b'·ε̂ (Song et al. 2021). CFG on this velocity is
CFG on the network's output, since the conversion is affine in it.
"""

from __future__ import annotations

import math

import torch

from .flow import flow_loss, per_sample_mse

FORMULATIONS = ("rf", "eps_linear", "v_cos")
T_TRAIN = 1000  # LDM's discrete timesteps; the network's time embedding reads 1000·t in every formulation


def _log_alpha_bar_table() -> torch.Tensor:
    beta = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, T_TRAIN, dtype=torch.float64) ** 2
    return torch.cat([torch.zeros(1, dtype=torch.float64), torch.log1p(-beta).cumsum(0)])  # at t = k/T, k = 0..T


_LOG_ALPHA_BAR = _log_alpha_bar_table()


def coefficients(form: str, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(a_t, b_t) of z_t = a_t·x0 + b_t·ε, in float64, the shape of t."""
    t = t.double()
    if form == "rf":
        return 1 - t, t
    if form == "v_cos":
        return torch.cos(math.pi / 2 * t), torch.sin(math.pi / 2 * t)
    if form == "eps_linear":
        pos = (t.clamp(0, 1) * T_TRAIN).cpu()
        lo = pos.floor().clamp(max=T_TRAIN - 1)
        table = _LOG_ALPHA_BAR
        log_ab = (table[lo.long()] + (pos - lo) * (table[lo.long() + 1] - table[lo.long()])).to(t.device)
        return torch.exp(log_ab / 2), torch.sqrt(-torch.expm1(log_ab))
    raise ValueError(f"unknown formulation {form!r}; choose from {FORMULATIONS}")


def _view(c: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return c.view(-1, *([1] * (like.dim() - 1))).to(like.dtype)


# ---------------------------------------------------------------------------------------------
# Training: the path, the target, the loss
# ---------------------------------------------------------------------------------------------


def noised(form: str, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    a, b = coefficients(form, t)
    return _view(a, x0) * x0 + _view(b, x0) * noise


def target(form: str, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """What the network regresses: v = ε − x0 (rf), ε (eps_linear) or v = a·ε − b·x0 (v_cos)."""
    if form == "rf":
        return noise - x0
    if form == "eps_linear":
        return noise
    a, b = coefficients(form, t)
    return _view(a, x0) * noise - _view(b, x0) * x0


def formulation_loss(form: str, model, x0, noise, t, *cond) -> torch.Tensor:
    """Per-sample loss (B,) of `model(z_t, t, *cond)` against the formulation's target
    (rf: exactly `flow.flow_loss`)."""
    if form == "rf":
        return flow_loss(model, x0, noise, t, *cond)
    return per_sample_mse(model(noised(form, x0, noise, t), t, *cond), target(form, x0, noise, t))


def eps_weight(form: str, t: torch.Tensor) -> torch.Tensor:
    """w_t with native loss = w_t·‖ε̂ − ε‖² (the paper's weighted ε-loss view of each objective)."""
    a, b = coefficients(form, t)
    if form == "rf":
        return 1 / a ** 2  # ε̂ − ε = (1 − t)·(v̂ − v)
    if form == "eps_linear":
        return torch.ones_like(a)
    return 1 / a ** 2  # v_cos: v̂ − v = (ε̂ − ε)/a when a² + b² = 1


# ---------------------------------------------------------------------------------------------
# Sampling: the prediction as (x̂0, ε̂), and as an rf velocity
# ---------------------------------------------------------------------------------------------


def predict_x0_eps(form: str, out: torch.Tensor, z: torch.Tensor, t: torch.Tensor):
    """The network's output `out` at (z, t) → (x̂0, ε̂), which satisfy z = a·x̂0 + b·ε̂."""
    a, b = (_view(c, z) for c in coefficients(form, t))
    if form == "rf":
        return z - b * out, z + a * out
    if form == "eps_linear":
        return (z - b * out) / a, out
    return a * z - b * out, b * z + a * out  # v_cos


def rf_time(form: str, t: torch.Tensor) -> torch.Tensor:
    """s = b / (a + b): the rf time with the same signal-to-noise ratio as t."""
    a, b = coefficients(form, t)
    return b / (a + b)


def native_time(form: str, s: torch.Tensor) -> torch.Tensor:
    """The inverse of `rf_time` (s increases with t in every formulation): bisection, clamped to [0, 1]."""
    if form == "rf":
        return s
    s = s.double()
    lo, hi = torch.zeros_like(s), torch.ones_like(s)
    for _ in range(60):
        mid = (lo + hi) / 2
        below = rf_time(form, mid) < s
        lo, hi = torch.where(below, mid, lo), torch.where(below, hi, mid)
    return (lo + hi) / 2


def as_velocity(model, form: str):
    """An rf velocity callable `v(x, s, *cond)` of a network trained in `form` (see the module doc);
    rf returns the network itself."""
    if form == "rf":
        return model

    def velocity(x, s, *cond):
        times, where = s.unique(return_inverse=True)  # a sampler passes one time for the whole batch
        t = native_time(form, times)[where]
        a, b = coefficients(form, t)
        z = _view(a + b, x) * x
        x0, eps = predict_x0_eps(form, model(z, t.to(x.dtype), *cond), z, t)
        return eps - x0

    return velocity


def ddim_times(form: str, steps: int) -> torch.Tensor:
    """steps + 1 rf times from the start of sampling down to 0: DDIM's grid, t evenly spaced from 1
    to 1/T, then 0 (eps_linear starts at s ≈ 0.94: its ᾱ_1 is not 0)."""
    t = torch.linspace(1.0, 1.0 / T_TRAIN, steps, dtype=torch.float64)
    return torch.cat([rf_time(form, t), torch.zeros(1, dtype=torch.float64)]).float()


def start_state(form: str, noise: torch.Tensor, s0: torch.Tensor) -> torch.Tensor:
    """DDIM starts from z = ε at t = 1; in rf coordinates that is x = ε / (a + b) at s0."""
    if form == "rf":
        return noise
    a, b = coefficients(form, native_time(form, s0.reshape(1)))
    return noise / (a + b).to(noise.dtype).item()
