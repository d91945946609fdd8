"""Rectified flow as SD3 trains it (arXiv 2403.03206, sections 2–3). Pure functions of tensors.

One time convention everywhere in flowalign: t = 0 is data, t = 1 is noise,
    x_t = (1 − t)·x0 + t·ε,        target velocity v = ε − x0 = dx_t/dt.
(Meta's flow_matching uses the opposite direction; diffusers' `sigma` is our t.)
"""

from __future__ import annotations

import math

import torch

DENSITIES = ("uniform", "logit_normal", "mode", "cosmap")


def interpolate(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    t = t.view(-1, *([1] * (x0.dim() - 1)))
    return (1 - t) * x0 + t * noise


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    return noise - x0


def per_sample_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """‖pred − target‖² averaged over every dimension but the batch → (B,)."""
    return (pred.float() - target.float()).pow(2).flatten(1).mean(1)


def flow_loss(velocity, x0, noise, t, *cond) -> torch.Tensor:
    """Per-sample rectified-flow loss (B,) of a velocity callable `velocity(x_t, t, *cond)`."""
    return per_sample_mse(velocity(interpolate(x0, noise, t), t, *cond), velocity_target(x0, noise))


# ---------------------------------------------------------------------------------------------
# Timestep densities (section 3.1) and the resolution shift (section 5.3.2)
# ---------------------------------------------------------------------------------------------


def shift_t(t: torch.Tensor, alpha: float) -> torch.Tensor:
    """t_m = α·t_n / (1 + (α − 1)·t_n): moves t toward noise for α > 1 (α = sqrt(m/n) pixels)."""
    return alpha * t / (1 + (alpha - 1) * t)


def _mode_map(u: torch.Tensor, s: float) -> torch.Tensor:
    return 1 - u - s * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)


def sample_t(n: int, density: str = "logit_normal", m: float = 0.0, s: float = 1.0,
             mode_scale: float = 1.29, shift: float = 1.0, generator=None, device="cpu") -> torch.Tensor:
    """Draw n training times in (0, 1) from one of the paper's densities, then shift.
    logit_normal(m, s): t = sigmoid(N(m, s)); the paper's winner is rf/lognorm(0.00, 1.00)."""
    if density == "logit_normal":
        t = torch.sigmoid(m + s * torch.randn(n, generator=generator, device=device))
    else:
        u = torch.rand(n, generator=generator, device=device)
        if density == "uniform":
            t = u
        elif density == "mode":
            t = _mode_map(u, mode_scale)
        elif density == "cosmap":
            t = 1 - 1 / (torch.tan(math.pi * u / 2) + 1)
        else:
            raise ValueError(f"unknown timestep density {density!r}; choose from {DENSITIES}")
    return shift_t(t, shift) if shift != 1.0 else t


def density(t: torch.Tensor, kind: str, m: float = 0.0, s: float = 1.0, mode_scale: float = 1.29):
    """The probability density π(t) of `sample_t` (unshifted), as the paper writes it."""
    t = t.double()
    if kind == "uniform":
        return torch.ones_like(t)
    if kind == "logit_normal":
        logit = torch.log(t / (1 - t))
        return torch.exp(-(logit - m) ** 2 / (2 * s * s)) / (s * math.sqrt(2 * math.pi) * t * (1 - t))
    if kind == "cosmap":
        return 2 / (math.pi - 2 * math.pi * t + 2 * math.pi * t * t)
    if kind == "mode":  # π(t) = |d f⁻¹(t) / dt| = 1 / |f'(u)| at u = f⁻¹(t); f is decreasing
        lo, hi = torch.zeros_like(t), torch.ones_like(t)
        for _ in range(50):  # bisection for f⁻¹
            mid = (lo + hi) / 2
            right = _mode_map(mid, mode_scale) > t
            lo, hi = torch.where(right, mid, lo), torch.where(right, hi, mid)
        u = (lo + hi) / 2
        df = -1 - mode_scale * (-math.pi / 2 * torch.sin(math.pi * u) + 1)
        return 1 / df.abs()
    raise ValueError(f"unknown timestep density {kind!r}; choose from {DENSITIES}")


# ---------------------------------------------------------------------------------------------
# Validation loss as the paper measures it (section 5.3.2, "validation loss")
# ---------------------------------------------------------------------------------------------


@torch.inference_mode()
def validation_loss(velocity, x0: torch.Tensor, cond: tuple, levels: int = 8, seed: int = 0,
                    batch_size: int = 256) -> dict:
    """Mean loss at `levels` equally spaced t in [0, 1) (t = 1 excluded), on a fixed validation
    set with fixed noise, so numbers are comparable across runs and steps.
    Returns {"loss": mean over levels, "loss_t": [loss at each level]}."""
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(x0.shape, generator=gen).to(x0.device, x0.dtype)
    per_level = []
    for t_value in torch.arange(levels) / levels:
        total = 0.0
        for i in range(0, len(x0), batch_size):
            sl = slice(i, i + batch_size)
            t = torch.full((len(x0[sl]),), float(t_value), device=x0.device)
            total += flow_loss(velocity, x0[sl], noise[sl], t, *(c[sl] for c in cond)).sum().item()
        per_level.append(total / len(x0))
    return {"loss": sum(per_level) / levels, "loss_t": per_level}
