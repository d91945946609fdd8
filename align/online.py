"""Online preference training of a LoRA policy: sample, score, train, repeat.

    python -m align.online --config configs/online/toy.yaml --base runs/toy/final --output_dir runs/nft
    python -m align.online --config configs/online/toy.yaml --method dpo --base … --output_dir runs/odpo
    accelerate launch --num_processes 2 --use_deepspeed --deepspeed_config_file configs/deepspeed/zero2.json \
        -m align.online --config configs/online/toy.yaml --base … --output_dir …

Each round draws `prompts_per_round` prompts, samples a group of `k` images per prompt from the
policy, scores them with the reward (any of `reward.scorers`, or a weighted sum), and takes
`steps_per_round` optimizer steps on the method's signal (the math is in `align/loss.py`):

    dpo    best vs worst image of each group (groups with no spread are skipped and counted), the
           Diffusion-DPO loss with shared noise and t; the reference is a frozen copy of the adapter
           refreshed every `ref_update_steps` optimizer steps (0: the base itself); `pairs_per_group` n
           adds the i-th best vs the i-th worst for i < n; `dpo_error_weight adaptive` multiplies both
           errors by DiffusionNFT's adaptive weight (`loss.adaptive_weights`): with the reference
           refreshed every round this is, to first order, NFT's pull on the pairs
    nft    DiffusionNFT: group-normalised rewards → optimality probabilities; implicit positive and
           negative policies around the sampling ("old") adapter; flow matching on the clean samples.
           The old adapter follows the policy after each round (`old_decay` 0: a copy)
    grpo   Flow-GRPO: the SDE sampler (noise level `sde_a`) with per-step Gaussian log-probabilities,
           group-relative advantages, a clipped ratio, KL to the base with `kl_beta`; trains on
           `grpo_steps` sampling steps (fewer than evaluation uses), optionally on a window of them
    raft   the control: flow matching on the policy's own samples that reach `raft_threshold`

`--ptx_weight W` adds, to any method's loss, W × the pretraining flow-matching loss on renders of the prompt
split's scenes (PPO-ptx, as InstructGPT mixes its pretraining loss into RL): it holds the policy near the data
while the reward pulls it. A run with it has seen real images: compare it with its control, the same run on
`--reward constant` (no preference: only the renders' term moves the policy).

Every random draw comes from (seed, round) or (seed, step), never from the process: 1 and N processes
run the same training. Each process samples a contiguous share of the round's prompts and the groups
are gathered in prompt order. Output: `final/` (PEFT adapter + its base's path and SHA-256, loadable
by every `--model` flag), `checkpoint-N/` (atomic, `--resume_from_checkpoint latest`), `log.jsonl`
(a row per round: mean reward, zero-spread share, the method's metrics, images/s, reward calls,
elapsed seconds), `samples/step-R.png` (R = the round).
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import time
from dataclasses import asdict, dataclass, field, replace

import torch
from tqdm.auto import tqdm

from base_model.adapters import load, require_rf, weights_sha256
from base_model.cache import Cache, check_conditioning
from base_model.cli import check_fields, check_types, parse
from base_model.flow import DENSITIES, flow_loss, interpolate, per_sample_mse, sample_t, velocity_target
from base_model.sampling import GUIDANCE, SOLVER, SOLVERS, STEPS, guided_velocity, sample
from base_model.errors import InputError, entry_point
from base_model.precompute import PrecomputeConfig, pending
from base_model.sources import read_prompts
from base_model.text import TextEmbedder
from base_model.training import (DataOrder, append_log, build_caches, check_finite, check_run_folder, clip_and_step,
                                 configure_deepspeed, make_accelerator, make_run_folder, optimizer_and_scheduler,
                                 save_checkpoint, start_logging, step_generator, zero_stage)
from reward import compositional

from .dpo import sample_grid, save_adapter
from .grpo import grpo_step, old_logprobs, sde_rollout, transition_items
from .loss import adaptive_weights, dpo_loss, group_advantages, nft_loss, optimality_probability
from .lora import (DEFAULT_TARGETS, adapter, add_lora, copy_adapter, load_adapter_weights, loraplus_groups, merged,
                   save_adapters, snapshot_adapter)

METHODS = ("dpo", "nft", "grpo", "raft")
OLD, REF, EMA = "old", "ref", "ema"  # frozen adapters: NFT's sampling policy, DPO's moving reference, the EMA


@dataclass
class OnlineConfig:
    base: str = ""  # checkpoint or SD3 folder the LoRA policy is trained on
    method: str = "nft"  # "dpo", "nft", "grpo" or "raft" (see the module doc)
    # rounds: prompts, groups, rewards
    prompts: str = "train"  # a shapes-world split or a text file of prompts
    prompt_pool: str = "distinct"  # "distinct": each distinct prompt once (on the shapes world 69% position prompts:
    #                                simple prompts have few distinct captions); "scenes": a split's prompts as often
    #                                as its scenes hold them (a file: every line), the data's task mix; "tasks"
    #                                (a split): the scenes drawn so that each task is 1/6 of the draws, the weight
    #                                GenEval's overall (the unweighted mean of the task accuracies) gives it
    cache_dir: str = ""  # where the prompts' text embeddings are precomputed on first use; "" → output_dir/data-cache
    prompts_per_round: int = 32
    k: int = 8  # group size: samples per prompt
    rounds: int = 20
    steps_per_round: int = 4  # optimizer steps on each round's samples
    reward: list[str] = field(default_factory=lambda: ["compositional"])  # reward.scorers specs, summed
    reward_weights: list[float] = field(default_factory=list)  # one per reward (empty: all 1)
    # sampling of the rounds (nft, dpo, raft: any solver; grpo: its SDE)
    sample_solver: str = SOLVER
    sample_steps: int = STEPS
    guidance: float = GUIDANCE
    # training times for the flow-matching objectives (dpo, nft, raft)
    timestep_density: str = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    shift: float = 1.0
    # online DPO
    beta: float = 500.0  # Diffusion-DPO's β on the velocity loss
    sft_weight: float = 0.0
    ref_update_steps: int = 0  # refresh the reference to the policy every N optimizer steps (0: the base)
    pairs_per_group: int = 1  # 1: best vs worst; n: also the i-th best vs the i-th worst, i < n
    dpo_error_weight: str = "none"  # "adaptive": both errors × t / mean |v_ref − v*| (loss.adaptive_weights)
    # DiffusionNFT
    nft_beta: float = 1.0  # how far the implicit policies sit from the old one
    nft_guided: bool = False  # the loss on the guided velocity v_u + w·(v_c − v_u) at the rollouts' guidance w, the
    #                           velocity that drew the samples (False: the conditional one; DiffusionNFT's GenEval
    #                           recipe trains and samples CFG-free). Each training forward doubles.
    adv_clip_max: float = 1.0  # advantages clipped to ±this before mapping to r ∈ [0, 1]
    nft_loss_scale: str = "one"  # "one" or "clip": the loss × adv_clip_max (DiffusionNFT's code)
    global_std: bool = False  # advantages divided by the round's reward std, not each group's
    nft_kl: float = 0.0  # weight of mean ‖v_θ − v_base‖², DiffusionNFT's KL to the reference (0: off)
    nft_kl_t_max: float = 0.0  # 0: the KL at the loss's t; > 0: at its own t ~ U(0, this), near the data, where
    #                            appearance is decided (the layout, decided near the noise, stays free)
    old_decay: float = 0.0  # old ← decay·old + (1 − decay)·policy after each round
    old_decay_rate: float = 0.0  # > 0: the decay rises by this per optimizer step up to old_decay (old_policy_decay;
    #                              DiffusionNFT's code: 0.001 per step up to 0.5), the old adapter lagging more late
    ema_decay: float = 0.0  # > 0: an EMA of the policy after every step, min((1 + step)/(10 + step), decay)
    #                         as DiffusionNFT's code (0.9); the final adapter is the EMA (0: the policy)
    # Flow-GRPO
    grpo_steps: int = 10  # Euler SDE steps of the training rollouts
    sde_a: float = 0.7  # σ_t = a·sqrt(t/(1−t))
    sde_window: int = 0  # train only on a random window of this many steps per round (0: every step)
    clip_range: float = 1e-4
    kl_beta: float = 0.04
    # RAFT
    raft_threshold: float = 1.0  # samples scoring at least this are imitated
    # PPO-ptx (InstructGPT, Ouyang et al. 2022): the pretraining loss beside the method's, against drift
    ptx_weight: float = 0.0  # weight of the flow-matching loss on renders of the prompt split's scenes (0: off)
    ptx_batch_size: int = 32  # renders per optimizer step, over all processes
    # adapters and optimisation
    lora_r: int = 16
    lora_alpha: int = 16
    lora_target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    optimizer: str = "adamw"
    learning_rate: float = 1e-3
    loraplus_lr_ratio: float = 0.0  # > 0: LoRA+, the B matrices at this × learning_rate (peft's loraplus_lr_ratio)
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    weight_decay: float = 0.0
    lr_scheduler_type: str = "constant"
    warmup_steps: int = 0
    per_device_train_batch_size: int = 32  # samples (pairs for dpo, transitions for grpo)
    max_grad_norm: float = 1.0
    mixed_precision: str = "no"
    torch_compile: bool = False  # torch.compile the model (as transformers' TrainingArguments.torch_compile): the
    #                              rollouts and the training steps run compiled (the grids eager: their batch would
    #                              compile graphs of its own). A round of the toy preset is about 1.3× faster on 2 CPU
    #                              cores, after a compile of about 1.5 min the first time on a machine (inductor's cache
    #                              keeps it; benchmarks/compile_round.py)
    torch_compile_backend: str = "inductor"  # "aot_eager": traced as inductor would be, run by torch's kernels (tests)
    torch_compile_training: bool = True  # false: only the rollouts compile; the training steps' graphs (forward and
    #                                      backward, about 70 s of the compile) cost more than they save in a short run
    # logging, checkpoints
    output_dir: str = "runs/online"
    save_rounds: int = 5  # a checkpoint every N rounds (and at the end)
    save_total_limit: int = 2
    num_samples: int = 16  # the sample grid's images
    grid_rounds: int = 1  # a sample grid every N rounds and after the last (as diffusers' --validation_epochs)
    report_to: str = "wandb"
    resume_from_checkpoint: str = ""  # "latest" or a checkpoint folder
    overwrite_output_dir: bool = False  # replace a finished run in output_dir (as in transformers)
    seed: int = 0

    def __post_init__(self):
        check_types(self)
        choices = {"method": METHODS, "sample_solver": SOLVERS, "timestep_density": DENSITIES,
                   "optimizer": ("adamw", "adamw_8bit"), "mixed_precision": ("no", "bf16"),
                   "report_to": ("wandb", "none"), "nft_loss_scale": ("one", "clip"),
                   "prompt_pool": ("scenes", "distinct", "tasks"), "dpo_error_weight": ("none", "adaptive"),
                   "torch_compile_backend": ("inductor", "aot_eager", "eager")}
        check_fields(self, choices, ("prompts_per_round", "rounds", "steps_per_round", "per_device_train_batch_size",
                                     "lora_r", "sample_steps", "grpo_steps", "save_rounds", "ptx_batch_size",
                                     "grid_rounds"))
        if self.k < 2:
            raise ValueError("--k must be ≥ 2: the signal is relative within a group")
        if self.reward_weights and len(self.reward_weights) != len(self.reward):
            raise ValueError(f"--reward_weights has {len(self.reward_weights)} values for {len(self.reward)} rewards")
        if self.ptx_weight < 0:
            raise ValueError("--ptx_weight must be ≥ 0")
        if self.ptx_weight and not _is_split(self.prompts):
            raise ValueError(f"--ptx_weight needs a shapes-world split as --prompts (its renders are the data), "
                             f"got {self.prompts!r}")
        for name in ("old_decay", "ema_decay"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"--{name} must be in [0, 1)")
        if self.old_decay_rate < 0:
            raise ValueError("--old_decay_rate must be ≥ 0")
        if self.loraplus_lr_ratio < 0:
            raise ValueError("--loraplus_lr_ratio must be ≥ 0 (0: off)")

    @property
    def max_steps(self) -> int:  # the LR schedule's length
        return self.rounds * self.steps_per_round


def old_policy_decay(step: int, cap: float, rate: float = 0.0) -> float:
    """The decay of NFT's old (sampling) adapter after a round that ended at optimizer step `step`:
    `cap` throughout when `rate` is 0, else min(rate·step, cap), DiffusionNFT's schedule: fully on-policy
    at first, the old adapter lagging the policy more as training goes on (a slower-moving anchor for
    the implicit policies, which sit around it)."""
    return min(rate * step, cap) if rate else cap


# ---------------------------------------------------------------------------------------------
# Rewards
# ---------------------------------------------------------------------------------------------


def make_reward(specs: list[str], weights: list[float]):
    """`score(images, prompts) -> (N,)`: the weighted sum of the named scorers. A scorer that raises
    or returns NaN/inf stops the run with an error naming it."""
    from reward.scorers import get_scorer

    scorers = [(spec, get_scorer(spec), w) for spec, w in zip(specs, weights or [1.0] * len(specs))]

    def score(images, prompts, where: str) -> torch.Tensor:
        total = torch.zeros(len(images))
        for spec, fn, w in scorers:
            try:
                s = torch.as_tensor(fn(images, prompts), dtype=torch.float32).reshape(-1)
            except Exception as e:
                raise RuntimeError(f"reward {spec!r} failed in {where}: {type(e).__name__}: {e}") from e
            if s.shape != (len(images),) or not torch.isfinite(s).all():
                bad = (~torch.isfinite(s)).sum().item() if s.shape == (len(images),) else "shape"
                raise ValueError(f"reward {spec!r} returned {bad} non-finite value(s) of {len(images)} in {where}"
                                 if bad != "shape" else
                                 f"reward {spec!r} returned shape {tuple(s.shape)} for {len(images)} images in {where}")
            total += w * s
        return total

    return score


# ---------------------------------------------------------------------------------------------
# Adapters: which one is active
# ---------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------
# A round's samples: contiguous prompt shares per process, gathered in prompt order
# ---------------------------------------------------------------------------------------------


def prompt_pool(spec: str, kind: str = "distinct") -> tuple[list[str], torch.Tensor | None]:
    """The prompts a round draws from, and their draw weights (None: uniform): a shapes-world split's first
    5000 scenes' captions (`prompts_cache`) or a text file's lines. "scenes" keeps repeats (a caption is
    drawn as often as the data holds it), "distinct" keeps each prompt once, "tasks" (a split only) keeps
    repeats and weighs each scene by 1 / (its task's count), so every task is drawn equally often."""
    prompts, scenes = read_prompts(spec, 5000 if _is_split(spec) else None)
    if kind == "distinct":
        return list(dict.fromkeys(prompts)), None
    if kind == "scenes":
        return prompts, None
    if scenes is None:
        raise InputError(f"--prompt_pool tasks needs a shapes-world split for --prompts (its scenes name their "
                         f"tasks), got the file {spec!r}: use --prompt_pool scenes or distinct")
    counts = collections.Counter(s.task for s in scenes)
    return prompts, torch.tensor([1.0 / counts[s.task] for s in scenes], dtype=torch.float64)


def prompts_cache(spec: str, cache_dir: str, output_dir: str, cond: tuple, grid: list[str]) -> PrecomputeConfig:
    """The text table of the prompt pool and the grid's prompts (`precompute --text_only`): the loop
    reads each round's embeddings from it, so memory does not grow with the pool."""
    import hashlib

    split = _is_split(spec)
    name = f"prompts-{spec}" if split else f"prompts-{hashlib.sha256(os.path.abspath(spec).encode()).hexdigest()[:12]}"
    return PrecomputeConfig(dataset="shapes" if split else spec, split=spec if split else "train",
                            num_images=5000, text_only=True, prompts=grid, text_encoders=list(cond[0]),
                            image_space=cond[1], output=os.path.join(cache_dir or os.path.join(output_dir, "data-cache"), name),
                            overwrite_output_dir=not cache_dir)


def round_prompts(pool_size: int, n: int, seed: int, round_: int, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Indices of the round's prompts in the pool, drawn from (seed, round): uniformly, or by `weights`
    (with replacement)."""
    g = torch.Generator().manual_seed(seed * 7919 + round_)
    if weights is None:
        return torch.randint(pool_size, (n,), generator=g)
    return torch.multinomial(weights, n, replacement=True, generator=g)


def _is_split(spec: str) -> bool:
    from base_model.shapes import SPLIT_OFFSETS
    return spec in SPLIT_OFFSETS


def rollout(policy, net, cond, prompts_idx, cfg: OnlineConfig, round_: int):
    """Sample the groups of this process's prompts. Seeds depend on (seed, round, prompt, j) only.
    Returns x0 (n, C, H, W) in model space, and for grpo the SDE transitions."""
    context, pooled = cond
    rep = prompts_idx.repeat_interleave(cfg.k)
    seeds = [(cfg.seed * 1_000 + round_) * 1_000_000 + int(p) * cfg.k + j
             for p in prompts_idx.tolist() for j in range(cfg.k)]
    if cfg.method == "grpo":
        return sde_rollout(net, context[rep], pooled[rep], seeds, policy.image_shape, cfg, policy.shift,
                           policy.uncond, round_)
    return sample(net, context[rep], pooled[rep], seeds, policy.image_shape, steps=cfg.sample_steps,
                  shift=policy.shift, guidance=cfg.guidance, uncond=policy.uncond, progress=False,
                  solver=cfg.sample_solver), None


# ---------------------------------------------------------------------------------------------
# Each method's training signal from a round
# ---------------------------------------------------------------------------------------------


def dpo_pairs(rewards: torch.Tensor, per_group: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Winner and loser flat indices (into P·K): the i-th best against the i-th worst of each
    group for i < per_group (1: best vs worst), kept where the winner scores strictly higher;
    groups with no spread give none."""
    P, K = rewards.shape
    order = torch.argsort(rewards, dim=1, descending=True, stable=True)
    best, worst = [], []
    for i in range(min(per_group, K // 2)):
        w, l = order[:, i], order[:, K - 1 - i]
        keep = (rewards.gather(1, w[:, None]) > rewards.gather(1, l[:, None])).flatten().nonzero().flatten()
        best.append(w[keep] + keep * K)
        worst.append(l[keep] + keep * K)
    return torch.cat(best), torch.cat(worst)


def ptx_data(split: str, space, image_shape, texts) -> dict:
    """The pretraining data of PPO-ptx: renders of the first 5000 scenes of a shapes-world split (the
    scenes whose captions the prompt pool holds) in model space, and their rows of the text table."""
    from base_model.data import shapes_data, to_model_space

    data, scenes = shapes_data(split, 5000, resolution=image_shape[-1] * space.downsample)
    x0 = torch.cat([space.encode(to_model_space(data.images[i:i + 256])) for i in range(0, len(scenes), 256)])
    return {"x0": x0, "rows": texts.text_ids([s.caption for s in scenes])}


def ptx_loss(model, ptx: dict, texts, cfg: OnlineConfig, gen: torch.Generator, world: int, rank: int) -> torch.Tensor:
    """The flow-matching loss of `cfg.ptx_batch_size` renders drawn from `gen` (this process: its
    contiguous share), at the method's training-time density."""
    n = cfg.ptx_batch_size
    idx = torch.randint(len(ptx["x0"]), (n,), generator=gen)
    t = sample_t(n, cfg.timestep_density, cfg.logit_mean, cfg.logit_std, cfg.mode_scale, cfg.shift, generator=gen)
    noise = torch.randn((n, *ptx["x0"].shape[1:]), generator=gen)
    mine = torch.arange(n).tensor_split(world)[rank]
    c, p = texts.text(ptx["rows"][idx[mine].numpy()])
    return flow_loss(model, ptx["x0"][idx[mine]], noise[mine], t[mine], c, p).mean()


def step_loss(model, peft_model, cfg: OnlineConfig, buf: dict, idx: torch.Tensor, gen: torch.Generator,
              mine: slice, use_ref_adapter: bool):
    """The loss of one micro-batch `idx` (global indices into the round's buffer; this process takes
    `mine`). Noise and t are drawn for the global batch from `gen` and sliced."""
    n = len(idx)
    if cfg.method == "grpo":
        return grpo_step(model, lambda: adapter(peft_model, None), buf, idx[mine], cfg)
    t = sample_t(n, cfg.timestep_density, cfg.logit_mean, cfg.logit_std, cfg.mode_scale, cfg.shift,
                 generator=gen)[mine]
    shape = buf["x0"].shape[1:]
    noise = torch.randn((n, *shape), generator=gen)[mine]
    idx = idx[mine]
    if cfg.method == "dpo":
        w, l = buf["pairs"][0][idx], buf["pairs"][1][idx]
        x = torch.cat([buf["x0"][w], buf["x0"][l]])
        ids = torch.cat([buf["prompt"][w], buf["prompt"][l]])
        c, p = buf["context"][ids], buf["pooled"][ids]
        noise2, t2 = noise.repeat(2, 1, 1, 1), t.repeat(2)
        x_t, target = interpolate(x, noise2, t2), velocity_target(x, noise2)
        with merged(peft_model, REF) if use_ref_adapter else adapter(peft_model, None), torch.no_grad():
            v_ref = model(x_t, t2, c, p)
        errors, ref = per_sample_mse(model(x_t, t2, c, p), target), per_sample_mse(v_ref, target)
        if cfg.dpo_error_weight == "adaptive":
            w = adaptive_weights(v_ref, target, t2)
            errors, ref = errors * w, ref * w
        return dpo_loss(errors, ref, cfg.beta, "sigmoid", cfg.sft_weight)
    x0, ids = buf["x0"][idx], buf["prompt"][idx]
    c, p = buf["context"][ids], buf["pooled"][ids]
    if cfg.method == "raft":
        loss = flow_loss(model, x0, noise, t, c, p).mean()
        return loss, {"loss": loss.detach()}
    x_t = interpolate(x0, noise, t)  # nft
    velocity = guided_velocity(model, (c, p), cfg.guidance if cfg.nft_guided else 1.0, buf["uncond"])
    with merged(peft_model, OLD):
        v_old = velocity(x_t, t)
    scale = cfg.adv_clip_max if cfg.nft_loss_scale == "clip" else 1.0
    v = velocity(x_t, t)
    loss, metrics = nft_loss(v, v_old, x_t, x0, t, buf["r"][idx], cfg.nft_beta, scale)
    if cfg.nft_kl > 0:  # the Gaussian KL between policy and base steps, up to a constant factor
        v_kl = v
        if cfg.nft_kl_t_max > 0:  # drawn after the loss's draws: those stay the same with or without it
            t = (torch.rand(n, generator=gen) * cfg.nft_kl_t_max)[mine]
            x_t = interpolate(x0, noise, t)
            v_kl = velocity(x_t, t)
        with torch.no_grad(), adapter(peft_model, None):
            v_base = velocity(x_t, t)  # the same velocity as the loss's: guided under --nft_guided
        kl = (v_kl - v_base).pow(2).mean()
        loss = loss + cfg.nft_kl * kl
        metrics = {**metrics, "loss": loss.detach(), "nft/kl": kl.detach()}
    return loss, metrics


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------


def main(cfg: OnlineConfig):
    from accelerate.utils import gather_object, set_seed

    if not cfg.base:
        raise InputError("--base CHECKPOINT (or an SD3 folder) is required")
    B, seed = cfg.per_device_train_batch_size, cfg.seed
    resume = check_run_folder(cfg)  # before anything is written or loaded
    loaded = require_rf(load(cfg.base, text_encoders=False))
    space, model, cond = loaded.space, loaded.model.train(), loaded.encoders
    pool, pool_weights = prompt_pool(cfg.prompts, cfg.prompt_pool)
    grid, _ = read_prompts("heldout_prompts" if _is_split(cfg.prompts) else cfg.prompts, cfg.num_samples)
    tcfg = prompts_cache(cfg.prompts, cfg.cache_dir, cfg.output_dir, cond, grid)
    build = pending([tcfg], cond)
    text = TextEmbedder(cond[0]) if build and loaded.text is None else loaded.text  # only to build the cache
    accelerator = make_accelerator(cfg.output_dir, cfg.report_to, cfg.mixed_precision)
    frozen_copies = cfg.method == "nft" or cfg.ema_decay or (cfg.method == "dpo" and cfg.ref_update_steps)
    if frozen_copies and zero_stage(accelerator) == 3:
        raise InputError(f"--method {cfg.method} keeps frozen copies of the adapter (NFT's old policy, DPO's moving "
                         "reference, the EMA), which ZeRO-3 would partition: launch with ZeRO-2 "
                         "(configs/deepspeed/zero2.json), which shards the LoRA optimizer state, all there is to shard")
    set_seed(seed)
    world, rank = accelerator.num_processes, accelerator.process_index
    make_run_folder(accelerator, cfg, resume)
    build_caches(accelerator, build, text, space, cond)
    texts = Cache(tcfg.output)
    check_conditioning(texts.path, texts.manifest, cond[0], cond[1])
    text, pool_rows = None, texts.text_ids(pool)  # text-table rows of the pool; embeddings read per round
    base_sha = weights_sha256(cfg.base)
    score = make_reward(cfg.reward, cfg.reward_weights)
    ptx = ptx_data(cfg.prompts, space, loaded.image_shape, texts) if cfg.ptx_weight > 0 else None

    model.requires_grad_(False)
    peft_model = add_lora(model, cfg.lora_r, cfg.lora_alpha, cfg.lora_target_modules)
    if cfg.torch_compile:  # in place: peft, accelerate and the merges keep calling the same module
        model.compile(backend=cfg.torch_compile_backend, dynamic=False)
    if cfg.method == "nft":
        snapshot_adapter(peft_model, OLD)
    if cfg.method == "dpo" and cfg.ref_update_steps:
        snapshot_adapter(peft_model, REF)
    policy = replace(loaded, model=peft_model)
    params = ([p for p in peft_model.parameters() if p.requires_grad] if not cfg.loraplus_lr_ratio
              else loraplus_groups(peft_model, cfg.learning_rate, cfg.loraplus_lr_ratio))
    optimizer, scheduler = optimizer_and_scheduler(cfg, params)
    configure_deepspeed(accelerator, B, cfg.max_grad_norm)
    model, optimizer, scheduler = accelerator.prepare(peft_model, optimizer, scheduler)

    start_round, step, reward_calls, elapsed = 0, 0, 0, 0.0
    if resume:
        with open(os.path.join(resume, "trainer_state.json")) as f:
            state = json.load(f)
        start_round, step, reward_calls, elapsed = state["round"], state["step"], state["reward_calls"], state["elapsed"]
        for name in (OLD, REF, EMA):
            if os.path.isdir(os.path.join(resume, name)):
                load_adapter_weights(peft_model, name, os.path.join(resume, name, name))
        accelerator.load_state(resume)
        accelerator.print(f"resumed from {resume} after round {start_round}")
    start_logging(accelerator, "flowalign-online", cfg)

    grid_cond = texts.text(texts.text_ids(grid))
    last_ckpt = resume
    bar = tqdm(range(start_round, cfg.rounds), initial=start_round, total=cfg.rounds, desc=f"online {cfg.method}",
               disable=not accelerator.is_local_main_process)
    for round_ in bar:
        t0 = time.time()
        # 1. sample a group of k per prompt from the policy (nft: the old adapter, its sampling policy)
        ids = round_prompts(len(pool), cfg.prompts_per_round, seed, round_, pool_weights)
        prompts, (context, pooled) = [pool[i] for i in ids.tolist()], texts.text(pool_rows[ids.numpy()])
        share = torch.arange(len(prompts)).tensor_split(world)[rank]
        model.eval()
        with merged(peft_model, OLD if cfg.method == "nft" else "default"):
            x0, traj = rollout(policy, peft_model, (context, pooled), share, cfg, round_)
        images = space.decode(x0).clamp(-1, 1)
        # 2. score (each process its share), gather in prompt order
        mine = [prompts[i] for i in share.repeat_interleave(cfg.k).tolist()]
        rewards = score(images, mine, f"round {round_ + 1}")
        # the checker's verdict on shapes-world prompts, whatever the reward (a sum or a soft score has no "correct")
        correct = torch.tensor(compositional.score(list(images), mine)["correct"], dtype=torch.float32) \
            if _is_split(cfg.prompts) else (rewards >= 1.0).float()
        x0, rewards = _gather(gather_object, x0), _gather(gather_object, rewards).view(len(prompts), cfg.k)
        correct = _gather(gather_object, correct)
        sample_time = time.time() - t0
        reward_calls += len(prompts) * cfg.k
        # 3. the method's training signal
        buf = {"x0": x0, "prompt": torch.arange(len(prompts)).repeat_interleave(cfg.k),
               "context": context, "pooled": pooled, "uncond": loaded.uncond}
        adv = group_advantages(rewards, global_std=cfg.global_std)
        zero_spread = float((rewards.std(1) == 0).float().mean())
        n_items = build_signal(buf, cfg, rewards, adv, traj, gather_object)
        metrics_sum: dict[str, float] = {}
        if n_items:
            with eager(cfg.torch_compile and not cfg.torch_compile_training):
                if cfg.method == "grpo":
                    buf["old_logp"] = old_logprobs(model, buf, n_items, cfg.steps_per_round, B * world,
                                                   slice(rank * B, (rank + 1) * B), seed * 7919 + round_, cfg.guidance)
                order = DataOrder(n_items, seed * 7919 + round_)
                model.train()
                use_ref = cfg.method == "dpo" and cfg.ref_update_steps > 0
                for s in range(cfg.steps_per_round):
                    idx = order.indices(s * B * world, B * world)
                    gen = step_generator(seed, step, 0)
                    with accelerator.accumulate(model):
                        loss, metrics = step_loss(model, peft_model, cfg, buf, idx, gen,
                                                  slice(rank * B, (rank + 1) * B), use_ref)
                        if ptx is not None:  # drawn after the method's draws: those stay the same with or without it
                            ptx_term = ptx_loss(model, ptx, texts, cfg, gen, world, rank)
                            loss = loss + cfg.ptx_weight * ptx_term
                            metrics = {**metrics, "loss": loss.detach(), "ptx_loss": ptx_term.detach()}
                        accelerator.backward(loss)
                        clip_and_step(accelerator, model, optimizer, cfg.max_grad_norm)
                    scheduler.step()
                    step += 1
                    for k, v in metrics.items():
                        metrics_sum[k] = metrics_sum.get(k, 0.0) + float(v) / cfg.steps_per_round
                    if use_ref and step % cfg.ref_update_steps == 0:
                        snapshot_adapter(peft_model, REF)
                    if cfg.ema_decay:
                        snapshot_adapter(peft_model, EMA, min((1 + step) / (10 + step), cfg.ema_decay))
                reduced = accelerator.reduce(torch.tensor(list(metrics_sum.values())), "mean")
                metrics_sum = dict(zip(metrics_sum, reduced.tolist()))
                check_finite(metrics_sum["loss"], step, last_ckpt)
        else:
            step += cfg.steps_per_round  # nothing to learn from this round: the schedule moves on
            for _ in range(cfg.steps_per_round):
                scheduler.step()
        if cfg.method == "nft":
            snapshot_adapter(peft_model, OLD, old_policy_decay(step, cfg.old_decay, cfg.old_decay_rate))
        elapsed += time.time() - t0
        logs = {"round/reward_mean": float(rewards.mean()), "round/accuracy": float(correct.mean()),
                "round/zero_spread_groups": zero_spread, "round/train_items": n_items,
                "round/images_per_s": len(prompts) * cfg.k / sample_time, "round/reward_calls": reward_calls,
                "round/elapsed_s": elapsed, "train/lr": scheduler.get_last_lr()[0],
                **{f"train/{k}": v for k, v in metrics_sum.items()}}
        done = round_ + 1
        accelerator.log(logs, step=done)
        append_log(cfg.output_dir, accelerator, {"round": done, "step": step, **logs})
        bar.set_postfix(reward=f"{logs['round/reward_mean']:.3f}", zero=f"{zero_spread:.2f}")
        if done % cfg.grid_rounds == 0 or done == cfg.rounds:
            with eager():  # 16 images: a compile of their own would cost more than it saves
                sample_grid(policy, grid_cond, cfg, accelerator, done)
        if done % cfg.save_rounds == 0 or done == cfg.rounds:
            last_ckpt = save_checkpoint(accelerator, cfg.output_dir, done, cfg.save_total_limit,
                                        {"round": done, "step": step, "reward_calls": reward_calls,
                                         "elapsed": elapsed}, lambda d: save_adapters(peft_model, d, (OLD, REF, EMA)))

    if cfg.ema_decay and EMA in peft_model.peft_config:  # the final adapter is the policy's EMA
        copy_adapter(peft_model, EMA, "default")
    save_adapter(accelerator, model, os.path.join(cfg.output_dir, "final"), cfg.base, base_sha,
                 {"online_config": asdict(cfg), "reward_calls": reward_calls, "train_seconds": elapsed})
    accelerator.end_training()


def eager(on: bool = True):
    """A block in which a compiled model runs its eager forward (torch.compiler.set_stance)."""
    return torch.compiler.set_stance("force_eager") if on else contextlib.nullcontext()


def build_signal(buf: dict, cfg: OnlineConfig, rewards, adv, traj, gather_object) -> int:
    """Fill `buf` with the method's training items; returns how many there are."""
    if cfg.method == "dpo":
        buf["pairs"] = dpo_pairs(rewards, cfg.pairs_per_group)
        return len(buf["pairs"][0])
    if cfg.method == "raft":
        keep = (rewards.flatten() >= cfg.raft_threshold).nonzero().flatten()
        buf["x0"], buf["prompt"] = buf["x0"][keep], buf["prompt"][keep]
        return len(keep)
    if cfg.method == "nft":
        buf["r"] = optimality_probability(adv.flatten(), cfg.adv_clip_max)
        return len(buf["r"])
    buf["adv"], buf["times"] = adv.flatten(), traj["times"]  # grpo
    buf["grpo"] = transition_items(traj, buf["adv"], lambda x: _gather(gather_object, x))
    return len(buf["grpo"]["sample"])


def _gather(gather_object, x: torch.Tensor) -> torch.Tensor:
    """Concatenate every process's rows in rank order (their prompt shares are contiguous)."""
    parts = gather_object([x])
    return torch.cat(parts) if len(parts) > 1 else parts[0]


@entry_point
def cli(argv):
    main(parse(OnlineConfig, argv))


if __name__ == "__main__":
    cli()
