"""Pretrain an MM-DiT with rectified flow, on one CPU or many GPUs, with the same command.

    python -m base_model.pretrain --config configs/pretrain/toy.yaml --output_dir runs/toy
    accelerate launch --num_processes 2 --use_deepspeed --deepspeed_config_file configs/deepspeed/zero2.json \
        -m base_model.pretrain --config configs/pretrain/toy.yaml --output_dir runs/toy-z2

The data are read from a cache of latents and text embeddings (`base_model.precompute`, built on
first use under output_dir/data-cache), memory-mapped, one aspect bucket per global batch. Every
random choice of a step (its samples, t, noise, text drop) is a function of (seed, step), drawn
for the global batch and sliced per process: the run is the same on 1 or N processes and after a
resume. Writes `output_dir/checkpoint-STEP/` (atomic), `output_dir/samples/`, and `output_dir/final/`
(EMA weights, `final/raw/` the raw weights, both one consolidated model.safetensors).
"""

from __future__ import annotations

import copy
import json
import os
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from .adapters import load
from .cli import parse
from .backbones import build_model
from .cache import Cache, check_conditioning, is_cache, read_manifest
from .dedup import read_keep_index
from .flow import validation_loss
from .formulations import as_velocity, formulation_loss
from .mmdit import BACKBONES, FORMULATIONS, PRESETS, MMDiT, preset
from .sampling import sample
from .precompute import pending
from .sources import source_identity
from .shapes import make_split, save_grid
from .errors import entry_point
from .outputs import atomic_folder
from .training import (TrainConfig, add_metrics, append_log, check_run_folder, clip_and_step, draw_t_noise, due,
                       end_step, global_rows, launched_world, log_train, prepare, progress, read_batches,
                       resume_state, save_checkpoint, start_logging, start_run, zero_stage)


@dataclass
class PretrainConfig(TrainConfig):
    """Pretraining's fields; the optimisation, logging and checkpoint fields are `TrainConfig`'s."""
    # data
    dataset: str = "shapes"  # "shapes" (built-in world), a cache made by base_model.precompute, or a local
    #                          imagefolder / parquet / arrow / save_to_disk path (precomputed on first use)
    keep_index: str = ""  # a base_model.dedup output folder: train only on the rows it kept
    image_column: str = "image"  # column names for a real dataset
    caption_column: str = "caption"
    resolution: int = 32  # training images are rendered / resized to this side (the pixel budget, with buckets)
    num_train: int = 50_000  # shapes world: number of training scenes
    num_val: int = 256  # shapes world: validation scenes (fixed set for the validation loss)
    # model and conditioning
    model_preset: str = "toy"  # MMDiT preset; context and pooled widths come from the text encoders
    depth: int = 0  # blocks; 0 keeps the preset's (the scaling study sets depth, hidden and heads)
    hidden: int = 0  # width; 0 keeps the preset's
    heads: int = 0  # attention heads; 0 keeps the preset's
    backbone: str = "mmdit"  # "mmdit", or a baseline of base_model/backbones.py: "dit", "crossdit", "uvit"
    init_from: str = ""  # continue from a checkpoint, CHECKPOINT+ADAPTER or a diffusers SD3 folder (its
    #                      text encoders and image space then replace text_encoders / image_space)
    text_encoders: list[str] = field(default_factory=lambda: ["minilm"])  # "minilm", "clip:PATH", "t5:PATH"
    image_space: str = "pixels"  # "pixels", or "vae:PATH" for a local diffusers AutoencoderKL folder
    text_drop_prob: float = 0.464  # each encoder dropped independently (SD3's value for 3 encoders)
    ema_decay: float = 0.998  # 0 disables EMA
    # objective (with --init_from, the checkpoint's backbone and formulation)
    formulation: str = "rf"  # "rf" (velocity), "eps_linear" or "v_cos": base_model/formulations.py
    # TrainConfig's fields with pretraining's defaults
    warmup_steps: int = 100
    max_steps: int = 2000
    per_device_train_batch_size: int = 64
    output_dir: str = "runs/pretrain"
    eval_steps: int = 250  # validation loss and a sample grid
    save_steps: int = 500

    def __post_init__(self):
        super().__post_init__()
        if self.backbone not in BACKBONES or self.formulation not in FORMULATIONS:
            raise ValueError(f"--backbone {self.backbone!r} / --formulation {self.formulation!r}: choose from "
                             f"{BACKBONES} / {FORMULATIONS}")
        if min(self.depth, self.hidden, self.heads) < 0:
            raise ValueError("--depth, --hidden and --heads must be ≥ 0 (0: the preset's)")
        if self.model_preset not in PRESETS:
            raise ValueError(f"--model_preset {self.model_preset!r}: choose from {sorted(PRESETS)}")
        if self.resolution < 1:
            raise ValueError("--resolution must be ≥ 1")


# ---------------------------------------------------------------------------------------------
# Helpers: EMA (the rest is shared with the other stages: base_model/training.py)
# ---------------------------------------------------------------------------------------------


def make_ema(model, decay: float, resume: str | None):
    """A frozen copy of `model` for the EMA (None when decay is 0), restored from the checkpoint's `ema/`."""
    if decay <= 0:
        return None
    ema = copy.deepcopy(model).requires_grad_(False)
    if resume:
        ema.load_state_dict(MMDiT.from_pretrained(os.path.join(resume, "ema")).state_dict())
    return ema


def ema_decay_at(step: int, decay: float) -> float:
    """EMA warm-up (as diffusers' EMAModel): early averages must not be dominated by the init."""
    return min(decay, (1 + step) / (10 + step))


def ema_update(ema: torch.nn.Module, params: dict, decay: float):
    with torch.no_grad():
        for name, p in ema.named_parameters():
            p.lerp_(params[name].detach().to(p.dtype), 1 - decay)


def full_params(model, accelerator) -> dict:
    """Name → full parameter tensor, gathering ZeRO-3 shards when needed."""
    unwrapped = accelerator.unwrap_model(model)
    params = dict(unwrapped.named_parameters())
    if zero_stage(accelerator) == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(params.values())):
            return {k: v.detach().clone() for k, v in params.items()}
    return params


# ---------------------------------------------------------------------------------------------
# Data: caches of latents and text embeddings (base_model.precompute), built on first use
# ---------------------------------------------------------------------------------------------


def data_caches(cfg: PretrainConfig, cond: tuple, world: int, max_side: int = 0) -> dict:
    """{"train": PrecomputeConfig | None, "val": PrecomputeConfig | None, "train_path", "val_path"}: the caches a
    run reads, and how to build them (None: --dataset is a cache already). The shapes world has its own
    validation split; other data hold out validation images from the training cache."""
    from .precompute import PrecomputeConfig
    from .shapes import make_split

    root = cfg.cache_dir or os.path.join(cfg.output_dir, "data-cache")
    common = dict(text_encoders=list(cond[0]), image_space=cond[1], resolution=cfg.resolution, max_side=max_side,
                  overwrite_output_dir=not cfg.cache_dir)  # the run's own cache is rebuilt when flags change
    G = cfg.per_device_train_batch_size * world
    if is_cache(cfg.dataset):
        return {"train": None, "val": None, "train_path": cfg.dataset, "val_path": None}
    if cfg.dataset == "shapes":
        prompts = [s.caption for s in make_split("heldout_prompts", cfg.num_samples)]
        train = PrecomputeConfig(dataset="shapes", split="train", num_images=cfg.num_train, prompts=prompts,
                                 aspect_buckets=False, min_bucket=G, **common,
                                 output=os.path.join(root, f"shapes-train-{cfg.num_train}-{cfg.resolution}"))
        val = PrecomputeConfig(dataset="shapes", split="val", num_images=cfg.num_val, aspect_buckets=False,
                               min_bucket=1, **common, output=os.path.join(root, f"shapes-val-{cfg.num_val}-{cfg.resolution}"))
        return {"train": train, "val": val, "train_path": train.output, "val_path": val.output}
    train = PrecomputeConfig(dataset=cfg.dataset, image_column=cfg.image_column, caption_column=cfg.caption_column,
                             aspect_buckets=cfg.aspect_buckets, min_bucket=G, **common,
                             output=os.path.join(root, "train"))
    return {"train": train, "val": None, "train_path": train.output, "val_path": None}


def train_inputs(caches: dict) -> dict:
    """The identity of the training data's source rows, as its cache records it (and a dedup index)."""
    c = caches["train"]
    return read_manifest(caches["train_path"])["identity"]["inputs"] if c is None else \
        source_identity(c.dataset, c.split, c.num_images)


def open_data(paths: dict, cfg: PretrainConfig, cond: tuple, kept_rows: np.ndarray | None = None):
    """(train Cache, its training buckets, validation dict): validation images, their text, the
    grid prompts' text. Without a validation cache, the first images of the largest bucket are held out.
    `kept_rows` (a dedup index): only samples made from these source rows are trained on."""
    train = Cache(paths["train_path"])
    check_conditioning(train.path, train.manifest, cond[0], cond[1])
    buckets = train.buckets()
    if kept_rows is not None:
        buckets = {b: ids[np.isin(train.source_rows(ids), kept_rows)] for b, ids in buckets.items()}
        buckets = {b: ids for b, ids in buckets.items() if len(ids)}
    if paths["val_path"]:
        val_cache = Cache(paths["val_path"])
        val = val_cache.read(np.arange(len(val_cache)))
        prompts = [s.caption for s in make_split("heldout_prompts", cfg.num_samples)]
        p_context, p_pooled = train.text(train.text_ids(prompts))
    else:
        largest = max(buckets, key=lambda b: len(buckets[b]))
        n_val = min(cfg.num_val, max(1, len(buckets[largest]) // 10))
        held, buckets[largest] = buckets[largest][:n_val], buckets[largest][n_val:]
        val = train.read(held)
        p_context, p_pooled = val["context"][:cfg.num_samples], val["pooled"][:cfg.num_samples]
    return train, buckets, dict(x_val=val["x"], context=val["context"], pooled=val["pooled"],
                                prompt_context=p_context, prompt_pooled=p_pooled)


# ---------------------------------------------------------------------------------------------
# The training loop
# ---------------------------------------------------------------------------------------------


def main(cfg: PretrainConfig):
    from .text import zero_parts
    from .vae import image_space

    # Unpack the config once; functions below take explicit arguments.
    B, accum = cfg.per_device_train_batch_size, cfg.gradient_accumulation_steps
    resume = check_run_folder(cfg)  # before anything is written or loaded
    init = load(cfg.init_from) if cfg.init_from else None
    cond = init.encoders if init is not None else (cfg.text_encoders, cfg.image_space)
    # a model continued from a checkpoint takes only the buckets its position table covers
    caches = data_caches(cfg, cond, launched_world(), init.max_side if init is not None else 0)
    build = pending([caches["train"], caches["val"]], cond)  # a bad --dataset stops here, nothing written
    kept_rows = read_keep_index(cfg.keep_index, train_inputs(caches)) if cfg.keep_index else None
    # the image space decodes the sample grids; like the text encoders, it loads before the Accelerator
    space, uncond = (init.space, init.uncond) if init is not None else (image_space(cfg.image_space), None)
    accelerator = start_run(cfg, resume, build, cond, init.text if init is not None else None, space)
    train, buckets, enc = open_data(caches, cfg, cond, kept_rows)  # the loop reads embeddings from the cache
    model = init.model.train().requires_grad_(True) if init is not None else new_model(cfg, train, buckets)
    form = model.config.formulation
    ema = make_ema(model, cfg.ema_decay, resume)
    write_ema = None if ema is None else (lambda folder: ema.save_pretrained(os.path.join(folder, "ema")))
    accelerator.print(describe(model, train, buckets, accelerator.num_processes))
    model, optimizer, scheduler = prepare(accelerator, cfg, model)
    start = resume_state(accelerator, resume).get("step", 0)
    start_logging(accelerator, "flowalign-pretrain", cfg)

    layout, (n_global, mine) = train.layout(), global_rows(accelerator, B)
    data = read_batches(train, buckets, cfg, accelerator, start)
    history, last_ckpt, t0 = [], resume, time.time()
    bar = progress(accelerator, start, cfg.max_steps, "pretrain")
    for step in bar:
        model.train()
        sums: dict[str, float] = {}
        for micro in range(accum):
            batch = next(data)  # this process's slice of global batch step·accum + micro, one bucket
            t, noise, gen = draw_t_noise(cfg, step, micro, n_global, train.shape(int(batch["bucket"])), mine)
            drop = torch.rand(n_global, len(layout), generator=gen)[mine] < cfg.text_drop_prob
            context, pooled = zero_parts(batch["context"], batch["pooled"], layout, drop, uncond)
            x0, noise, t, context, pooled = (v.to(accelerator.device) for v in (batch["x"], noise, t, context, pooled))
            with accelerator.accumulate(model):
                loss = formulation_loss(form, model, x0, noise, t, context, pooled).mean()
                accelerator.backward(loss)
                clip_and_step(accelerator, model, optimizer, cfg.max_grad_norm)
            add_metrics(sums, {"loss": loss.detach()}, accum)
        history.append(end_step(accelerator, scheduler, sums, step + 1, last_ckpt))  # NaN stop
        if ema is not None:
            ema_update(ema, full_params(model, accelerator), ema_decay_at(step, cfg.ema_decay))
        done = step + 1
        if due(done, cfg.logging_steps, cfg.max_steps):
            log_train(accelerator, cfg.output_dir, history, done, scheduler.get_last_lr()[0], time.time() - t0,
                      n_global * accum, "samples", bar)
            history, t0 = [], time.time()
        if due(done, cfg.eval_steps, cfg.max_steps):
            evaluate(model, form, ema, enc, cfg, accelerator, done, space, uncond)
        if due(done, cfg.save_steps, cfg.max_steps):
            last_ckpt = save_checkpoint(accelerator, cfg.output_dir, done, cfg.save_total_limit, {"step": done},
                                        write_ema)

    conditioning = {"text_encoders": cfg.text_encoders, "image_space": cfg.image_space, "resolution": cfg.resolution}
    save_final(model, ema, accelerator, os.path.join(cfg.output_dir, "final"),
               init.conditioning if init is not None else conditioning)
    accelerator.end_training()


def new_model(cfg: PretrainConfig, train: Cache, buckets: dict):
    """A fresh model of `cfg`'s preset, backbone and formulation (--depth/--hidden/--heads override the
    preset) for the cache's image space and text widths, its position table covering the widest bucket."""
    sizes = {k: v for k in ("depth", "hidden", "heads") if (v := getattr(cfg, k))}
    mcfg = preset(cfg.model_preset, in_channels=train.channels, context_dim=train.manifest["text"]["context_dim"],
                  pooled_dim=train.manifest["text"]["pooled_dim"], sample_size=cfg.resolution // train.downsample,
                  backbone=cfg.backbone, formulation=cfg.formulation, **sizes)
    widest = max(max(train.shape(b)[1:]) for b in buckets)
    mcfg.pos_embed_max_size = max(mcfg.pos_embed_max_size, widest // mcfg.patch_size)
    return build_model(mcfg)


def describe(model, train: Cache, buckets: dict, world: int) -> str:
    """One line: the model, and what it trains on."""
    params = sum(p.numel() for p in model.parameters())
    return (f"{model.config.backbone} ({model.config.formulation}) {params / 1e6:.2f}M parameters, "
            f"{sum(map(len, buckets.values()))} training images in {len(buckets)} bucket(s), "
            f"{train.manifest['text']['count']} distinct captions, {world} process(es)")


def evaluate(model, form, ema, enc, cfg, accelerator, step, vae, uncond=None):
    """Validation loss at 8 t levels (fixed set and noise) and a grid from the EMA weights. The loss is
    the rf velocity loss whatever the formulation (`formulations.as_velocity`): one scale for all."""
    model.eval()
    dev = accelerator.device
    val = validation_loss(as_velocity(lambda x, t, c, p: model(x, t, c, p), form), enc["x_val"].to(dev),
                          (enc["context"].to(dev), enc["pooled"].to(dev)), seed=cfg.seed)
    accelerator.log({"val/loss": val["loss"], **{f"val/loss_t{i}": v for i, v in enumerate(val["loss_t"])}},
                    step=step)
    append_log(cfg.output_dir, accelerator, {"step": step, "val/loss": val["loss"]})
    if accelerator.is_main_process:
        net = ema if ema is not None else accelerator.unwrap_model(model)
        n = len(enc["prompt_context"])
        images = sample(net.eval(), enc["prompt_context"], enc["prompt_pooled"], list(range(n)),
                        enc["x_val"].shape[1:], steps=cfg.sample_steps, guidance=cfg.guidance, uncond=uncond,
                        progress=False, solver=cfg.sample_solver)
        os.makedirs(os.path.join(cfg.output_dir, "samples"), exist_ok=True)
        save_grid(vae.decode(images).clamp(-1, 1), os.path.join(cfg.output_dir, "samples", f"step-{step:06d}.png"))
    model.train()


def save_final(model, ema, accelerator, path, conditioning: dict):
    """One consolidated model.safetensors (ZeRO-3 shards gathered): EMA in `final/` and raw in `final/raw/`
    (without EMA: the raw weights in `final/`), and `conditioning.json` naming the text encoders and
    image space the model was trained with."""
    state = accelerator.get_state_dict(model)  # every process takes part under ZeRO-3
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)
        with atomic_folder(path) as tmp:
            if ema is not None:
                ema.save_pretrained(tmp)
            unwrapped.save_pretrained(os.path.join(tmp, "raw") if ema is not None else tmp, state_dict=state)
            with open(os.path.join(tmp, "conditioning.json"), "w") as f:
                json.dump(conditioning, f, indent=2)
        accelerator.print(f"final model: {path}")
    accelerator.wait_for_everyone()


@entry_point
def cli(argv):
    main(parse(PretrainConfig, argv))


if __name__ == "__main__":
    cli()
