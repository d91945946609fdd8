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

from base_model.adapters import BASE_RECORD, load, require_rf, weights_sha256
from base_model.cli import check_fields, parse
from base_model.cache import Cache, check_conditioning, is_cache
from base_model.flow import flow_loss
from base_model.errors import InputError, entry_point
from base_model.outputs import atomic_folder
from base_model.precompute import PrecomputeConfig, pending
from base_model.training import (TrainConfig, add_metrics, check_run_folder, clip_and_step, draw_t_noise, due,
                                 end_step, global_rows, launched_world, log_train, prepare, progress, read_batches,
                                 resume_state, save_checkpoint, start_logging, start_run)
from base_model.shapes import save_grid

from .loss import LOSS_TYPES, dpo_loss
from .lora import DEFAULT_TARGETS, add_lora, quantize_base


@dataclass
class DPOConfig(TrainConfig):
    """DPO's fields; the optimisation, logging and checkpoint fields are `TrainConfig`'s."""
    base: str = ""  # pretrained checkpoint (config.json + model.safetensors [+ conditioning.json])
    pairs: str = ""  # Pick-a-Pic-schema pairs (save_to_disk / parquet / arrow), or their cache (base_model.precompute)
    # loss (TRL's names)
    loss_type: str = "sigmoid"  # "sigmoid", "hinge", "ipo", or "sft" (winners only: the control)
    beta: float = 500.0  # flow_grpo uses 100 on SD3.5's velocity loss, Diffusion-DPO 2500–5000 (ε)
    sft_weight: float = 0.0  # λ·mean(e_θ^w) added to DPO; must be on β's scale to matter
    logit_mean: float = 1.5  # the DPO stage's own timestep density: shifted toward noise
    # adapters and memory
    lora_r: int = 16
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    lora_target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    base_quantization: str = "none"  # "none", "4bit" (NF4, QLoRA-style) or "8bit" via bitsandbytes
    gradient_checkpointing: bool = False
    # TrainConfig's fields with DPO's defaults
    per_device_train_batch_size: int = 32  # pairs
    output_dir: str = "runs/dpo"
    eval_steps: int = 200  # sample grid of fixed prompts and seeds

    def __post_init__(self):
        super().__post_init__()
        check_fields(self, {"loss_type": LOSS_TYPES, "base_quantization": ("none", "4bit", "8bit")}, ("lora_r",))
        if not self.base or not self.pairs:
            raise InputError("--base CHECKPOINT and --pairs DIR are required")
        if "+" in self.base:
            raise InputError("--base must be a checkpoint or an SD3 folder; merge an adapter first "
                             "(python -m base_model.adapters merge)")


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


def save_adapter(accelerator, model, path: str, base: str, base_sha: str, extra: dict | None = None):
    """PEFT adapter + the base it applies to (path, SHA-256) + the base's conditioning, atomically.
    Every process calls it: under ZeRO-3 each holds a shard of every parameter, and
    `accelerator.get_state_dict` gathers them (accelerate's recipe); the main process writes."""
    state = accelerator.get_state_dict(model)  # every process takes part under ZeRO-3
    if accelerator.is_main_process:
        with atomic_folder(path) as tmp:
            accelerator.unwrap_model(model).save_pretrained(tmp, selected_adapters=["default"], state_dict=state)
            with open(os.path.join(tmp, BASE_RECORD), "w") as f:
                json.dump({"base": os.path.abspath(base), "sha256": base_sha, **(extra or {})}, f, indent=2)
            cond = os.path.join(base, "conditioning.json")
            if os.path.isfile(cond):
                shutil.copy(cond, os.path.join(tmp, "conditioning.json"))
        accelerator.print(f"adapter: {path}")
    accelerator.wait_for_everyone()


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------


def main(cfg: DPOConfig):
    B, accum = cfg.per_device_train_batch_size, cfg.gradient_accumulation_steps
    resume = check_run_folder(cfg)  # before anything is written or loaded
    # The base loads before the Accelerator (under ZeRO-3 it would partition the frozen weights at load),
    # the text encoders only when the pairs' cache is still to be built: the loop reads embeddings from it.
    loaded = require_rf(load(cfg.base, text_encoders=False))
    cond = loaded.encoders
    pcfg, cache_path = pairs_cache(cfg, cond, loaded.resolution, loaded.max_side, launched_world())
    build = pending([pcfg], cond)  # bad pairs stop here, with nothing written
    accelerator = start_run(cfg, resume, build, cond, loaded.text, loaded.space)
    pairs = open_pairs(cache_path, cond)
    base_sha, dropped = weights_sha256(cfg.base), pairs.manifest["dropped"]
    accelerator.print(f"{len(pairs)} pairs from {cfg.pairs}; dropped {dropped}")
    peft_model = lora_policy(loaded.model.train(), cfg.base_quantization, cfg.gradient_checkpointing, cfg.lora_r,
                             cfg.lora_alpha, cfg.lora_target_modules, cfg.lora_dropout, accelerator.print)
    policy = replace(loaded, model=peft_model, text=None)  # samples the grids from the current policy
    model, optimizer, scheduler = prepare(accelerator, cfg, peft_model)  # trains the adapter alone
    start = resume_state(accelerator, resume).get("step", 0)
    start_logging(accelerator, "flowalign-dpo", cfg)

    grid_cond = grid_conditioning(pairs, cfg.num_samples)
    if start == 0:
        sample_grid(policy, grid_cond, cfg, accelerator, 0)
    n_global, mine = global_rows(accelerator, B)
    data = read_batches(pairs, pairs.buckets(), cfg, accelerator, start)
    history, last_ckpt, t0 = [], resume, time.time()
    bar = progress(accelerator, start, cfg.max_steps, "dpo")
    for step in bar:
        model.train()
        sums: dict[str, float] = {}
        for micro in range(accum):
            read = next(data)  # this process's slice of global batch step·accum + micro, one bucket
            t, noise, _ = draw_t_noise(cfg, step, micro, n_global, pairs.shape(int(read["bucket"])), mine)
            batch = {k: v.to(accelerator.device) for k, v in dict(
                chosen=read["chosen"], rejected=read["rejected"], noise=noise, t=t,
                context=read["context"], pooled=read["pooled"]).items()}
            with accelerator.accumulate(model):
                pol_err, ref_err = dpo_step_losses(model, peft_model, batch, cfg.loss_type)
                loss, metrics = dpo_loss(pol_err, ref_err, cfg.beta, cfg.loss_type, cfg.sft_weight)
                accelerator.backward(loss)
                clip_and_step(accelerator, model, optimizer, cfg.max_grad_norm)
            add_metrics(sums, metrics, accum)
        history.append(end_step(accelerator, scheduler, sums, step + 1, last_ckpt))  # NaN stop
        done = step + 1
        if due(done, cfg.logging_steps, cfg.max_steps):
            log_train(accelerator, cfg.output_dir, history, done, scheduler.get_last_lr()[0], time.time() - t0,
                      n_global * accum, "pairs", bar)
            history, t0 = [], time.time()
        if due(done, cfg.eval_steps, cfg.max_steps):
            sample_grid(policy, grid_cond, cfg, accelerator, done)
        if due(done, cfg.save_steps, cfg.max_steps):
            last_ckpt = save_checkpoint(accelerator, cfg.output_dir, done, cfg.save_total_limit, {"step": done})

    save_adapter(accelerator, model, os.path.join(cfg.output_dir, "final"), cfg.base, base_sha,
                 {"dpo_config": asdict(cfg), "pairs_dropped": dropped})
    accelerator.end_training()


def open_pairs(path: str, cond: tuple) -> Cache:
    """The pairs' cache, checked: made by the base's encoders, and of pairs."""
    pairs = Cache(path)
    check_conditioning(path, pairs.manifest, cond[0], cond[1])
    if pairs.kind != "pairs":
        raise InputError(f"--pairs {path!r} is a cache of images, not of pairs")
    return pairs


def lora_policy(model, quantization: str, checkpointing: bool, r: int, alpha: int, targets: list[str],
                dropout: float, print_fn=print):
    """The frozen base (optionally quantized) with a trainable LoRA adapter: a PeftModel."""
    if quantization != "none":
        quantize_base(model, int(quantization[0]))
    model.requires_grad_(False)
    model.gradient_checkpointing = checkpointing
    peft_model = add_lora(model, r, alpha, targets, dropout)
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    print_fn(f"LoRA r={r}: {trainable / 1e3:.1f}k trainable parameters of "
             f"{sum(p.numel() for p in peft_model.parameters()) / 1e6:.2f}M")
    return peft_model


def grid_conditioning(pairs: Cache, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(context, pooled) of the first `n` distinct captions of the pairs: the sample grids' prompts."""
    first = pairs.text_rows(np.arange(min(len(pairs), 64 * n)))
    return pairs.text(np.array(list(dict.fromkeys(first.tolist()))[:n]))


def sample_grid(policy, grid_cond, cfg, accelerator, step: int):
    """Fixed prompts and seeds, so grids before and during training compare image for image. Every
    process samples (under ZeRO-3 each forward gathers the parameters from all of them); the main
    one writes the grid."""
    policy.model.eval()
    images = policy.generate(None, range(len(grid_cond[0])), cfg.sample_steps, cfg.guidance, progress=False,
                             context=grid_cond, solver=cfg.sample_solver)
    if accelerator.is_main_process:
        os.makedirs(os.path.join(cfg.output_dir, "samples"), exist_ok=True)
        save_grid(images, os.path.join(cfg.output_dir, "samples", f"step-{step:06d}.png"))
    policy.model.train()


@entry_point
def cli(argv):
    main(parse(DPOConfig, argv))


if __name__ == "__main__":
    cli()
