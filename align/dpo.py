"""Diffusion-DPO of a pretrained MM-DiT through LoRA adapters, on preference pairs.

    python -m align.dpo --config configs/dpo/toy.yaml --base runs/toy/final --pairs runs/pairs \
        --output_dir runs/dpo
    accelerate launch --num_processes 2 --use_deepspeed --deepspeed_config_file configs/deepspeed/zero2.json \
        -m align.dpo --config configs/dpo/toy.yaml --base … --pairs … --output_dir …

The pairs are precomputed once (latents and one text embedding per distinct caption,
`base_model.precompute`) and read memory-mapped, one aspect bucket per global batch.
One step: B pairs [winners; losers] share noise and t (drawn from the DPO stage's own density,
shifted toward noise by default: layout is decided there); the reference errors come from the
same network with the adapter disabled, under no_grad; `align.loss.dpo_loss` combines them.
`--loss_type sft` trains on the winners alone: the control every DPO result is reported beside.

This trainer only trains on the pairs it is given. Online training (sample from the policy,
score, train, repeat) is `align.online --method dpo`.

Output: `output_dir/final/` holds the adapter in PEFT format, `flowalign_base.json` (base path and
SHA-256) and the base's `conditioning.json`; load it with `base_model.adapters.load_model`.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import SchedulerType

from base_model.adapters import BASE_RECORD, load, require_rf, weights_sha256
from base_model.cli import check_fields, check_types, parse
from base_model.cache import Cache, GlobalBatches, check_conditioning, is_cache, loader
from base_model.flow import DENSITIES, flow_loss, sample_t
from base_model.errors import InputError, entry_point
from base_model.outputs import atomic_folder
from base_model.precompute import PrecomputeConfig, check_source, precompute, up_to_date
from base_model.text import TextEmbedder
from base_model.training import (append_log, check_finite, check_run_folder, clip_and_step,
                                 configure_deepspeed, make_accelerator, make_run_folder, optimizer_and_scheduler,
                                 save_checkpoint, start_logging, step_generator)
from base_model.sampling import GUIDANCE, SOLVER, SOLVERS, STEPS
from base_model.shapes import save_grid

from .loss import LOSS_TYPES, dpo_loss
from .lora import DEFAULT_TARGETS, add_lora, quantize_base


@dataclass
class DPOConfig:
    base: str = ""  # pretrained checkpoint (config.json + model.safetensors [+ conditioning.json])
    pairs: str = ""  # Pick-a-Pic-schema pairs (save_to_disk / parquet / arrow), or their cache (base_model.precompute)
    cache_dir: str = ""  # where --pairs are precomputed on first use; "" → output_dir/data-cache
    aspect_buckets: bool = True  # precompute into aspect-ratio buckets (each pair takes jpg_0's)
    dataloader_num_workers: int = 2  # processes reading the cache ahead of the loop
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
    max_steps: int = 400
    per_device_train_batch_size: int = 32  # pairs
    gradient_accumulation_steps: int = 1
    max_grad_norm: float = 1.0
    mixed_precision: str = "no"
    # logging, samples, checkpoints
    output_dir: str = "runs/dpo"
    logging_steps: int = 25
    eval_steps: int = 200  # sample grid of fixed prompts and seeds
    save_steps: int = 200
    save_total_limit: int = 2
    sample_solver: str = SOLVER  # for the sample grids: "euler" or "midpoint"
    sample_steps: int = STEPS
    guidance: float = GUIDANCE
    num_samples: int = 16
    report_to: str = "wandb"
    resume_from_checkpoint: str = ""  # "latest" or a checkpoint folder
    overwrite_output_dir: bool = False  # replace a finished run in output_dir (as in transformers)
    seed: int = 0

    def __post_init__(self):
        check_types(self)
        choices = {"loss_type": LOSS_TYPES, "timestep_density": DENSITIES,
                   "base_quantization": ("none", "4bit", "8bit"), "optimizer": ("adamw", "adamw_8bit"),
                   "mixed_precision": ("no", "bf16"), "report_to": ("wandb", "none"),
                   "sample_solver": SOLVERS,
                   "lr_scheduler_type": tuple(t.value for t in SchedulerType)}
        check_fields(self, choices,
                     ("max_steps", "per_device_train_batch_size", "gradient_accumulation_steps", "lora_r"))


# ---------------------------------------------------------------------------------------------
# Data: pairs precomputed once (latents, one text row per distinct caption), read from the cache
# ---------------------------------------------------------------------------------------------


def pairs_cache(cfg: DPOConfig, cond: tuple, resolution: int, max_side: int, world: int):
    """(PrecomputeConfig that builds the pairs' cache, or None when --pairs is a cache; the cache's path).
    Buckets are those the base's position table covers (sides ≤ max_side px)."""
    if is_cache(cfg.pairs):
        return None, cfg.pairs
    out = os.path.join(cfg.cache_dir or os.path.join(cfg.output_dir, "data-cache"), "pairs")
    pcfg = PrecomputeConfig(pairs=cfg.pairs, text_encoders=list(cond[0]), image_space=cond[1], resolution=resolution,
                            aspect_buckets=cfg.aspect_buckets, max_side=max_side,
                            min_bucket=cfg.per_device_train_batch_size * world,
                            output=out, overwrite_output_dir=not cfg.cache_dir)
    return pcfg, out


def dpo_step_losses(model, peft_model, batch: dict, loss_type: str):
    """Per-sample policy and reference errors (2B,) on [winners; losers] with shared noise and t."""
    x = torch.cat([batch["chosen"], batch["rejected"]])
    noise, t = batch["noise"].repeat(2, 1, 1, 1), batch["t"].repeat(2)
    context, pooled = batch["context"].repeat(2, 1, 1), batch["pooled"].repeat(2, 1)
    if loss_type == "sft":  # winners only; the loser half is computed for its metric, without grad
        pol_w = flow_loss(model, batch["chosen"], batch["noise"], batch["t"], batch["context"], batch["pooled"])
        with torch.no_grad():
            pol_l = flow_loss(model, batch["rejected"], batch["noise"], batch["t"], batch["context"], batch["pooled"])
        return torch.cat([pol_w, pol_l]), None
    with torch.no_grad(), peft_model.disable_adapter():  # the reference: the base itself
        ref = flow_loss(model, x, noise, t, context, pooled)
    return flow_loss(model, x, noise, t, context, pooled), ref


# ---------------------------------------------------------------------------------------------
# Checkpoints: accelerate state + adapters + where we are, written atomically
# ---------------------------------------------------------------------------------------------


def save_adapter(peft_model, path: str, base: str, base_sha: str, extra: dict | None = None):
    """PEFT adapter + the base it applies to (path, SHA-256) + the base's conditioning, atomically."""
    with atomic_folder(path) as tmp:
        peft_model.save_pretrained(tmp, selected_adapters=["default"])
        with open(os.path.join(tmp, BASE_RECORD), "w") as f:
            json.dump({"base": os.path.abspath(base), "sha256": base_sha, **(extra or {})}, f, indent=2)
        cond = os.path.join(base, "conditioning.json")
        if os.path.isfile(cond):
            shutil.copy(cond, os.path.join(tmp, "conditioning.json"))


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------


def main(cfg: DPOConfig):
    from accelerate.utils import set_seed

    if not cfg.base or not cfg.pairs:
        raise InputError("--base CHECKPOINT and --pairs DIR are required")
    if "+" in cfg.base:
        raise InputError("--base must be a checkpoint or an SD3 folder; merge an adapter first "
                         "(python -m base_model.adapters merge)")
    B, accum, seed = cfg.per_device_train_batch_size, cfg.gradient_accumulation_steps, cfg.seed
    resume = check_run_folder(cfg)  # before anything is written or loaded
    # Frozen encoders load before the Accelerator (ZeRO-3 would partition them), and the text
    # encoders only when the pairs' cache is still to be built: the loop reads embeddings from it.
    loaded = require_rf(load(cfg.base, text_encoders=False))
    model = loaded.model.train()
    cond = loaded.encoders
    pcfg, cache_path = pairs_cache(cfg, cond, loaded.resolution, loaded.max_side, int(os.environ.get("WORLD_SIZE", "1")))
    if pcfg is not None:
        check_source(pcfg)  # bad pairs stop here, with nothing written
        if not up_to_date(pcfg, cond) and loaded.text is None:
            loaded = replace(loaded, text=TextEmbedder(cond[0]))
    accelerator = make_accelerator(cfg.output_dir, cfg.report_to, cfg.mixed_precision, accum)
    set_seed(seed)
    world, rank = accelerator.num_processes, accelerator.process_index
    make_run_folder(accelerator, cfg, resume)
    if pcfg is not None:
        precompute(pcfg, rank, world, accelerator.wait_for_everyone, loaded.text, loaded.space, cond)
    loaded = replace(loaded, text=None)  # the loop reads embeddings from the cache
    pairs = Cache(cache_path)
    check_conditioning(cache_path, pairs.manifest, cond[0], cond[1])
    if pairs.kind != "pairs":
        raise InputError(f"--pairs {cache_path!r} is a cache of images, not of pairs")

    base_sha = weights_sha256(cfg.base)
    dropped = pairs.manifest["dropped"]
    accelerator.print(f"{len(pairs)} pairs from {cfg.pairs}; dropped {dropped}")
    if cfg.base_quantization != "none":
        quantize_base(model, int(cfg.base_quantization[0]))
    model.requires_grad_(False)
    model.gradient_checkpointing = cfg.gradient_checkpointing
    peft_model = add_lora(model, cfg.lora_r, cfg.lora_alpha, cfg.lora_target_modules, cfg.lora_dropout)
    policy = replace(loaded, model=peft_model)  # samples the grids from the current policy
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    accelerator.print(f"LoRA r={cfg.lora_r}: {trainable / 1e3:.1f}k trainable parameters of "
                      f"{sum(p.numel() for p in peft_model.parameters()) / 1e6:.2f}M")

    optimizer, scheduler = optimizer_and_scheduler(cfg, [p for p in peft_model.parameters() if p.requires_grad])
    configure_deepspeed(accelerator, B, cfg.max_grad_norm)
    model, optimizer, scheduler = accelerator.prepare(peft_model, optimizer, scheduler)

    start = 0
    if resume:
        with open(os.path.join(resume, "trainer_state.json")) as f:
            start = json.load(f)["step"]
        accelerator.load_state(resume)
        accelerator.print(f"resumed from {resume} at step {start}")
    start_logging(accelerator, "flowalign-dpo", cfg)

    first = pairs.text_rows(np.arange(min(len(pairs), 64 * cfg.num_samples)))
    grid_cond = pairs.text(np.array(list(dict.fromkeys(first.tolist()))[:cfg.num_samples]))  # distinct captions
    if start == 0:
        sample_grid(policy, grid_cond, cfg, accelerator, 0)
    n_global, mine = B * world, slice(rank * B, (rank + 1) * B)
    batches = GlobalBatches(pairs.buckets(), n_global, seed, cache_path)  # batch k: a function of (seed, k)
    data = iter(loader(pairs, batches, rank, world, start * accum, cfg.max_steps * accum, cfg.dataloader_num_workers))
    history, last_ckpt, t0 = [], resume, time.time()
    bar = tqdm(range(start, cfg.max_steps), initial=start, total=cfg.max_steps, desc="dpo",
               disable=not accelerator.is_local_main_process)
    for step in bar:
        model.train()
        metrics_sum: dict[str, float] = {}
        for micro in range(accum):
            read = next(data)  # this process's slice of global batch step·accum + micro, one bucket
            gen = step_generator(seed, step, micro)
            t = sample_t(n_global, cfg.timestep_density, cfg.logit_mean, cfg.logit_std, cfg.mode_scale,
                         cfg.shift, generator=gen)[mine]
            noise = torch.randn((n_global, *pairs.shape(int(read["bucket"]))), generator=gen)[mine]
            batch = {k: v.to(accelerator.device) for k, v in dict(
                chosen=read["chosen"], rejected=read["rejected"], noise=noise, t=t,
                context=read["context"], pooled=read["pooled"]).items()}
            with accelerator.accumulate(model):
                pol_err, ref_err = dpo_step_losses(model, peft_model, batch, cfg.loss_type)
                loss, metrics = dpo_loss(pol_err, ref_err, cfg.beta, cfg.loss_type, cfg.sft_weight)
                accelerator.backward(loss)
                clip_and_step(accelerator, model, optimizer, cfg.max_grad_norm)
            for k, v in metrics.items():
                metrics_sum[k] = metrics_sum.get(k, 0.0) + float(v) / accum
        scheduler.step()
        reduced = accelerator.reduce(torch.tensor(list(metrics_sum.values()), device=accelerator.device), "mean")
        metrics_step = dict(zip(metrics_sum, reduced.tolist()))
        check_finite(metrics_step["loss"], step + 1, last_ckpt)
        history.append(metrics_step)
        done = step + 1
        if done % cfg.logging_steps == 0 or done == cfg.max_steps:
            logs = {f"train/{k}": sum(h[k] for h in history) / len(history) for k in history[0]}
            logs["train/lr"] = scheduler.get_last_lr()[0]
            logs["train/pairs_per_s"] = len(history) * n_global * accum / (time.time() - t0)
            bar.set_postfix(loss=f"{logs['train/loss']:.4f}", **({"acc": f"{logs['train/rewards/accuracies']:.2f}"}
                                                                 if "train/rewards/accuracies" in logs else {}))
            accelerator.log(logs, step=done)
            append_log(cfg.output_dir, accelerator, {"step": done, **logs})
            history, t0 = [], time.time()
        if done % cfg.eval_steps == 0 or done == cfg.max_steps:
            sample_grid(policy, grid_cond, cfg, accelerator, done)
        if done % cfg.save_steps == 0 or done == cfg.max_steps:
            last_ckpt = save_checkpoint(accelerator, cfg.output_dir, done, cfg.save_total_limit, {"step": done})

    if accelerator.is_main_process:
        final = os.path.join(cfg.output_dir, "final")
        save_adapter(accelerator.unwrap_model(model), final, cfg.base, base_sha,
                     {"dpo_config": asdict(cfg), "pairs_dropped": dropped})
        accelerator.print(f"adapter: {final}")
    accelerator.wait_for_everyone()
    accelerator.end_training()


def sample_grid(policy, grid_cond, cfg, accelerator, step: int):
    """Fixed prompts and seeds, so grids before and during training compare image for image."""
    if not accelerator.is_main_process:
        return
    policy.model.eval()
    images = policy.generate(None, range(len(grid_cond[0])), cfg.sample_steps, cfg.guidance, progress=False,
                             context=grid_cond, solver=cfg.sample_solver)
    os.makedirs(os.path.join(cfg.output_dir, "samples"), exist_ok=True)
    save_grid(images, os.path.join(cfg.output_dir, "samples", f"step-{step:06d}.png"))
    policy.model.train()


@entry_point
def cli(argv):
    main(parse(DPOConfig, argv))


if __name__ == "__main__":
    cli()
