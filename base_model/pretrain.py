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
from tqdm.auto import tqdm
from transformers import SchedulerType

from .adapters import load
from .cli import check_types, parse
from .backbones import build_model
from .cache import Cache, GlobalBatches, check_conditioning, is_cache, loader, read_manifest
from .dedup import read_keep_index
from .flow import DENSITIES, sample_t, validation_loss
from .formulations import as_velocity, formulation_loss
from .mmdit import BACKBONES, FORMULATIONS, PRESETS, MMDiT, preset
from .sampling import GUIDANCE, SOLVER, SOLVERS, STEPS, sample
from .precompute import check_source, precompute, up_to_date
from .sources import source_identity
from .shapes import make_split, save_grid
from .errors import entry_point
from .outputs import atomic_folder
from .training import (append_log, check_finite, check_run_folder, clip_and_step, configure_deepspeed,
                       make_accelerator, make_run_folder, optimizer_and_scheduler, save_checkpoint, start_logging,
                       step_generator)


@dataclass
class PretrainConfig:
    # data
    dataset: str = "shapes"  # "shapes" (built-in world), a cache made by base_model.precompute, or a local
    #                          imagefolder / parquet / arrow / save_to_disk path (precomputed on first use)
    cache_dir: str = ""  # where a dataset is precomputed on first use; "" → output_dir/data-cache
    keep_index: str = ""  # a base_model.dedup output folder: train only on the rows it kept
    aspect_buckets: bool = True  # precompute into aspect-ratio buckets at the resolution² pixel budget
    dataloader_num_workers: int = 2  # processes reading the cache ahead of the loop
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
    # objective (with --init_from, the checkpoint's backbone and formulation)
    formulation: str = "rf"  # "rf" (velocity), "eps_linear" or "v_cos": base_model/formulations.py
    timestep_density: str = "logit_normal"  # one of flow.DENSITIES
    logit_mean: float = 0.0  # rf/lognorm(0.00, 1.00) won the paper's study
    logit_std: float = 1.0
    mode_scale: float = 1.29
    shift: float = 1.0  # resolution shift α for training times
    # optimisation
    optimizer: str = "adamw"  # "adamw" or "adamw_8bit" (bitsandbytes)
    learning_rate: float = 1e-3
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8  # SD3 used 1e-15 with QK-norm for bf16 stability at scale
    weight_decay: float = 0.0
    lr_scheduler_type: str = "constant_with_warmup"  # any transformers.get_scheduler name: "cosine", "linear", …
    warmup_steps: int = 100
    max_steps: int = 2000
    per_device_train_batch_size: int = 64
    gradient_accumulation_steps: int = 1
    max_grad_norm: float = 1.0
    mixed_precision: str = "no"  # "no" or "bf16" (pays on GPUs and CPUs with bf16 matmul units)
    ema_decay: float = 0.998  # 0 disables EMA
    # logging, evaluation, checkpoints
    output_dir: str = "runs/pretrain"
    logging_steps: int = 25
    eval_steps: int = 250  # validation loss and a sample grid
    save_steps: int = 500
    save_total_limit: int = 2  # older checkpoints are deleted
    sample_solver: str = SOLVER  # for the sample grids: "euler" or "midpoint"
    sample_steps: int = STEPS
    guidance: float = GUIDANCE
    num_samples: int = 16
    report_to: str = "wandb"  # "wandb" (offline without an account) or "none"
    resume_from_checkpoint: str = ""  # "latest" or a checkpoint folder
    overwrite_output_dir: bool = False  # replace a finished run in output_dir (as in transformers)
    seed: int = 0

    def __post_init__(self):
        check_types(self)
        if self.timestep_density not in DENSITIES:
            raise ValueError(f"--timestep_density {self.timestep_density!r}: choose from {DENSITIES}")
        if self.backbone not in BACKBONES or self.formulation not in FORMULATIONS:
            raise ValueError(f"--backbone {self.backbone!r} / --formulation {self.formulation!r}: choose from "
                             f"{BACKBONES} / {FORMULATIONS}")
        if min(self.depth, self.hidden, self.heads) < 0:
            raise ValueError("--depth, --hidden and --heads must be ≥ 0 (0: the preset's)")
        if self.model_preset not in PRESETS:
            raise ValueError(f"--model_preset {self.model_preset!r}: choose from {sorted(PRESETS)}")
        if self.lr_scheduler_type not in {t.value for t in SchedulerType}:
            raise ValueError(f"--lr_scheduler_type {self.lr_scheduler_type!r}: choose from "
                             f"{sorted(t.value for t in SchedulerType)}")
        if self.optimizer not in ("adamw", "adamw_8bit"):
            raise ValueError(f"--optimizer {self.optimizer!r}: choose 'adamw' or 'adamw_8bit'")
        if self.mixed_precision not in ("no", "bf16"):
            raise ValueError(f"--mixed_precision {self.mixed_precision!r}: choose 'no' or 'bf16'")
        if self.report_to not in ("wandb", "none"):
            raise ValueError(f"--report_to {self.report_to!r}: choose 'wandb' or 'none'")
        if self.sample_solver not in SOLVERS:
            raise ValueError(f"--sample_solver {self.sample_solver!r}: choose from {SOLVERS}")
        for name in ("max_steps", "per_device_train_batch_size", "gradient_accumulation_steps", "resolution"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be ≥ 1")


# ---------------------------------------------------------------------------------------------
# Helpers: EMA (the rest is shared with the other stages: base_model/training.py)
# ---------------------------------------------------------------------------------------------


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
    if _zero_stage(accelerator) == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(params.values())):
            return {k: v.detach().clone() for k, v in params.items()}
    return params


def _zero_stage(accelerator) -> int:
    plugin = accelerator.state.deepspeed_plugin
    return plugin.zero_stage if plugin is not None else -1


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
    from accelerate.utils import set_seed

    from .text import TextEmbedder, zero_parts
    from .vae import image_space

    # Unpack the config once; functions below take explicit arguments.
    B, accum, seed = cfg.per_device_train_batch_size, cfg.gradient_accumulation_steps, cfg.seed
    resume = check_run_folder(cfg)  # before anything is written or loaded
    init = load(cfg.init_from) if cfg.init_from else None
    cond = init.encoders if init is not None else (cfg.text_encoders, cfg.image_space)
    # a model continued from a checkpoint takes only the buckets its position table covers
    max_side = init.max_side if init is not None else 0
    caches = data_caches(cfg, cond, int(os.environ.get("WORLD_SIZE", "1")), max_side)
    for c in (caches["train"], caches["val"]):
        if c is not None:
            check_source(c)  # a bad --dataset stops here, with nothing written
    kept_rows = read_keep_index(cfg.keep_index, train_inputs(caches)) if cfg.keep_index else None
    build = [c for c in (caches["train"], caches["val"]) if c is not None and not up_to_date(c, cond)]
    # Frozen encoders load only to build the cache, and before the Accelerator exists: under ZeRO-3
    # it would make transformers partition their weights at load (zero.Init).
    text = space = uncond = None
    if init is not None:
        text, space, uncond = init.text, init.space, init.uncond
    elif build:
        text, space = TextEmbedder(cfg.text_encoders), image_space(cfg.image_space)
    accelerator = make_accelerator(cfg.output_dir, cfg.report_to, cfg.mixed_precision, accum)
    set_seed(seed)
    world, rank = accelerator.num_processes, accelerator.process_index
    make_run_folder(accelerator, cfg, resume)
    for c in build:
        precompute(c, rank, world, accelerator.wait_for_everyone, text, space, cond)
    text = None  # the loop reads embeddings from the cache
    train, buckets, enc = open_data(caches, cfg, cond, kept_rows)
    layout = train.layout()
    sizes = [max(train.shape(b)[1:]) for b in buckets]
    if init is not None:
        model = init.model.train().requires_grad_(True)
    else:
        sizes_given = {k: v for k in ("depth", "hidden", "heads") if (v := getattr(cfg, k))}
        mcfg = preset(cfg.model_preset, in_channels=train.channels, context_dim=train.manifest["text"]["context_dim"],
                      pooled_dim=train.manifest["text"]["pooled_dim"], sample_size=cfg.resolution // train.downsample,
                      backbone=cfg.backbone, formulation=cfg.formulation, **sizes_given)
        mcfg.pos_embed_max_size = max(mcfg.pos_embed_max_size, max(sizes) // mcfg.patch_size)  # widest bucket
        model = build_model(mcfg)
    form = model.config.formulation
    ema = copy.deepcopy(model).requires_grad_(False) if cfg.ema_decay > 0 else None
    accelerator.print(f"{model.config.backbone} ({form}) {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
                      f"{sum(map(len, buckets.values()))} training images in {len(buckets)} bucket(s), "
                      f"{train.manifest['text']['count']} distinct captions, {world} process(es)")

    optimizer, scheduler = optimizer_and_scheduler(cfg, model.parameters())
    configure_deepspeed(accelerator, B, cfg.max_grad_norm)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)

    start = 0
    if resume:
        accelerator.load_state(resume)
        with open(os.path.join(resume, "trainer_state.json")) as f:
            start = json.load(f)["step"]
        if ema is not None:
            ema.load_state_dict(MMDiT.from_pretrained(os.path.join(resume, "ema")).state_dict())
        accelerator.print(f"resumed from {resume} at step {start}")
    start_logging(accelerator, "flowalign-pretrain", cfg)

    micro_global = B * world  # samples drawn per micro-step across processes
    batches = GlobalBatches(buckets, micro_global, seed, train.path)  # batch k: a function of (seed, k)
    data = iter(loader(train, batches, rank, world, start * accum, cfg.max_steps * accum, cfg.dataloader_num_workers))
    mine = slice(rank * B, (rank + 1) * B)
    history, last_ckpt, t0 = [], resume or None, time.time()
    bar = tqdm(range(start, cfg.max_steps), initial=start, total=cfg.max_steps, desc="pretrain",
               disable=not accelerator.is_local_main_process)
    for step in bar:
        model.train()
        step_loss = 0.0
        for micro in range(accum):
            batch = next(data)  # this process's slice of global batch step·accum + micro, one bucket
            gen = step_generator(seed, step, micro)
            t = sample_t(micro_global, cfg.timestep_density, cfg.logit_mean, cfg.logit_std, cfg.mode_scale,
                         cfg.shift, generator=gen)[mine]
            noise = torch.randn((micro_global, *train.shape(int(batch["bucket"]))), generator=gen)[mine]
            drop = torch.rand(micro_global, len(layout), generator=gen)[mine] < cfg.text_drop_prob
            context, pooled = zero_parts(batch["context"], batch["pooled"], layout, drop, uncond)
            dev = accelerator.device
            x0, noise, t, context, pooled = (v.to(dev) for v in (batch["x"], noise, t, context, pooled))
            with accelerator.accumulate(model):
                loss = formulation_loss(form, model, x0, noise, t, context, pooled).mean()
                accelerator.backward(loss)
                clip_and_step(accelerator, model, optimizer, cfg.max_grad_norm)
            step_loss += loss.detach() / accum
        scheduler.step()
        step_loss = accelerator.reduce(step_loss, "mean").item()
        check_finite(step_loss, step + 1, last_ckpt)
        if ema is not None:
            ema_update(ema, full_params(model, accelerator), ema_decay_at(step, cfg.ema_decay))
        history.append(step_loss)
        done = step + 1
        if done % cfg.logging_steps == 0 or done == cfg.max_steps:
            logs = {"train/loss": sum(history) / len(history), "train/lr": scheduler.get_last_lr()[0],
                    "train/samples_per_s": len(history) * micro_global * accum / (time.time() - t0)}
            bar.set_postfix(loss=f"{logs['train/loss']:.4f}")
            accelerator.log(logs, step=done)
            append_log(cfg.output_dir, accelerator, {"step": done, **logs})
            history, t0 = [], time.time()
        if done % cfg.eval_steps == 0 or done == cfg.max_steps:
            space = space or image_space(cond[1])  # the decoder, for the grid only
            evaluate(model, form, ema, enc, cfg, accelerator, done, space, uncond)
        if done % cfg.save_steps == 0 or done == cfg.max_steps:
            write_ema = None if ema is None else (lambda d: ema.save_pretrained(os.path.join(d, "ema")))
            last_ckpt = save_checkpoint(accelerator, cfg.output_dir, done, cfg.save_total_limit, {"step": done},
                                        write_ema)

    conditioning = {"text_encoders": cfg.text_encoders, "image_space": cfg.image_space, "resolution": cfg.resolution}
    if init is not None:
        conditioning = init.conditioning
    save_final(model, ema, accelerator, os.path.join(cfg.output_dir, "final"), conditioning)
    accelerator.end_training()


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
