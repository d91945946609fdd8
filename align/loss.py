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
