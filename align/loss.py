"""Diffusion-DPO for rectified flow (Wallace et al. 2023, arXiv 2311.12908, eq. 14 with the
velocity loss of `base_model/flow.py`). A pure function of per-sample errors.

Inputs are per-sample velocity MSEs of shape (2B,), laid out [winners; losers], for the policy
(e_θ) and the reference (e_ref), computed with the same noise and t for a winner and its loser:

    inside = −β/2 · ((e_θ^w − e_ref^w) − (e_θ^l − e_ref^l))
    sigmoid: −log σ(inside)     hinge: max(0, 1 − inside)     ipo: (inside/β − 1/(2β))²

A lower error than the reference is a higher implicit log-likelihood, so the implicit rewards
(TRL's names) are `rewards/chosen = −β/2·(e_θ^w − e_ref^w)`, `rewards/rejected` likewise, and
`rewards/margins = chosen − rejected = inside`. `sft` trains on the winners alone (no reference):
the control every DPO result is reported beside.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LOSS_TYPES = ("sigmoid", "hinge", "ipo", "sft")


def dpo_loss(policy_losses: torch.Tensor, ref_losses: torch.Tensor | None, beta: float,
             loss_type: str = "sigmoid", sft_weight: float = 0.0) -> tuple[torch.Tensor, dict]:
    """→ (scalar loss, metrics). `sft_weight` adds λ·mean(e_θ^w) (on β's scale: β=500 wants λ in the hundreds)."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type {loss_type!r}: choose from {LOSS_TYPES}")
    if policy_losses.dim() != 1 or len(policy_losses) % 2:
        raise ValueError(f"policy_losses must have shape (2B,) laid out [winners; losers], got {tuple(policy_losses.shape)}")
    pol_w, pol_l = policy_losses.chunk(2)
    if loss_type == "sft":
        loss = pol_w.mean()
        return loss, {"loss": loss.detach(), "mse/policy_chosen": pol_w.detach().mean(),
                      "mse/policy_rejected": pol_l.detach().mean()}
    if ref_losses is None or ref_losses.shape != policy_losses.shape:
        raise ValueError("ref_losses must have the shape of policy_losses for DPO loss types")
    ref_w, ref_l = ref_losses.detach().chunk(2)
    chosen = -0.5 * beta * (pol_w - ref_w)  # implicit rewards
    rejected = -0.5 * beta * (pol_l - ref_l)
    inside = chosen - rejected
    if loss_type == "sigmoid":
        per_pair = -F.logsigmoid(inside)
    elif loss_type == "hinge":
        per_pair = torch.relu(1 - inside)
    else:  # ipo (Azar et al. 2023): regress the log-ratio margin to 1/(2β)
        per_pair = (inside / beta - 1 / (2 * beta)) ** 2
    loss = per_pair.mean() + (sft_weight * pol_w.mean() if sft_weight else 0.0)
    accuracy = (inside > 0).float() + 0.5 * (inside == 0).float()  # ties count half
    metrics = {
        "loss": loss.detach(),
        "rewards/chosen": chosen.detach().mean(),
        "rewards/rejected": rejected.detach().mean(),
        "rewards/accuracies": accuracy.mean(),
        "rewards/margins": inside.detach().mean(),
        "mse/policy_chosen": pol_w.detach().mean(), "mse/policy_rejected": pol_l.detach().mean(),
        "mse/ref_chosen": ref_w.mean(), "mse/ref_rejected": ref_l.mean(),
    }
    return loss, metrics


def adaptive_weights(v_ref: torch.Tensor, target: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """DiffusionNFT's adaptive weight carried to Diffusion-DPO's errors: the x0-space error of a velocity v is
    ‖x̂0 − x0‖² = t²·‖v − v*‖², weighted by 1 / sg(mean |x̂0 − x0|) it is t·‖v − v*‖² / mean |v_ref − v*|.
    → the per-sample factor (B,) t / mean |v_ref − v*| by which policy and reference MSEs are both multiplied
    (`online --dpo_error_weight adaptive`): every pair member counts by its relative error, not its raw size."""
    dims = tuple(range(1, v_ref.dim()))
    return t / (v_ref - target).abs().mean(dims).clamp_min(1e-5)


# ---------------------------------------------------------------------------------------------
# Online objectives: each a pure function of tensors, used by `align.online`
# ---------------------------------------------------------------------------------------------


def group_advantages(rewards: torch.Tensor, eps: float = 1e-4, global_std: bool = False) -> torch.Tensor:
    """Group-relative advantages (GRPO, Shao et al. 2024; Flow-GRPO eq. 4): rewards (P, K) of K
    samples per prompt → (r − mean_p) / (std_p + eps), with the population std (ddof 0) as in
    Flow-GRPO's per-prompt stat tracker. With `global_std` the std is the whole round's, as
    DiffusionNFT's default: a group's rare success keeps its size instead of being scaled up by a
    small group std. A group with no spread gets advantage 0 everywhere: it carries no signal."""
    if rewards.dim() != 2 or rewards.shape[1] < 2:
        raise ValueError(f"rewards must be (prompts, K ≥ 2), got {tuple(rewards.shape)}")
    mean = rewards.mean(1, keepdim=True)
    spread = rewards.std(1, unbiased=False, keepdim=True)
    std = rewards.std(unbiased=False).expand_as(spread) if global_std else spread
    return torch.where(spread > 0, (rewards - mean) / (std + eps), torch.zeros_like(rewards))


def optimality_probability(advantages: torch.Tensor, clip_max: float = 1.0) -> torch.Tensor:
    """DiffusionNFT's r ∈ [0, 1] from an advantage: clip to [−c, c], map linearly to [0, 1]
    (r = 0.5 + A/(2c)); r = 1 is a sample to imitate, r = 0 one to move away from."""
    return (advantages.clamp(-clip_max, clip_max) / clip_max / 2 + 0.5).clamp(0, 1)


def nft_loss(v_theta: torch.Tensor, v_old: torch.Tensor, x_t: torch.Tensor, x0: torch.Tensor,
             t: torch.Tensor, r: torch.Tensor, beta: float = 1.0, scale: float = 1.0) -> tuple[torch.Tensor, dict]:
    """DiffusionNFT (Zheng et al. 2025, arXiv 2509.16117, eq. 7 with its adaptive weighting).

    Clean samples x0 of the sampling ("old") policy, noised on the forward path x_t = (1−t)·x0 + t·ε,
    each with an optimality probability r. The implicit positive and negative policies are

        v⁺ = (1 − β)·v_old + β·v_θ        v⁻ = (1 + β)·v_old − β·v_θ

    and each is trained with the flow-matching loss in x0 space, x̂0 = x_t − t·v, weighted by
    1 / sg(mean |x̂0 − x0|) (the paper's adaptive weight):

        L = scale · mean_i [ r_i·‖x̂0⁺ − x0‖² / w⁺_i + (1 − r_i)·‖x̂0⁻ − x0‖² / w⁻_i ] / β

    With r = 0.5 + A/(2c) from `optimality_probability`, scale = c makes a sample's pull
    proportional to its advantage A whatever the clip bound c (the reference implementation's choice).
    Positives pull v_θ toward their data, negatives push it away, relative to v_old. When
    v_θ = v_old both implicit policies equal v_old. Shapes: v, x (B, C, H, W); t, r (B,)."""
    tb = t.view(-1, *[1] * (x0.dim() - 1))
    v_old = v_old.detach()
    dims = tuple(range(1, x0.dim()))
    pos = x_t - tb * ((1 - beta) * v_old + beta * v_theta) - x0  # x̂0⁺ − x0
    neg = x_t - tb * ((1 + beta) * v_old - beta * v_theta) - x0  # x̂0⁻ − x0
    w_pos = pos.detach().abs().mean(dims).clamp_min(1e-5)
    w_neg = neg.detach().abs().mean(dims).clamp_min(1e-5)
    pos_loss = pos.pow(2).mean(dims) / w_pos
    neg_loss = neg.pow(2).mean(dims) / w_neg
    loss = scale * ((r * pos_loss + (1 - r) * neg_loss) / beta).mean()
    metrics = {"loss": loss.detach(), "nft/positive_loss": pos_loss.detach().mean(),
               "nft/negative_loss": neg_loss.detach().mean(),
               "nft/old_deviation": (v_theta.detach() - v_old).pow(2).mean(), "nft/r": r.mean()}
    return loss, metrics


def grpo_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, clip_range: float = 1e-4,
              kl: torch.Tensor | None = None, kl_beta: float = 0.0) -> tuple[torch.Tensor, dict]:
    """Flow-GRPO's clipped surrogate (Liu et al. 2025, arXiv 2505.05470, eq. 6), per SDE transition.

        ρ = exp(log π_θ(x_{t−1}|x_t) − log π_old(x_{t−1}|x_t))
        L = mean[ max(−A·ρ, −A·clip(ρ, 1 − ε, 1 + ε)) ] + β_KL · mean(KL(π_θ ‖ π_ref))

    `logp`, `old_logp`, `advantages` and `kl` have one entry per transition (B,). On a purely
    on-policy step ρ is exactly 1 and the gradient is the policy gradient −A·∇log π_θ."""
    ratio = torch.exp(logp - old_logp.detach())
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip_range, 1 + clip_range)
    policy = torch.maximum(unclipped, clipped).mean()
    loss = policy + (kl_beta * kl.mean() if kl is not None and kl_beta else 0.0)
    metrics = {"loss": loss.detach(), "grpo/policy_loss": policy.detach(), "grpo/ratio": ratio.detach().mean(),
               "grpo/clip_fraction": ((ratio - 1).abs() > clip_range).float().mean()}
    if kl is not None:
        metrics["grpo/kl"] = kl.detach().mean()
    return loss, metrics
