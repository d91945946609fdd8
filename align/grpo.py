"""Flow-GRPO's parts of the online loop (Liu et al. 2025, arXiv 2505.05470): SDE rollouts that
record their transitions, the transitions as training items, and their log-probabilities under a
policy. The loss itself is `align.loss.grpo_loss`; the loop is `align.online`.

A transition is (x_t, x_next, std) of one stochastic step j of one sample: under the policy, x_next
is Gaussian around the SDE step's mean (`base_model.sampling.sde_step`) with that std.
"""

from __future__ import annotations

import torch

from base_model.sampling import euler_times, gaussian_logprob, guided_velocity, noise_from_seeds, sde_solve, sde_step
from base_model.training import DataOrder

from .loss import grpo_loss


def sde_rollout(net, ctx, pooled, seeds, image_shape, cfg, shift: float, uncond, round_: int):
    """Sample one image per seed with the SDE on `cfg.grpo_steps` Euler steps (noise from each
    sample's seed, so a sample does not depend on its batch). With `cfg.sde_window`, only a window of
    that many steps, drawn from (seed, round), is stochastic (Flow-GRPO-Fast).
    Returns (x0, {"times", "transitions"})."""
    times = euler_times(cfg.grpo_steps, shift)
    window = None
    if cfg.sde_window:
        g = torch.Generator().manual_seed(cfg.seed * 7919 + round_ + 17)
        start = int(torch.randint(cfg.grpo_steps - min(cfg.sde_window, cfg.grpo_steps - 1), (1,), generator=g))
        window = range(start, start + cfg.sde_window)
    with torch.no_grad():
        x0, transitions = sde_solve(guided_velocity(net, (ctx, pooled), cfg.guidance, uncond),
                                    noise_from_seeds(seeds, image_shape), times, cfg.sde_a,
                                    lambda j: noise_from_seeds([s * 101 + j for s in seeds], image_shape), window)
    return x0, {"times": times, "transitions": transitions}


def transition_items(traj: dict, adv: torch.Tensor, gather) -> dict:
    """Every stochastic transition of every sample whose advantage is not 0 (its group had spread),
    gathered over processes: {"sample", "step", "x", "x_next", "std"}, one row per item."""
    transitions = traj["transitions"]
    x = gather(torch.stack([tr[1] for tr in transitions], 1))  # (N, S, C, H, W)
    x_next = gather(torch.stack([tr[2] for tr in transitions], 1))
    S = x.shape[1]
    informative = (adv != 0).nonzero().flatten()
    sample_i, step_k = informative.repeat_interleave(S), torch.arange(S).repeat(len(informative))
    return {"sample": sample_i, "step": torch.tensor([tr[0] for tr in transitions])[step_k],
            "x": x[sample_i, step_k], "x_next": x_next[sample_i, step_k],
            "std": torch.tensor([tr[3] for tr in transitions], dtype=torch.float32)[step_k]}


def transition_logprob(model, buf: dict, idx: torch.Tensor, guidance: float) -> tuple[torch.Tensor, torch.Tensor]:
    """log π(x_next | x_t) of transitions `idx` under `model`, and the step means (for the KL)."""
    tr = buf["grpo"]
    step_j, prompt = tr["step"][idx], buf["prompt"][tr["sample"][idx]]
    t, t_next, std = buf["times"][step_j], buf["times"][step_j + 1], tr["std"][idx]
    x = tr["x"][idx]
    row = lambda a: a.view(-1, *[1] * (x.dim() - 1))  # noqa: E731
    v = guided_velocity(model, (buf["context"][prompt], buf["pooled"][prompt]), guidance, buf["uncond"])(x, t)
    sigma = row(std) / (row(t) - row(t_next)).sqrt()  # std = σ·sqrt(−dt)
    mean = sde_step(x, v, row(t), row(t_next), sigma)[1]
    return gaussian_logprob(tr["x_next"][idx], mean, row(std)), mean


@torch.no_grad()
def old_logprobs(model, buf: dict, n_items: int, steps: int, n_global: int, mine: slice, order_seed: int,
                 guidance: float) -> torch.Tensor:
    """log π_old of every transition, computed before any update with the training forward in the
    training's own micro-batches (an item's first one), so the first step's ratio is exactly 1."""
    order = DataOrder(n_items, order_seed)
    out = torch.zeros(n_items)
    seen = torch.zeros(n_items, dtype=torch.bool)
    for s in range(steps):
        idx = order.indices(s * n_global, n_global)[mine]
        if seen[idx].all():
            continue
        lp = transition_logprob(model, buf, idx, guidance)[0]
        fresh = ~seen[idx]
        out[idx[fresh]] = lp[fresh]
        seen[idx] = True
    return out


def grpo_step(model, base_context, buf: dict, idx: torch.Tensor, cfg):
    """Clipped policy gradient on transitions `idx`; the KL to the base (run inside
    `base_context()`, the adapter disabled) when `cfg.kl_beta` > 0."""
    logp, mean = transition_logprob(model, buf, idx, cfg.guidance)
    kl = None
    if cfg.kl_beta:
        with torch.no_grad(), base_context():
            ref_mean = transition_logprob(model, buf, idx, cfg.guidance)[1]
        std = buf["grpo"]["std"][idx].view(-1, *[1] * (mean.dim() - 1))
        kl = ((mean - ref_mean) ** 2 / (2 * std ** 2)).mean(tuple(range(1, mean.dim())))
    return grpo_loss(logp, buf["old_logp"][idx], buf["adv"][buf["grpo"]["sample"][idx]], cfg.clip_range, kl,
                     cfg.kl_beta)
