"""What every training stage shares: plain functions, no Trainer class (nanoGPT's spirit).

Pretraining (`base_model.pretrain`), offline DPO (`align.dpo`) and the online loop
(`align.online`) each keep their own visible loop and call these for the parts that are the same:
the config fields every stage has (`TrainConfig`), the accelerator and DeepSpeed set-up, resume,
the per-step random draws from (seed, step), the batches read from the data cache, the optimizer
and LR schedule, the NaN stop, logging, and checkpoints written atomically.

A stage's loop, in order:

    resume = check_run_folder(cfg)                      # before anything is written or loaded
    accelerator = start_run(cfg, resume, build, cond)   # accelerator, seed, output_dir, data caches
    model, optimizer, scheduler = prepare(accelerator, cfg, model)
    start = resume_state(accelerator, resume).get("step", 0)
    n_global, mine = global_rows(accelerator, cfg.per_device_train_batch_size)
    data = read_batches(cache, buckets, cfg, accelerator, start)
    for step in progress(accelerator, start, cfg.max_steps, "stage"):
        for micro in range(accum):
            batch = next(data)
            t, noise, gen = draw_t_noise(cfg, step, micro, n_global, shape, mine)
            with accelerator.accumulate(model): loss = …; accelerator.backward(loss); clip_and_step(…)
        metrics = end_step(accelerator, scheduler, sums, step + 1, last_ckpt)   # reduce, NaN stop
        if due(step + 1, cfg.logging_steps, cfg.max_steps): log_train(…)
        if due(step + 1, cfg.save_steps, cfg.max_steps): save_checkpoint(…)
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import dataclass

import torch
from transformers import SchedulerType, get_scheduler

from .cli import check_fields, check_types
from .errors import MissingInput
from .flow import DENSITIES, sample_t
from .outputs import check_output_dir, clear_run_files, replace_folder
from .sampling import GUIDANCE, SOLVER, SOLVERS, STEPS


@dataclass
class TrainConfig:
    """The fields pretraining and DPO share (TRL's names); a stage's config inherits them and
    redeclares a field only to change its default."""
    # data, read from a cache of latents and text embeddings (base_model.precompute)
    cache_dir: str = ""  # where the data are precomputed on first use; "" → output_dir/data-cache
    aspect_buckets: bool = True  # precompute into aspect-ratio buckets at the resolution² pixel budget
    dataloader_num_workers: int = 2  # processes reading the cache ahead of the loop
    # training times t of the flow-matching objective
    timestep_density: str = "logit_normal"  # one of flow.DENSITIES
    logit_mean: float = 0.0  # rf/lognorm(0.00, 1.00) won the SD3 paper's study
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
    warmup_steps: int = 0
    max_steps: int = 400
    per_device_train_batch_size: int = 32
    gradient_accumulation_steps: int = 1
    max_grad_norm: float = 1.0
    mixed_precision: str = "no"  # "no" or "bf16" (pays on GPUs and CPUs with bf16 matmul units)
    # logging, sample grids, checkpoints
    output_dir: str = "runs/train"
    logging_steps: int = 25
    eval_steps: int = 200  # the stage's evaluation and sample grid
    save_steps: int = 200
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
        check_fields(self, {"timestep_density": DENSITIES, "optimizer": ("adamw", "adamw_8bit"),
                            "mixed_precision": ("no", "bf16"), "report_to": ("wandb", "none"),
                            "sample_solver": SOLVERS,
                            "lr_scheduler_type": tuple(t.value for t in SchedulerType)},
                     ("max_steps", "per_device_train_batch_size", "gradient_accumulation_steps"))


def launched_world() -> int:
    """Processes of this launch, known before the Accelerator exists."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def start_run(cfg, resume: str | None, build: list, cond: tuple, text=None, space=None):
    """The Accelerator (gradient accumulation of cfg), the global seed, --output_dir made, and the
    data caches still to `build` (`precompute.pending`) built, each process its share. The frozen
    encoders that building needs (`text`, `space` when given, else those `cond` names) load first:
    under ZeRO-3 the Accelerator would make transformers partition their weights (zero.Init)."""
    from accelerate.utils import set_seed

    from .text import TextEmbedder
    from .vae import image_space

    if build:
        text = text if text is not None else TextEmbedder(cond[0])
        space = space if space is not None else image_space(cond[1])
    accelerator = make_accelerator(cfg.output_dir, cfg.report_to, cfg.mixed_precision, cfg.gradient_accumulation_steps)
    set_seed(cfg.seed)
    make_run_folder(accelerator, cfg, resume)
    build_caches(accelerator, build, text, space, cond)
    return accelerator


def prepare(accelerator, cfg, model):
    """Optimizer and LR schedule of the model's trainable parameters, DeepSpeed told the micro-batch
    and the clipping, and all three through `accelerator.prepare` → (model, optimizer, scheduler)."""
    optimizer, scheduler = optimizer_and_scheduler(cfg, [p for p in model.parameters() if p.requires_grad])
    configure_deepspeed(accelerator, cfg.per_device_train_batch_size, cfg.max_grad_norm)
    return accelerator.prepare(model, optimizer, scheduler)


def resume_state(accelerator, resume: str | None) -> dict:
    """Restore a checkpoint's accelerate state; → its trainer_state.json ({} for a fresh run)."""
    if not resume:
        return {}
    accelerator.load_state(resume)
    with open(os.path.join(resume, "trainer_state.json")) as f:
        state = json.load(f)
    accelerator.print(f"resumed from {resume} at step {state['step']}")
    return state


def build_caches(accelerator, cfgs: list, text, space, cond: tuple) -> None:
    """Every process builds its share of the caches still to build (`precompute.pending`)."""
    from .precompute import precompute

    for c in cfgs:
        precompute(c, accelerator.process_index, accelerator.num_processes, accelerator.wait_for_everyone,
                   text, space, cond)


def progress(accelerator, start: int, total: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(range(start, total), initial=start, total=total, desc=desc,
                disable=not accelerator.is_local_main_process)


def due(done: int, every: int, last: int) -> bool:
    """Every `every` steps, and at the last one."""
    return done % every == 0 or done == last


def global_rows(accelerator, per_device: int) -> tuple[int, slice]:
    """(global batch size, this process's rows of it): draws are made for the global batch and sliced."""
    rank = accelerator.process_index
    return per_device * accelerator.num_processes, slice(rank * per_device, (rank + 1) * per_device)


def read_batches(cache, buckets: dict, cfg, accelerator, start: int):
    """This process's batches of the run from the cache, from optimizer step `start` on: global
    batch k is a function of (seed, k), process r reads slice r of it (`cache.GlobalBatches`)."""
    from .cache import GlobalBatches, loader

    accum, world = cfg.gradient_accumulation_steps, accelerator.num_processes
    batches = GlobalBatches(buckets, cfg.per_device_train_batch_size * world, cfg.seed, cache.path)
    return iter(loader(cache, batches, accelerator.process_index, world, start * accum, cfg.max_steps * accum,
                       cfg.dataloader_num_workers))


def draw_t_noise(cfg, step: int, micro: int, n_global: int, shape: tuple, mine: slice):
    """t and noise of micro-step (step, micro), drawn for the global batch from (seed, step, micro)
    and sliced to this process → (t, noise, the generator, for the stage's further draws)."""
    gen = step_generator(cfg.seed, step, micro)
    t = sample_t(n_global, cfg.timestep_density, cfg.logit_mean, cfg.logit_std, cfg.mode_scale, cfg.shift,
                 generator=gen)[mine]
    return t, torch.randn((n_global, *shape), generator=gen)[mine], gen


def add_metrics(sums: dict, metrics: dict, accum: int) -> None:
    """Accumulate a micro-step's metrics into the step's means."""
    for k, v in metrics.items():
        sums[k] = sums.get(k, 0.0) + float(v) / accum


def end_step(accelerator, scheduler, sums: dict, done: int, last_checkpoint: str | None) -> dict:
    """LR step, the step's metrics averaged over processes, and the NaN stop."""
    scheduler.step()
    reduced = accelerator.reduce(torch.tensor(list(sums.values()), device=accelerator.device), "mean")
    metrics = dict(zip(sums, reduced.tolist()))
    check_finite(metrics["loss"], done, last_checkpoint)
    return metrics


POSTFIX = {"loss": "train/loss", "acc": "train/rewards/accuracies"}  # shown on the progress bar


def log_train(accelerator, output_dir: str, history: list[dict], done: int, lr: float, seconds: float,
              items: int, unit: str, bar=None) -> None:
    """The mean of each metric over `history` (the steps since the last log), the LR and the
    throughput (`items` per step, as train/{unit}_per_s), to the trackers and log.jsonl."""
    logs = {f"train/{k}": sum(h[k] for h in history) / len(history) for k in history[0]}
    logs["train/lr"] = lr
    logs[f"train/{unit}_per_s"] = len(history) * items / seconds
    if bar is not None:
        bar.set_postfix({name: f"{logs[key]:.4f}" if name == "loss" else f"{logs[key]:.2f}"
                         for name, key in POSTFIX.items() if key in logs})
    accelerator.log(logs, step=done)
    append_log(output_dir, accelerator, {"step": done, **logs})


def make_accelerator(output_dir: str, report_to: str, mixed_precision: str = "no", accum: int = 1):
    """An Accelerator for any stage: gloo between CPU processes, one LR step per optimizer step
    whatever the world size, wandb offline when there is no account."""
    from accelerate import Accelerator

    if report_to == "wandb" and not os.environ.get("WANDB_API_KEY"):
        os.environ.setdefault("WANDB_MODE", "offline")
    return Accelerator(gradient_accumulation_steps=accum, mixed_precision=mixed_precision,
                       log_with=None if report_to == "none" else report_to, project_dir=output_dir,
                       kwargs_handlers=cpu_process_group(), step_scheduler_with_optimizer=False)


def start_logging(accelerator, project: str, cfg) -> None:
    """Trackers (wandb) with the stage's config, and `output_dir/config.json` beside the run."""
    from dataclasses import asdict

    if cfg.report_to != "none":
        accelerator.init_trackers(project, config=asdict(cfg))
    if accelerator.is_main_process:
        with open(os.path.join(cfg.output_dir, "config.json"), "w") as f:
            json.dump(asdict(cfg), f, indent=2)


def zero_stage(accelerator) -> int:
    """The DeepSpeed ZeRO stage of a run (-1 without DeepSpeed)."""
    plugin = accelerator.state.deepspeed_plugin
    return plugin.zero_stage if plugin is not None else -1


def configure_deepspeed(accelerator, micro_batch: int, max_grad_norm: float) -> None:
    """DeepSpeed needs the micro-batch and the clipping in its config before `prepare`."""
    if accelerator.state.deepspeed_plugin is not None:
        ds = accelerator.state.deepspeed_plugin.deepspeed_config
        ds["train_micro_batch_size_per_gpu"] = micro_batch
        ds["gradient_clipping"] = max_grad_norm


def clip_and_step(accelerator, model, optimizer, max_grad_norm: float) -> None:
    """Clip (DeepSpeed clips by itself), step, zero the gradients."""
    if accelerator.sync_gradients and accelerator.state.deepspeed_plugin is None:
        accelerator.clip_grad_norm_(model.parameters(), max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def check_finite(loss: float, step: int, last_checkpoint: str | None) -> None:
    """Stop a diverged run, naming the step and the checkpoint to go back to."""
    if not math.isfinite(loss):
        raise FloatingPointError(f"loss is {loss} at step {step}; stopping. "
                                 f"Last good checkpoint: {last_checkpoint or 'none'}")


def resolve_resume(output_dir: str, resume_from_checkpoint: str) -> str | None:
    """'latest' → the newest checkpoint of output_dir, else the folder given (None: a fresh run).
    Either must exist: a resume that finds nothing is usually a mistyped folder, not a fresh start."""
    if not resume_from_checkpoint:
        return None
    if resume_from_checkpoint == "latest":
        found = latest_checkpoint(output_dir)
        if found is None:
            raise MissingInput(f"--resume_from_checkpoint latest: no checkpoint-N folder in --output_dir {output_dir!r}")
        return found
    if not os.path.isfile(os.path.join(resume_from_checkpoint, "trainer_state.json")):
        raise MissingInput(f"--resume_from_checkpoint {resume_from_checkpoint!r}: not a checkpoint folder "
                           f"(no trainer_state.json)")
    return resume_from_checkpoint


def check_run_folder(cfg) -> str | None:
    """Before a run writes anything: its --output_dir may be used (`outputs.check_output_dir`: a
    finished or unfinished run, or a user's files, are refused without --overwrite_output_dir or
    --resume_from_checkpoint) and a resume names a checkpoint. Returns that checkpoint, or None."""
    check_output_dir(cfg.output_dir, cfg.overwrite_output_dir, cfg.resume_from_checkpoint)
    return resolve_resume(cfg.output_dir, cfg.resume_from_checkpoint)


def make_run_folder(accelerator, cfg, resume: str | None) -> None:
    """Create --output_dir; a fresh run with --overwrite_output_dir first removes what an earlier run
    wrote there (its `final/` stays until this run's replaces it; a user's files always stay)."""
    if accelerator.is_main_process:
        if cfg.overwrite_output_dir and not resume:
            clear_run_files(cfg.output_dir)
        os.makedirs(cfg.output_dir, exist_ok=True)
    accelerator.wait_for_everyone()


class DataOrder:
    """Sample i of the run is perm_e[i mod N] with perm_e a seeded permutation of epoch e."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self._perms = n, seed, {}

    def indices(self, start: int, count: int) -> torch.Tensor:
        pos = torch.arange(start, start + count)
        out = torch.empty(count, dtype=torch.long)
        for e in pos.div(self.n, rounding_mode="floor").unique().tolist():
            if e not in self._perms:
                self._perms = {e: torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + e))}
            sel = pos // self.n == e
            out[sel] = self._perms[e][pos[sel] % self.n]
        return out


def step_generator(seed: int, step: int, micro: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + step * 1009 + micro)



def optimizer_and_scheduler(cfg, params):
    """AdamW (or bitsandbytes' 8-bit AdamW) and the LR schedule of a stage config with TRL's field names."""
    if cfg.optimizer == "adamw_8bit":
        import bitsandbytes as bnb
        opt_cls = bnb.optim.AdamW8bit
    else:
        opt_cls = torch.optim.AdamW
    optimizer = opt_cls(params, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                        eps=cfg.adam_epsilon, weight_decay=cfg.weight_decay)
    return optimizer, get_scheduler(cfg.lr_scheduler_type, optimizer, num_warmup_steps=cfg.warmup_steps,
                                    num_training_steps=cfg.max_steps)


def latest_checkpoint(output_dir: str) -> str | None:
    if not os.path.isdir(output_dir):
        return None
    steps = [int(d.split("-")[1]) for d in os.listdir(output_dir)
             if d.startswith("checkpoint-") and d.split("-")[1].isdigit()]
    return os.path.join(output_dir, f"checkpoint-{max(steps)}") if steps else None


def save_checkpoint(accelerator, output_dir: str, step: int, keep: int, state: dict, write_extra=None) -> str:
    """accelerate state + `write_extra(folder)` (e.g. the EMA) + `trainer_state.json` (`state`),
    written to a temporary folder and renamed into place; keeps the newest `keep` checkpoints."""
    final = os.path.join(output_dir, f"checkpoint-{step}")
    tmp = os.path.join(output_dir, f".tmp-checkpoint-{step}")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(tmp)
    accelerator.wait_for_everyone()  # every rank's shards are written before the folder is renamed
    if accelerator.is_main_process:
        try:
            if write_extra is not None:
                write_extra(tmp)
            with open(os.path.join(tmp, "trainer_state.json"), "w") as f:
                json.dump(state, f)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        replace_folder(tmp, final)
        old = sorted((d for d in os.listdir(output_dir) if d.startswith("checkpoint-") and d[11:].isdigit()),
                     key=lambda d: int(d.split("-")[1]))
        for d in old[:-keep] if keep > 0 else []:
            shutil.rmtree(os.path.join(output_dir, d), ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def cpu_process_group() -> list:
    """Launched as several processes without GPUs, accelerate needs the gloo backend named, or each
    process believes it is alone (num_processes = 1)."""
    from accelerate.utils import InitProcessGroupKwargs

    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    return [InitProcessGroupKwargs(backend="gloo")] if launched and not torch.cuda.is_available() else []



def append_log(output_dir, accelerator, row: dict):
    if accelerator.is_main_process:
        with open(os.path.join(output_dir, "log.jsonl"), "a") as f:
            f.write(json.dumps(row) + "\n")


