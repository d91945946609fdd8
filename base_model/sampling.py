"""Sampling: an ODE solver loop over any velocity callable, from t = 1 (noise) to t = 0 (data).

Two solvers, as in `flow_matching`'s ODESolver: "euler" (diffusers' FlowMatchEulerDiscreteScheduler,
one velocity call a step) and "midpoint" (second order, two calls a step). On the toy preset
5 midpoint steps (9 calls) score as well as 20 Euler steps (benchmarks/README.md, "Sampler")."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from .flow import shift_t
from .formulations import as_velocity, ddim_times, start_state


def euler_times(steps: int, shift: float = 1.0, t_min: float = 1e-3) -> torch.Tensor:
    """steps + 1 times from 1 down to 0, the schedule of diffusers' FlowMatchEulerDiscreteScheduler
    (and SD3's reference code): shift(linspace(1, shift(t_min), steps)), then a final 0.
    `t_min` is the smallest training time, 1/num_train_timesteps; like diffusers we shift it twice."""
    t = shift_t(torch.linspace(1.0, float(shift_t(torch.tensor(t_min, dtype=torch.float64), shift)), steps,
                               dtype=torch.float64), shift)
    return torch.cat([t, t.new_zeros(1)]).float()


def sampling_times(formulation: str, steps: int, shift: float = 1.0) -> torch.Tensor:
    """rf: `euler_times`; eps_linear and v_cos: DDIM's grid as rf times (`formulations.ddim_times`),
    on which one Euler step is one DDIM step. The shift is rf's."""
    if formulation == "rf":
        return euler_times(steps, shift)
    if shift != 1.0:
        raise ValueError(f"--shift {shift}: the resolution shift is rf's; {formulation} samples on DDIM's grid")
    return ddim_times(formulation, steps)


SOLVERS = ("euler", "midpoint")
# The shapes world's sampler, the default of every command that samples it (SD3: Euler, 28 steps, 7.0)
SOLVER, STEPS, GUIDANCE = "midpoint", 5, 2.0


def add_sampler_args(parser):
    """--solver/--steps/--guidance with the shapes-world defaults."""
    parser.add_argument("--solver", default=SOLVER, choices=SOLVERS)
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--guidance", type=float, default=GUIDANCE)


def solve(velocity, x: torch.Tensor, times: torch.Tensor, solver: str = "euler", progress: bool = False):
    """Integrate dx/dt = v(x, t) through `times` (decreasing: dt < 0). Euler: x ← x + dt·v(x, t). Midpoint: x ← x + dt·v(x + dt/2·v(x, t), t + dt/2);
    its step into t = 0 is an Euler step, as in EDM's Heun sampler (that step starts at t_min = 1e-3)."""
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; choose from {SOLVERS}")
    at = lambda t: t.expand(len(x)).to(x.device)  # noqa: E731
    for t, t_next in tqdm(list(zip(times[:-1], times[1:])), disable=not progress, desc=solver, leave=False):
        dt = t_next - t
        if solver == "euler" or t_next == 0:
            x = x + dt * velocity(x, at(t))
        else:
            x = x + dt * velocity(x + dt / 2 * velocity(x, at(t)), at(t + dt / 2))
    return x


def with_cfg(velocity, guidance: float, cond: tuple, uncond: tuple):
    """Classifier-free guidance v_u + w·(v_c − v_u), both branches in one batched call."""
    both = tuple(torch.cat([c, u]) for c, u in zip(cond, uncond))

    def guided(x, t):
        v_c, v_u = velocity(torch.cat([x, x]), torch.cat([t, t]), *both).chunk(2)
        return v_u + guidance * (v_c - v_u)

    return guided


def guided_velocity(model, cond: tuple, guidance: float = 1.0, uncond: tuple | None = None):
    """`v(x, t)` of `model` on conditioning `cond` = (context, pooled), with CFG when guidance ≠ 1.
    The unconditional branch is zeroed text (what dropping every encoder in training teaches), or
    `uncond` (one row, e.g. SD3's encoded empty prompt), broadcast to the batch."""
    if guidance == 1.0:
        return lambda x, t: model(x, t, *cond)
    u = tuple(torch.zeros_like(c) for c in cond) if uncond is None else \
        tuple(c.expand(len(cond[0]), *c.shape[1:]).to(cond[0].device) for c in uncond)
    return with_cfg(model, guidance, cond, u)


def noise_from_seeds(seeds, shape: tuple, device="cpu", dtype=torch.float32) -> torch.Tensor:
    """One generator per sample: a seed gives the same noise whatever batch it is drawn in."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s)))
                        for s in seeds]).to(device, dtype)


def formulation_of(model) -> str:
    """The formulation a model was trained in (its config; "rf" for a model without one)."""
    return getattr(getattr(model, "config", None), "formulation", "rf")


@torch.no_grad()
def sample(model, context: torch.Tensor, pooled: torch.Tensor, seeds, image_shape: tuple,
           steps: int = 28, shift: float = 1.0, guidance: float = 1.0, uncond: tuple | None = None,
           batch_size: int = 64, progress: bool = True, solver: str = "euler") -> torch.Tensor:
    """Generate one image per (context, pooled, seed) row, in batches (CFG: `guided_velocity`).
    A model trained as eps_linear or v_cos (its config says) samples as an rf velocity field on
    DDIM's grid (`base_model/formulations.py`): Euler is then DDIM, at the same number of calls.
    Returns x0 (N, C, H, W) in the model's space (pixels in [-1, 1], or latents)."""
    device = next(model.parameters()).device
    form = formulation_of(model)
    times = sampling_times(form, steps, shift)
    # inference_mode is ~5% faster than no_grad, but ZeRO-3 would gather its partitioned parameters
    # into inference tensors that training can no longer use
    zero3 = any(hasattr(p, "ds_id") for p in model.parameters())
    out = []
    for i in tqdm(range(0, len(seeds), batch_size), disable=not progress, desc="sampling"):
        sl = slice(i, i + batch_size)
        cond = (context[sl].to(device), pooled[sl].to(device))
        x = start_state(form, noise_from_seeds(seeds[sl], image_shape, device), times[0])
        v = guided_velocity(as_velocity(model, form), cond, guidance, uncond)
        with torch.no_grad() if zero3 else torch.inference_mode():  # the cat below makes a normal tensor
            out.append(solve(v, x, times, solver).cpu())
    return torch.cat(out)


# ---------------------------------------------------------------------------------------------
# The SDE with the ODE's marginals (Flow-GRPO), for policy-gradient training
# ---------------------------------------------------------------------------------------------


def sde_sigma(t: torch.Tensor, a: float, t_cap: float) -> torch.Tensor:
    """σ_t = a·sqrt(t / (1 − t)) (Flow-GRPO eq. 9), with t capped at `t_cap` < 1 so σ stays finite
    at t = 1 (the reference code caps it at the schedule's second time)."""
    t = t.clamp(max=t_cap)
    return a * torch.sqrt(t / (1 - t))


def sde_step(x: torch.Tensor, v: torch.Tensor, t: float, t_next: float, sigma: float,
             noise: torch.Tensor | None = None):
    """One Euler–Maruyama step from t to t_next < t of the reverse SDE whose marginals are the
    probability-flow ODE's (t = 1 is noise, x_t = (1−t)·x0 + t·ε, v = ε − x0, so the score is
    −(x + (1−t)·v)/t):

        mean = x + dt·[v + σ²/(2t)·(x + (1−t)·v)],   std = σ·sqrt(−dt),   dt = t_next − t < 0

    Returns (x_next, mean, std); x_next = mean + std·noise (noise None: the mean itself).
    σ = 0 is the Euler step of the ODE. t, t_next and σ are floats or broadcast against x."""
    dt = t_next - t
    mean = x + dt * (v + sigma ** 2 / (2 * t) * (x + (1 - t) * v))
    std = sigma * (-dt) ** 0.5
    return (mean if noise is None else mean + std * noise), mean, std


def gaussian_logprob(x: torch.Tensor, mean: torch.Tensor, std) -> torch.Tensor:
    """log N(x; mean, std²·I) averaged over all but the batch dimension (Flow-GRPO's convention:
    a mean, not a sum, so the ratio's scale does not grow with the image size). `std` is a float
    or broadcasts against x (one σ per row: shape (B, 1, 1, 1))."""
    import math

    std = torch.as_tensor(std, dtype=x.dtype, device=x.device)
    lp = -((x - mean) ** 2) / (2 * std ** 2) - torch.log(std) - 0.5 * math.log(2 * math.pi)
    return lp.mean(tuple(range(1, x.dim())))


def sde_solve(velocity, x: torch.Tensor, times: torch.Tensor, a: float, noise_fn, window: range | None = None):
    """Sample with the SDE of `sde_step` (σ_t = a·sqrt(t/(1−t)), capped at the second time) on the
    steps in `window` (all steps when None) and the ODE's Euler step elsewhere (Flow-GRPO-Fast).
    `noise_fn(j)` gives step j's standard normal noise (B, …). Returns (x0, transitions): one
    (j, x_t, x_next, std) for each stochastic step, the states a policy-gradient step needs."""
    t_cap = float(times[1]) if len(times) > 2 else 0.5
    transitions = []
    for j, (t, t_next) in enumerate(zip(times[:-1].tolist(), times[1:].tolist())):
        v = velocity(x, torch.full((len(x),), t, device=x.device))
        stochastic = (window is None or j in window) and t_next > 0
        sigma = float(sde_sigma(torch.tensor(t), a, t_cap)) if stochastic else 0.0
        x_next, _, std = sde_step(x, v, t, t_next, sigma, noise_fn(j).to(x) if stochastic else None)
        if stochastic:
            transitions.append((j, x, x_next, std))
        x = x_next
    return x, transitions
