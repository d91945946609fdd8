"""Diffusion-DPO of a pretrained MM-DiT through LoRA adapters, on preference pairs.

    python -m align.dpo --config configs/dpo/toy.yaml --base runs/toy/final --pairs runs/pairs \
        --output_dir runs/dpo
    accelerate launch --num_processes 2 --use_deepspeed --deepspeed_config_file configs/deepspeed/zero2.json \
        -m align.dpo --config configs/dpo/toy.yaml --base … --pairs … --output_dir …

One step: B pairs [winners; losers] share noise and t (drawn from the DPO stage's own density,
shifted toward noise by default: layout is decided there); the reference errors come from the
same network with the adapter disabled, under no_grad; `align.loss.dpo_loss` combines them.
`--loss_type sft` trains on the winners alone: the control every DPO result is reported beside.

Online rounds (`--rounds N`): after each round, new on-policy pairs are sampled from the current
policy and scored; the reference moves to the policy (`--ref_update policy`, a frozen copy of
the adapter) or stays the base (`fixed`). Round 1 uses `--pairs`.

Output: `output_dir/final/` holds the adapter in PEFT format, `flowalign_base.json` (base path and
SHA-256) and the base's `conditioning.json`; load it with `base_model.adapters.load_model`.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace

import torch
from tqdm.auto import tqdm
from transformers import SchedulerType

from base_model.adapters import BASE_RECORD, load, weights_sha256
from base_model.cli import check_types, parse
from base_model.data import to_model_space
from base_model.flow import DENSITIES, flow_loss, sample_t
from base_model.pretrain import (DataOrder, _append_log, cpu_process_group, latest_checkpoint,
                                 optimizer_and_scheduler, save_checkpoint, step_generator)
from base_model.sampling import GUIDANCE, SOLVER, SOLVERS, STEPS
from base_model.shapes import save_grid

from .loss import LOSS_TYPES, dpo_loss
from .lora import DEFAULT_TARGETS, REF, add_lora, freeze_reference, quantize_base
from .pairs import Pairs, load_pairs, on_policy_pairs, prompts_from, write_pairs


@dataclass
class DPOConfig:
    base: str = ""  # pretrained checkpoint (config.json + model.safetensors [+ conditioning.json])
    pairs: str = ""  # Pick-a-Pic-schema pairs: save_to_disk / parquet / arrow folder
    # loss (TRL's names)
    loss_type: str = "sigmoid"  # "sigmoid", "hinge", "ipo", or "sft" (winners only: the control)
    beta: float = 500.0  # flow_grpo uses 100 on SD3.5's velocity loss, Diffusion-DPO 2500–5000 (ε)
    sft_weight: float = 0.0  # λ·mean(e_θ^w) added to DPO; must be on β's scale to matter
    timestep_density: str = "logit_normal"  # the DPO stage's own: shifted toward noise
    logit_mean: float = 1.5
    logit_std: float = 1.0
    mode_scale: float = 1.29
    shift: float = 1.0
    # adapters and memory
    lora_r: int = 16
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    lora_target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    base_quantization: str = "none"  # "none", "4bit" (NF4, QLoRA-style) or "8bit" via bitsandbytes
    gradient_checkpointing: bool = False
    # optimisation
    optimizer: str = "adamw"  # "adamw" or "adamw_8bit"
    learning_rate: float = 1e-3
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    weight_decay: float = 0.0
    lr_scheduler_type: str = "constant_with_warmup"
    warmup_steps: int = 0
    max_steps: int = 400  # in total, split evenly over rounds
    per_device_train_batch_size: int = 32  # pairs
    gradient_accumulation_steps: int = 1
    max_grad_norm: float = 1.0
    mixed_precision: str = "no"
    # online rounds
    rounds: int = 1
    ref_update: str = "policy"  # "policy": the reference moves to the policy each round; "fixed": the base
    round_prompts: str = "train"  # prompts of the on-policy rounds: a shapes split or a text file
    round_n_prompts: int = 400
    round_k: int = 8
    reward: str = "compositional"
    pair_rule: str = "threshold"
    pair_threshold: float = 1.0
    max_pairs_per_prompt: int = 3
    # logging, samples, checkpoints
    output_dir: str = "runs/dpo"
    logging_steps: int = 25
    eval_steps: int = 200  # sample grid of fixed prompts and seeds
    save_steps: int = 200
    save_total_limit: int = 2
    sample_solver: str = SOLVER  # for the grids and online rounds: "euler" or "midpoint"
    sample_steps: int = STEPS
    guidance: float = GUIDANCE
    num_samples: int = 16
    report_to: str = "wandb"
    resume_from_checkpoint: str = ""
    seed: int = 0

    def __post_init__(self):
        check_types(self)
        choices = {"loss_type": LOSS_TYPES, "timestep_density": DENSITIES,
                   "base_quantization": ("none", "4bit", "8bit"), "optimizer": ("adamw", "adamw_8bit"),
                   "mixed_precision": ("no", "bf16"), "ref_update": ("policy", "fixed"),
                   "pair_rule": ("threshold", "best_worst"), "report_to": ("wandb", "none"),
                   "sample_solver": SOLVERS,
                   "lr_scheduler_type": tuple(t.value for t in SchedulerType)}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"--{name} {getattr(self, name)!r}: choose from {list(allowed)}")
        for name in ("max_steps", "per_device_train_batch_size", "gradient_accumulation_steps", "rounds", "lora_r"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be ≥ 1")
        if self.max_steps < self.rounds:
            raise ValueError("--max_steps must be at least --rounds (steps are split over rounds)")


# ---------------------------------------------------------------------------------------------
# Data: pairs → model space, captions → text embeddings (once per distinct caption)
# ---------------------------------------------------------------------------------------------


def encode_pairs(pairs: Pairs, text, vae) -> dict:
    captions = sorted(set(pairs.captions))
    context, pooled = text.encode(captions)
    index = {c: i for i, c in enumerate(captions)}
    return dict(context=context, pooled=pooled, ids=torch.tensor([index[c] for c in pairs.captions]),
                chosen=vae.encode(to_model_space(pairs.chosen)), rejected=vae.encode(to_model_space(pairs.rejected)))


def reference_context(model, round_: int, cfg: DPOConfig):
    """The reference network: the same model with the adapter disabled (round 1, or a fixed
    reference), else with the frozen copy of the previous round's adapter."""
    if round_ == 0 or cfg.ref_update == "fixed":
        return model.disable_adapter()
    return _adapter(model, REF)


@contextmanager
def _adapter(peft_model, name: str):
    """Run with adapter `name` active; peft's set_adapter also moves requires_grad to it and back."""
    peft_model.base_model.set_adapter(name)
    try:
        yield
    finally:
        peft_model.base_model.set_adapter("default")


def dpo_step_losses(model, peft_model, batch: dict, cfg: DPOConfig, round_: int):
    """Per-sample policy and reference errors (2B,) on [winners; losers] with shared noise and t."""
    x = torch.cat([batch["chosen"], batch["rejected"]])
    noise, t = batch["noise"].repeat(2, 1, 1, 1), batch["t"].repeat(2)
    context, pooled = batch["context"].repeat(2, 1, 1), batch["pooled"].repeat(2, 1)
    if cfg.loss_type == "sft":  # winners only; the loser half is computed for its metric, without grad
        pol_w = flow_loss(model, batch["chosen"], batch["noise"], batch["t"], batch["context"], batch["pooled"])
        with torch.no_grad():
            pol_l = flow_loss(model, batch["rejected"], batch["noise"], batch["t"], batch["context"], batch["pooled"])
        return torch.cat([pol_w, pol_l]), None
    with torch.no_grad(), reference_context(peft_model, round_, cfg):
        ref = flow_loss(model, x, noise, t, context, pooled)
    return flow_loss(model, x, noise, t, context, pooled), ref


# ---------------------------------------------------------------------------------------------
# Checkpoints: accelerate state + adapters + where we are, written atomically
# ---------------------------------------------------------------------------------------------


def save_adapter(peft_model, path: str, cfg: DPOConfig, base_sha: str, extra: dict | None = None):
    """PEFT adapter + the base it applies to (path, SHA-256) + the base's conditioning, atomically."""
    tmp = path.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    peft_model.save_pretrained(tmp, selected_adapters=["default"])
    with open(os.path.join(tmp, BASE_RECORD), "w") as f:
        json.dump({"base": os.path.abspath(cfg.base), "sha256": base_sha, "dpo_config": asdict(cfg),
                   **(extra or {})}, f, indent=2)
    cond = os.path.join(cfg.base, "conditioning.json")
    if os.path.isfile(cond):
        shutil.copy(cond, os.path.join(tmp, "conditioning.json"))
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------


def main(cfg: DPOConfig):
    from accelerate import Accelerator
    from accelerate.utils import gather_object, set_seed


    if not cfg.base or not cfg.pairs:
        raise ValueError("--base CHECKPOINT and --pairs DIR are required")
    if "+" in cfg.base:
        raise ValueError("--base must be a checkpoint or an SD3 folder; merge an adapter first "
                         "(python -m base_model.adapters merge)")
    # Frozen text encoders and VAE load before the Accelerator (ZeRO-3 would partition them).
    gen = load(cfg.base)
    text, vae, model = gen.text, gen.space, gen.model.train()
    if cfg.report_to == "wandb" and not os.environ.get("WANDB_API_KEY"):
        os.environ.setdefault("WANDB_MODE", "offline")
    accelerator = Accelerator(gradient_accumulation_steps=cfg.gradient_accumulation_steps,
                              mixed_precision=cfg.mixed_precision, project_dir=cfg.output_dir,
                              log_with=None if cfg.report_to == "none" else cfg.report_to,
                              kwargs_handlers=cpu_process_group(), step_scheduler_with_optimizer=False)
    set_seed(cfg.seed)
    world, rank = accelerator.num_processes, accelerator.process_index
    B, accum = cfg.per_device_train_batch_size, cfg.gradient_accumulation_steps
    os.makedirs(cfg.output_dir, exist_ok=True)

    base_sha = weights_sha256(cfg.base)
    resolution = gen.resolution
    pairs = load_pairs(cfg.pairs, resolution)
    accelerator.print(f"{len(pairs)} pairs from {cfg.pairs}; dropped {pairs.dropped}")
    if cfg.base_quantization != "none":
        quantize_base(model, int(cfg.base_quantization[0]))
    model.requires_grad_(False)
    model.gradient_checkpointing = cfg.gradient_checkpointing
    peft_model = add_lora(model, cfg.lora_r, cfg.lora_alpha, cfg.lora_target_modules, cfg.lora_dropout)
    policy = replace(gen, model=peft_model)  # samples grids and online pairs from the current policy
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    accelerator.print(f"LoRA r={cfg.lora_r}: {trainable / 1e3:.1f}k trainable parameters of "
                      f"{sum(p.numel() for p in peft_model.parameters()) / 1e6:.2f}M")

    optimizer, scheduler = optimizer_and_scheduler(cfg, [p for p in peft_model.parameters() if p.requires_grad])
    if accelerator.state.deepspeed_plugin is not None:
        ds = accelerator.state.deepspeed_plugin.deepspeed_config
        ds["train_micro_batch_size_per_gpu"] = B
        ds["gradient_clipping"] = cfg.max_grad_norm
    model, optimizer, scheduler = accelerator.prepare(peft_model, optimizer, scheduler)

    start, round_ = 0, 0
    resume = latest_checkpoint(cfg.output_dir) if cfg.resume_from_checkpoint == "latest" else cfg.resume_from_checkpoint
    if resume:
        with open(os.path.join(resume, "trainer_state.json")) as f:
            state = json.load(f)
        start, round_ = state["step"], state["round"]
        if os.path.isdir(os.path.join(resume, "ref_adapter")):
            _load_reference(peft_model, os.path.join(resume, "ref_adapter", REF))
        accelerator.load_state(resume)
        accelerator.print(f"resumed from {resume} at step {start} (round {round_ + 1})")
    if cfg.report_to != "none":
        accelerator.init_trackers("flowalign-dpo", config=asdict(cfg))
    if accelerator.is_main_process:
        with open(os.path.join(cfg.output_dir, "config.json"), "w") as f:
            json.dump(asdict(cfg), f, indent=2)

    prompts = [c for c in dict.fromkeys(pairs.captions)][:cfg.num_samples]
    grid_cond = text.encode(prompts)
    if start == 0:
        sample_grid(policy, grid_cond, cfg, accelerator, 0)
    steps_per_round = cfg.max_steps // cfg.rounds
    history, last_ckpt, t0 = [], resume or None, time.time()
    bar = tqdm(range(start, cfg.max_steps), initial=start, total=cfg.max_steps, desc="dpo",
               disable=not accelerator.is_local_main_process)
    data = None
    for step in bar:
        r = min(step // steps_per_round, cfg.rounds - 1)
        if data is None or r != round_:
            if r != round_:  # a new online round: the reference moves, new pairs from the policy
                round_ = r
                if cfg.ref_update == "policy":
                    freeze_reference(peft_model)
                pairs = round_pairs(policy, cfg, round_, accelerator, gather_object)
                accelerator.print(f"round {round_ + 1}: {len(pairs)} on-policy pairs")
            elif round_ > 0:  # resumed inside an online round: its pairs are on disk
                pairs = load_pairs(os.path.join(cfg.output_dir, f"round-{round_ + 1}", "pairs"), resolution)
            data = encode_pairs(pairs, text, vae)
            order = DataOrder(len(pairs), cfg.seed + round_)
        model.train()
        metrics_sum: dict[str, float] = {}
        for micro in range(accum):
            gen = step_generator(cfg.seed, step, micro)
            n_global, mine = B * world, slice(rank * B, (rank + 1) * B)
            idx = order.indices((step * accum + micro) * n_global, n_global)[mine]
            t = sample_t(n_global, cfg.timestep_density, cfg.logit_mean, cfg.logit_std, cfg.mode_scale,
                         cfg.shift, generator=gen)[mine]
            noise = torch.randn((n_global, *data["chosen"].shape[1:]), generator=gen)[mine]
            ids = data["ids"][idx]
            batch = {k: v.to(accelerator.device) for k, v in dict(
                chosen=data["chosen"][idx], rejected=data["rejected"][idx], noise=noise, t=t,
                context=data["context"][ids], pooled=data["pooled"][ids]).items()}
            with accelerator.accumulate(model):
                pol_err, ref_err = dpo_step_losses(model, peft_model, batch, cfg, round_)
                loss, metrics = dpo_loss(pol_err, ref_err, cfg.beta, cfg.loss_type, cfg.sft_weight)
                accelerator.backward(loss)
                if accelerator.sync_gradients and accelerator.state.deepspeed_plugin is None:
                    accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            for k, v in metrics.items():
                metrics_sum[k] = metrics_sum.get(k, 0.0) + float(v) / accum
        scheduler.step()
        reduced = accelerator.reduce(torch.tensor(list(metrics_sum.values()), device=accelerator.device), "mean")
        metrics_step = dict(zip(metrics_sum, reduced.tolist()))
        if not math.isfinite(metrics_step["loss"]):
            raise FloatingPointError(f"loss is {metrics_step['loss']} at step {step + 1}; stopping. "
                                     f"Last good checkpoint: {last_ckpt or 'none'}")
        history.append(metrics_step)
        done = step + 1
        if done % cfg.logging_steps == 0 or done == cfg.max_steps:
            logs = {f"train/{k}": sum(h[k] for h in history) / len(history) for k in history[0]}
            logs["train/lr"] = scheduler.get_last_lr()[0]
            logs["train/pairs_per_s"] = len(history) * B * world * accum / (time.time() - t0)
            bar.set_postfix(loss=f"{logs['train/loss']:.4f}", **({"acc": f"{logs['train/rewards/accuracies']:.2f}"}
                                                                 if "train/rewards/accuracies" in logs else {}))
            accelerator.log(logs, step=done)
            _append_log(cfg.output_dir, accelerator, {"step": done, "round": round_ + 1, **logs})
            history, t0 = [], time.time()
        if done % cfg.eval_steps == 0 or done == cfg.max_steps:
            sample_grid(policy, grid_cond, cfg, accelerator, done)
        if done % cfg.save_steps == 0 or done == cfg.max_steps:
            write_ref = None if REF not in peft_model.peft_config else (
                lambda d: peft_model.save_pretrained(os.path.join(d, "ref_adapter"), selected_adapters=[REF]))
            last_ckpt = save_checkpoint(accelerator, cfg.output_dir, done, cfg.save_total_limit,
                                        {"step": done, "round": round_}, write_ref)

    if accelerator.is_main_process:
        final = os.path.join(cfg.output_dir, "final")
        save_adapter(accelerator.unwrap_model(model), final, cfg, base_sha, {"pairs_dropped": pairs.dropped})
        accelerator.print(f"adapter: {final}")
    accelerator.wait_for_everyone()
    accelerator.end_training()


def _load_reference(peft_model, path: str):
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    if REF not in peft_model.peft_config:
        peft_model.add_adapter(REF, peft_model.peft_config["default"])
    set_peft_model_state_dict(peft_model, load_file(os.path.join(path, "adapter_model.safetensors")), adapter_name=REF)
    for name, p in peft_model.named_parameters():
        if f".{REF}." in name:
            p.requires_grad_(False)
    peft_model.set_adapter("default")


def round_pairs(policy, cfg: DPOConfig, round_: int, accelerator, gather_object) -> Pairs:
    """On-policy pairs from the current policy: each process samples its share of the prompts;
    the rows are gathered, written to `output_dir/round-R/pairs` and loaded back."""
    prompts = prompts_from(cfg.round_prompts, cfg.round_n_prompts, seed_offset=round_ * cfg.round_n_prompts)
    mine = prompts[accelerator.process_index::accelerator.num_processes]
    policy.model.eval()
    rows, info = on_policy_pairs(policy, mine, cfg.round_k, cfg.reward, cfg.pair_rule, cfg.pair_threshold, 0.0,
                                 cfg.max_pairs_per_prompt, cfg.sample_steps, cfg.guidance,
                                 seed=10_000_000 * (round_ + 1) + 1_000_000 * accelerator.process_index,
                                 model_name=f"round-{round_}", solver=cfg.sample_solver)
    policy.model.train()
    rows = gather_object(rows)
    path = os.path.join(cfg.output_dir, f"round-{round_ + 1}", "pairs")
    if accelerator.is_main_process:
        if not rows:
            raise RuntimeError(f"round {round_ + 1}: no prompt gave a winner and a loser ({info['summary']})")
        write_pairs(rows, path, {"summary": {**info["summary"], "pairs": len(rows)}})
    accelerator.wait_for_everyone()
    return load_pairs(path, policy.resolution)


def sample_grid(policy, grid_cond, cfg: DPOConfig, accelerator, step: int):
    """Fixed prompts and seeds, so grids before and during training compare image for image."""
    if not accelerator.is_main_process:
        return
    policy.model.eval()
    images = policy.generate(None, range(len(grid_cond[0])), cfg.sample_steps, cfg.guidance, progress=False,
                             context=grid_cond, solver=cfg.sample_solver)
    os.makedirs(os.path.join(cfg.output_dir, "samples"), exist_ok=True)
    save_grid(images, os.path.join(cfg.output_dir, "samples", f"step-{step:06d}.png"))
    policy.model.train()


if __name__ == "__main__":
    main(parse(DPOConfig))
