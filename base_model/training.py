"""What every training stage shares: plain functions, no Trainer class (nanoGPT's spirit).

Pretraining (`base_model.pretrain`), offline DPO (`align.dpo`) and the online loop
(`align.online`) each keep their own visible loop and call these for the parts that are the same:
the accelerator and DeepSpeed set-up, the per-step random draws from (seed, step), the data order,
the optimizer and LR schedule, the NaN stop, logging, and checkpoints written atomically with resume.
"""

from __future__ import annotations

import json
import math
import os
import shutil

import torch
from transformers import get_scheduler

from .errors import MissingInput
from .outputs import check_output_dir, clear_run_files, replace_folder


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


