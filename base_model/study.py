"""The paper's experiments at laptop scale: a grid of pretraining runs, evaluated, ranked and fitted.

    python -m base_model.study --config configs/study/timesteps.yaml
    python -m base_model.study --config configs/study/scaling.yaml --run_index 3   # one run (a Slurm task)
    bash configs/slurm_study.sh configs/study/backbones.yaml                        # the grid as a Slurm array

A study names the pretraining config every run starts from, its variants (each a mapping of
`PretrainConfig` overrides), the seeds and optionally budgets (max_steps): each (variant, budget,
seed) is one run of `base_model.pretrain`. A run's folder is `output_dir/runs/KEY`, KEY a hash of its
full config (paths left out), holding `result.json` once trained: a rerun, or another machine given
that folder, trains nothing twice, and a run killed half-way resumes from its last checkpoint.

Each run is then evaluated once (cached beside it) on the same prompts and seeds: the accuracy of the
compositional checker and the FD to renders of the same scenes (in-project image features,
`reward.fid`) at every (sampling steps, CFG scale), its validation-loss curve from its log, its
parameters and training FLOPs. The driver writes `study.json` and `study.html`, with the paper's
analyses when asked: "ranking" (non-dominated sorting over (accuracy, FD) per setting, the rank
averaged over settings, CIs by resampling seeds) and "scaling" (a power law of the final validation
loss against training FLOPs, and Pearson's r of validation loss with accuracy and with FD).
This module is a driver: it calls the pretraining CLI and the evaluators of `reward/`.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
from dataclasses import asdict, dataclass, field, fields

import numpy as np

from reward import compositional, stats
from reward.fid import frechet_distance

from .adapters import load
from .backbones import forward_flops
from .cli import ArgumentParser, read_yaml
from .data import shapes_data
from .errors import InputError, entry_point
from .mmdit import count_params
from .outputs import write_json
from .pretrain import PretrainConfig
from .runs import again_flags, cached_result, command, command_key, run_cached
from .shapes import SPLIT_OFFSETS, save_grid
from .training import latest_checkpoint


@dataclass
class StudyConfig:
    name: str  # the study's title in study.json and study.html
    pretrain_config: str  # the base_model.pretrain YAML every run starts from
    variants: dict  # variant name → PretrainConfig overrides
    common: dict = field(default_factory=dict)  # overrides for every run (budget, model size)
    budgets: list = field(default_factory=list)  # max_steps values; each variant trains at each ([]: as configured)
    seeds: list = field(default_factory=lambda: [0, 1, 2])
    output_dir: str = "runs/study"
    steps: list = field(default_factory=lambda: [5, 10, 25, 50])  # sampling steps, one model call each
    guidance: list = field(default_factory=lambda: [1.0, 2.0])  # CFG scales
    solver: str = "euler"  # euler: Euler for rf, DDIM for eps_linear and v_cos (base_model/formulations.py)
    prompts: str = "heldout_prompts"  # the shapes-world split judged
    n_prompts: int = 128  # one image per prompt, seed = the prompt's index, the same for every run
    fd_model: str = "runs/reward/imagetext"  # reward.imagetext folder whose features FD uses; "" skips FD
    fd_config: str = "configs/reward/imagetext.yaml"  # how to train fd_model when its folder is missing
    grid_prompts: int = 8  # images per variant in the report's grids
    analyses: list = field(default_factory=list)  # "ranking", "scaling"

    def __post_init__(self):
        if self.prompts not in SPLIT_OFFSETS:
            raise ValueError(f"prompts {self.prompts!r}: choose a shapes-world split {list(SPLIT_OFFSETS)}")
        if unknown := set(self.analyses) - {"ranking", "scaling"}:
            raise ValueError(f"analyses {sorted(unknown)}: choose from ['ranking', 'scaling']")
        known = {f.name for f in fields(PretrainConfig)}
        for where, flags in [("common", self.common)] + [(f"variants.{n}", v) for n, v in self.variants.items()]:
            if not isinstance(flags, dict):
                raise ValueError(f"{where}: expected a mapping of PretrainConfig keys")
            if bad := sorted(set(flags) - known) + sorted(set(flags) & RUN_KEYS):
                raise ValueError(f"{where}: {bad} are not PretrainConfig keys a study may set")


RUN_KEYS = {"output_dir", "cache_dir", "seed", "resume_from_checkpoint", "overwrite_output_dir"}  # the driver's
PATHS = RUN_KEYS - {"seed"} | {"report_to", "dataloader_num_workers"}  # left out of a run's key: not its result


def load_config(path: str, overrides: dict) -> StudyConfig:
    raw = read_yaml(path)
    raw.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return StudyConfig(**raw)
    except (TypeError, ValueError) as e:
        raise InputError(f"{path}: {e}") from e


@dataclass(frozen=True)
class Run:
    cell: str  # the variant, with its budget when the study has budgets: what seeds are averaged over
    variant: str
    seed: int
    flags: dict  # overrides of the pretraining config
    key: str  # hash of the run's full config


def run_key(pretrain_config: str, flags: dict) -> str:
    """Hash of a run's full PretrainConfig (defaults, the YAML, the overrides; paths left out)."""
    full = asdict(PretrainConfig(**{**read_yaml(pretrain_config), **flags}))
    text = json.dumps({k: v for k, v in full.items() if k not in PATHS}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def plan(cfg: StudyConfig) -> list[Run]:
    """Every (variant, budget, seed) of the study, in config order."""
    runs = []
    for (name, overrides), budget, seed in itertools.product(cfg.variants.items(), cfg.budgets or [None], cfg.seeds):
        flags = {**cfg.common, **overrides, **({"max_steps": budget} if budget else {}), "seed": seed}
        try:
            key = run_key(cfg.pretrain_config, flags)
        except (TypeError, ValueError) as e:
            raise InputError(f"variant {name!r}: {e}") from e
        runs.append(Run(name if budget is None else f"{name} @ {budget} steps", name, seed, flags, key))
    return runs


# ---------------------------------------------------------------------------------------------
# One run: train (cached by its key), evaluate (cached beside it)
# ---------------------------------------------------------------------------------------------


def train(run: Run, cfg: StudyConfig) -> dict:
    folder = os.path.join(cfg.output_dir, "runs", run.key)
    flags = {**run.flags, "output_dir": folder, "cache_dir": os.path.join(cfg.output_dir, "data-cache")}
    cmd = command("base_model.pretrain", cfg.pretrain_config, flags)
    return run_cached(cmd, run.key, folder, lambda: {"cell": run.cell, "seed": run.seed, "flags": run.flags},
                      lambda: again_flags(folder), tag="study")


def val_curve(folder: str) -> list[tuple[int, float]]:
    """(step, validation loss) from a run's log; a step logged again after a resume keeps the last."""
    curve = {}
    with open(os.path.join(folder, "log.jsonl")) as f:
        for line in f:
            row = json.loads(line)
            if "val/loss" in row:
                curve[row["step"]] = row["val/loss"]
    return sorted(curve.items())


def evaluate(folder: str, cfg: StudyConfig, fd_model) -> dict:
    """Accuracy and FD at every (steps, guidance), the validation-loss curve, parameters and FLOPs of
    one trained run; the grid of the last setting is written beside as `judged-study-KEY.png`."""
    gen = load(os.path.join(folder, "final"))
    data, scenes = shapes_data(cfg.prompts, cfg.n_prompts, gen.resolution)  # the scenes and their renders
    context, pooled = gen.text.encode(data.captions)
    real = data.images
    settings = []
    for steps, guidance in itertools.product(cfg.steps, cfg.guidance):
        images = gen.generate(None, range(len(scenes)), steps, guidance, context=(context, pooled),
                              batch_size=256, progress=False, solver=cfg.solver)
        judged = [compositional.judge(img, s) for img, s in zip(images, scenes)]
        tasks = {}
        for j in judged:
            tasks.setdefault(j.task, []).append(j.correct)
        settings.append({"steps": steps, "guidance": guidance, "accuracy": float(np.mean([j.correct for j in judged])),
                         "geneval_overall": float(np.mean([np.mean(v) for v in tasks.values()])),
                         "fd": frechet_distance(real, images, fd_model) if fd_model is not None else None})
    with open(os.path.join(folder, "config.json")) as f:
        train_cfg = json.load(f)
    mcfg = gen.model.config
    per_sample = forward_flops(mcfg, gen.resolution, context.shape[1])
    samples = train_cfg["max_steps"] * train_cfg["per_device_train_batch_size"] * train_cfg["gradient_accumulation_steps"]
    curve = val_curve(folder)
    return {"settings": settings, "val_curve": curve, "val_loss": curve[-1][1], "params": count_params(mcfg),
            "flops_per_sample": per_sample, "train_flops": 3 * per_sample * samples,  # backward ≈ 2 forwards
            "backbone": mcfg.backbone, "formulation": mcfg.formulation, "grid": images[:cfg.grid_prompts]}


def evaluated(run: Run, cfg: StudyConfig, fd_model) -> dict:
    folder = os.path.join(cfg.output_dir, "runs", run.key)
    settings = [cfg.prompts, cfg.n_prompts, cfg.steps, cfg.guidance, cfg.solver, cfg.fd_model, cfg.grid_prompts]
    key = hashlib.sha256(json.dumps([run.key, settings]).encode()).hexdigest()[:16]
    path = os.path.join(folder, f"judged-study-{key}.json")  # judged-*.json: cleared when the run is redone
    if os.path.isfile(path):
        with open(path) as f:
            return json.load(f)
    out = evaluate(folder, cfg, fd_model)
    save_grid(out.pop("grid"), path[:-5] + ".png", nrow=cfg.grid_prompts)
    out["grid_png"] = os.path.basename(path[:-5] + ".png")
    write_json(path, out)
    return out


def feature_model(cfg: StudyConfig):
    """The image–text model whose features FD uses (trained once when its folder is missing), or None."""
    if not cfg.fd_model:
        return None
    from reward.imagetext import ImageTextModel

    if not os.path.isdir(cfg.fd_model):
        cmd = command("reward.imagetext", cfg.fd_config, {"output": cfg.fd_model})
        run_cached(cmd, command_key(cmd, cfg.fd_config), cfg.fd_model + "-run", lambda: {}, tag="study")
    return ImageTextModel.from_pretrained(cfg.fd_model)


# ---------------------------------------------------------------------------------------------
# The study: per cell (variant, budget), means over seeds; the paper's analyses
# ---------------------------------------------------------------------------------------------


def summarize(cfg: StudyConfig, runs: list[Run], results: list[dict]) -> dict:
    cells = list(dict.fromkeys(r.cell for r in runs))
    by_cell = {c: [res for r, res in zip(runs, results) if r.cell == c] for c in cells}
    n_set = len(cfg.steps) * len(cfg.guidance)
    table = {}
    for c, rs in by_cell.items():
        e = rs[0]["eval"]
        table[c] = {"params": e["params"], "flops_per_sample": e["flops_per_sample"], "train_flops": e["train_flops"],
                    "backbone": e["backbone"], "formulation": e["formulation"],
                    "val_loss": stats.mean_ci([r["eval"]["val_loss"] for r in rs]),
                    "wall_s": float(np.mean([r["wall_s"] for r in rs])), "seeds": [r["seed"] for r in rs],
                    "settings": [{"steps": e["settings"][i]["steps"], "guidance": e["settings"][i]["guidance"],
                                  **{m: stats.mean_ci([r["eval"]["settings"][i][m] for r in rs])
                                     for m in ("accuracy", "fd") if e["settings"][i][m] is not None}}
                                 for i in range(n_set)]}
    out = {"name": cfg.name, "config": asdict(cfg), "cells": table,
           "runs": [{"cell": r.cell, "seed": r.seed, "key": r.key, "wall_s": res["wall_s"],
                     **res["eval"]} for r, res in zip(runs, results)]}
    n_seeds = min(len(rs) for rs in by_cell.values())
    metric = lambda m: np.array([[[s[m] if s[m] is not None else 0.0 for s in r["eval"]["settings"]]  # noqa: E731
                                  for r in by_cell[c][:n_seeds]] for c in cells])  # (cells, seeds, settings)
    if "ranking" in cfg.analyses:
        out["ranking"] = {"cells": cells, **stats.mean_rank_ci(metric("accuracy"), metric("fd"))}
    val = np.array([r["eval"]["val_loss"] for r in results])
    last = -1  # the correlations use the last setting: most steps, largest CFG scale
    acc = np.array([r["eval"]["settings"][last]["accuracy"] for r in results])
    out["correlation"] = {"setting": {k: results[0]["eval"]["settings"][last][k] for k in ("steps", "guidance")},
                          "val_loss_vs_accuracy": stats.pearson_ci(val, acc) if len(results) > 2 else None}
    if cfg.fd_model and len(results) > 2:
        out["correlation"]["val_loss_vs_fd"] = stats.pearson_ci(val, [r["eval"]["settings"][last]["fd"] for r in results])
    if "scaling" in cfg.analyses:
        out["scaling"] = {"fit": stats.power_law_fit([r["eval"]["train_flops"] for r in results], val),
                          "points": [[r["eval"]["train_flops"], r["eval"]["val_loss"]] for r in results]}
    return out


def table_lines(study: dict) -> list[str]:
    cfg = study["config"]
    last = len(cfg["steps"]) * len(cfg["guidance"]) - 1
    rank = dict(zip(study["ranking"]["cells"], zip(study["ranking"]["mean_rank"], study["ranking"]["ci95"]))) \
        if "ranking" in study else {}
    lines = [f"{'cell':28s} {'params':>8s} {'fwd GFLOP':>9s} {'val loss':>8s} {'accuracy':>9s} {'FD':>7s} {'mean rank [95% CI]':>20s}"]
    for c, e in study["cells"].items():
        s = e["settings"][last]
        fd = f"{s['fd']['mean']:7.3f}" if "fd" in s else f"{'–':>7s}"
        r = f"{rank[c][0]:.2f} [{rank[c][1][0]:.2f}, {rank[c][1][1]:.2f}]" if c in rank else "–"
        lines.append(f"{c:28s} {e['params'] / 1e6:7.2f}M {e['flops_per_sample'] / 1e9:9.3f} {e['val_loss']['mean']:8.4f} "
                     f"{s['accuracy']['mean']:9.1%} {fd} {r:>20s}")
    if "scaling" in study:
        f = study["scaling"]["fit"]
        ci = f.get("exponent_ci95", [float("nan")] * 2)
        lines.append(f"scaling: val loss = {f['c']:.3g}·FLOPs^{f['exponent']:.4f} (exponent 95% CI [{ci[0]:.4f}, "
                     f"{ci[1]:.4f}]), R² {f['r2']:.3f}")
    for k, v in study["correlation"].items():
        if k != "setting" and v:
            lines.append(f"Pearson r ({k}): {v['r']:+.3f} [{v['ci95'][0]:+.3f}, {v['ci95'][1]:+.3f}], n={v['n']}")
    return lines


@entry_point
def main(argv=None):
    from .study_report import write_report

    ap = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="a study YAML (configs/study/)")
    ap.add_argument("--output_dir")
    ap.add_argument("--seeds", type=int, nargs="+")
    ap.add_argument("--variants", nargs="+", help="run only these variants of the config")
    ap.add_argument("--run_index", type=int, help="train and evaluate only run i of the grid (a Slurm array task)")
    ap.add_argument("--list", action="store_true", help="print the runs (index, cell, seed, key, done) and exit")
    args = ap.parse_args(argv)
    cfg = load_config(args.config, {"output_dir": args.output_dir, "seeds": args.seeds})
    if args.variants:
        if missing := set(args.variants) - set(cfg.variants):
            raise InputError(f"--variants {sorted(missing)}: not in {args.config}")
        cfg.variants = {n: v for n, v in cfg.variants.items() if n in args.variants}
    runs = plan(cfg)
    if args.list:
        for i, r in enumerate(runs):
            folder = os.path.join(cfg.output_dir, "runs", r.key)
            state = "done" if cached_result(folder, r.key) else "started" if latest_checkpoint(folder) else "-"
            print(f"{i}\t{r.cell}\tseed {r.seed}\t{r.key}\t{state}")
        return
    if args.run_index is not None and not 0 <= args.run_index < len(runs):
        raise InputError(f"--run_index {args.run_index}: the study has runs 0…{len(runs) - 1}")
    todo = runs if args.run_index is None else [runs[args.run_index]]
    fd_model = feature_model(cfg)
    results = []
    for run in todo:
        res = train(run, cfg)
        results.append({**res, "eval": evaluated(run, cfg, fd_model)})
    if args.run_index is not None:
        return
    study = summarize(cfg, runs, results)
    write_json(os.path.join(cfg.output_dir, "study.json"), study, indent=1)
    write_report(study, cfg.output_dir, os.path.join(cfg.output_dir, "study.html"), table_lines(study))
    for line in table_lines(study):
        print(line)
    print(f"wrote {cfg.output_dir}/study.json and study.html")


if __name__ == "__main__":
    main()
