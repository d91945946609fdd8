"""Evaluate models side by side on the same prompts and seeds: scores with CIs, win rates,
validation loss, `results.json` and `report.html`.

    python -m reward.eval --model base=runs/toy/final --model dpo=runs/toy/final+runs/dpo/final \
        --prompts heldout_prompts --n_prompts 200 --n_per_prompt 4 --output_dir runs/eval

A model is a spec of `base_model.adapters` (checkpoint, checkpoint+adapter, or adapter folder).
Prompts are a shapes-world split (scenes, so the compositional scorer reports per task) or a text
file, one prompt per line. Image j of prompt i has seed `seed + i·n_per_prompt + j` for every
model, so images compare pairwise. The first model is the reference of the win rates and of the
collapse audit: a model whose images of one prompt all look alike (mean pairwise 1 − cos of their
thumbnail features below `--diversity_floor` × the reference's) is flagged, whatever its accuracy.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from base_model.adapters import load, split_spec
from base_model.cli import ArgumentParser, parse_with_config
from base_model.errors import InputError, entry_point
from base_model.outputs import check_output_dir
from base_model.data import shapes_data, to_model_space
from base_model.features import copy_threshold, thumbnail
from base_model.flow import validation_loss
from base_model.formulations import as_velocity
from base_model.sampling import GUIDANCE, SOLVER, STEPS, add_sampler_args
from base_model.shapes import TASKS
from base_model.sources import read_prompts

from . import compositional, memorization, stats
from .scorers import get_scorer


@dataclass
class EvalConfig:
    models: list[tuple[str, str]]  # (name, spec)
    prompts: str = "heldout_prompts"
    n_prompts: int = 200
    n_per_prompt: int = 4
    scorers: list[str] = field(default_factory=lambda: ["compositional"])
    solver: str = SOLVER
    steps: int = STEPS
    guidance: float = GUIDANCE
    shift: float = 1.0
    height: int = 0  # pixels; 0: each model's training resolution
    width: int = 0
    seed: int = 0
    val_images: int = 256  # shapes-world validation images for the 8-level validation loss (0: skip)
    batch_size: int = 256
    report_prompts: int = 48  # prompts shown in the report's image grid
    output_dir: str = "runs/eval"
    report_to: str = "none"
    # memorization audit (reward.memorization)
    memorization: bool = False  # match every generation to its nearest --train_data image
    train_data: str = ""  # what the models trained on: "shapes", an image–caption dataset or a cache
    train_num_images: int = 50_000  # shapes world: how many train-split scenes (pretrain's --num_train)
    train_image_column: str = "image"
    feature_model: str = "thumbnail"  # base_model.features: "thumbnail", a TorchScript file (SSCD), an image tower
    feature_resolution: int = 288  # images are resized to this side for the features (SSCD: 288)
    memorization_threshold: float = 0.0  # cosine ≥ this to the nearest training image is a copy; 0: the
    #                                      feature's default (base_model.features.copy_threshold)
    closest_pairs: int = 8  # per model, shown in the report
    # mode-collapse audit: each prompt's images compared by thumbnail features (base_model.features);
    # a model whose mean diversity falls below this × the reference's (the first model) is flagged
    diversity_floor: float = 0.5


def generate(spec: str, captions: list[str], cfg: EvalConfig):
    """Images (P·K, 3, H, W) in [-1, 1] and the 8-level validation loss (pixel-space models) of one model."""
    gen = load(spec, sample_shift=cfg.shift)
    k = cfg.n_per_prompt
    context, pooled = gen.text.encode(captions)
    rep = torch.arange(len(captions)).repeat_interleave(k)
    seeds = [cfg.seed + i for i in range(len(captions) * k)]
    images = gen.generate(None, seeds, cfg.steps, cfg.guidance, batch_size=cfg.batch_size,
                          context=(context[rep], pooled[rep]), solver=cfg.solver, height=cfg.height, width=cfg.width)
    val = None
    if cfg.val_images and gen.image_space == "pixels":
        data, _ = shapes_data("val", cfg.val_images, gen.model.config.sample_size)
        velocity = as_velocity(gen.model, gen.model.config.formulation)  # rf velocity loss for every formulation
        val = validation_loss(velocity, to_model_space(data.images), gen.text.encode(data.captions), seed=cfg.seed)
    return images, val


def evaluate(cfg: EvalConfig) -> dict:
    captions, scenes = read_prompts(cfg.prompts, cfg.n_prompts)
    k = cfg.n_per_prompt
    groups = np.repeat(np.arange(len(captions)), k)  # bootstrap resamples prompts
    targets = [s for s in scenes for _ in range(k)] if scenes else [c for c in captions for _ in range(k)]
    out = {"config": {**asdict(cfg), "models": dict(cfg.models)}, "models": {}, "pairwise": {}}
    images, per_image = {}, {}
    train = None
    if cfg.memorization:  # embedded once, before any sampling: a bad --train_data stops here
        train = memorization.TrainingSet(cfg.train_data, cfg.feature_model, cfg.feature_resolution,
                                         cfg.train_num_images, cfg.train_image_column, cfg.batch_size)
    for name, spec in cfg.models:
        t0 = time.time()
        images[name], val = generate(spec, captions, cfg)
        scores = {s: get_scorer(s)(images[name], targets).numpy() for s in cfg.scorers if s != "compositional"}
        m = {"sampling_s": time.time() - t0, "scores": {}}
        if "compositional" in cfg.scorers:
            judged = [compositional.judge(img, tgt if scenes else compositional.scene_from_caption(tgt))
                      for img, tgt in zip(images[name], targets)]
            correct = np.array([j.correct for j in judged], dtype=float)
            scores["compositional"] = np.array([j.graded for j in judged])
            tasks = [j.task for j in judged]
            m["accuracy"] = stats.mean_ci(correct, groups)
            m["tasks"] = {t: stats.mean_ci(correct[[x == t for x in tasks]], groups[[x == t for x in tasks]])
                          for t in TASKS if t in tasks}
            m["geneval_overall"] = float(np.mean([v["mean"] for v in m["tasks"].values()]))
            per_image[name] = {"correct": correct, "explain": [j.reason for j in judged], "tasks": tasks}
        for s, v in scores.items():
            m["scores"][s] = stats.mean_ci(v, groups)
        if k > 1:
            m["diversity"] = stats.mean_ci(stats.group_diversity(thumbnail(images[name]).numpy(), k))  # one value a prompt
        if val is not None:
            m["val_loss"] = val
        per_image.setdefault(name, {})["scores"] = scores
        if train is not None:
            cos, nearest = train.nearest(images[name], cfg.batch_size)
            m["memorization"] = {**memorization.audit(cos, groups, copy_threshold(cfg.feature_model, cfg.memorization_threshold)),
                                 "closest": memorization.closest_pairs(cos, nearest, train.source.rows,
                                                                       cfg.closest_pairs)}
            per_image[name]["train_images"] = train.source.read([c["train_position"] for c in
                                                                 m["memorization"]["closest"]])[1]
        out["models"][name] = m
    ref = cfg.models[0][0]
    if "diversity" in out["models"][ref]:
        floor = cfg.diversity_floor * out["models"][ref]["diversity"]["mean"]
        for name, _ in cfg.models[1:]:
            out["models"][name]["collapsed"] = out["models"][name]["diversity"]["mean"] < floor
    for name, _ in cfg.models[1:]:
        pw = {}
        for s in per_image[ref]["scores"]:
            pw[s] = stats.win_rate(per_image[ref]["scores"][s], per_image[name]["scores"][s], groups)
        if "correct" in per_image[ref]:
            pw["accuracy_diff"] = stats.paired_diff(per_image[ref]["correct"], per_image[name]["correct"], groups)
        out["pairwise"][f"{name}_vs_{ref}"] = pw
    if len(cfg.models) > 2 and cfg.scorers:
        primary = cfg.scorers[0]
        names = [n for n, _ in cfg.models]
        comps = []
        for a in range(len(names)):
            for b in range(a + 1, len(names)):
                sa, sb = per_image[names[a]]["scores"][primary], per_image[names[b]]["scores"][primary]
                comps += [(a, b, 1.0 if x > y else 0.0 if x < y else 0.5) for x, y in zip(sa, sb)]
        bt = stats.bradley_terry_ci(comps, len(names))
        out["bradley_terry"] = {"scorer": primary, "models": names, **bt}
    os.makedirs(cfg.output_dir, exist_ok=True)
    with open(os.path.join(cfg.output_dir, "results.json"), "w") as f:
        json.dump(out, f, indent=2, default=_json)
    from .report import write_report

    write_report(out, images, per_image, captions, cfg, os.path.join(cfg.output_dir, "report.html"))
    return out


def _json(x):
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    raise TypeError(type(x))


def summary_lines(out: dict) -> list[str]:
    lines, ref = [], next(iter(out["models"]), None)
    for name, m in out["models"].items():
        if "accuracy" in m:
            a = m["accuracy"]
            lines.append(f"{name}: compositional accuracy {a['mean']:.1%} [{a['ci95'][0]:.1%}, {a['ci95'][1]:.1%}]"
                         f", GenEval overall {m['geneval_overall']:.1%}")
        if "diversity" in m:
            d = m["diversity"]
            lines.append(f"{name}: diversity {d['mean']:.3f} [{d['ci95'][0]:.3f}, {d['ci95'][1]:.3f}]"
                         + (f" FLAGGED: collapsed, below {out['config']['diversity_floor']} × {ref}'s" if m.get("collapsed") else ""))
        if "memorization" in m:
            c = m["memorization"]["copy_rate"]
            lines.append(f"{name}: copies of training images {c['mean']:.1%} [{c['ci95'][0]:.1%}, {c['ci95'][1]:.1%}]"
                         f" (cosine ≥ {m['memorization']['threshold']}, {c['n']} images)")
    for key, pw in out["pairwise"].items():
        if "accuracy_diff" in pw:
            d = pw["accuracy_diff"]
            lines.append(f"{key}: Δ accuracy {d['diff']:+.1%} [{d['ci95'][0]:+.1%}, {d['ci95'][1]:+.1%}]")
        for s, w in pw.items():
            if s != "accuracy_diff":
                lines.append(f"{key}: win rate ({s}) {w['win_rate']:.3f} [{w['ci95'][0]:.3f}, {w['ci95'][1]:.3f}]"
                             f" W/T/L {w['wins']}/{w['ties']}/{w['losses']}, sign test p={w['sign_test_p']:.3g}")
    return lines


@entry_point
def main(argv=None):
    ap = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", action="append", required=True, help="NAME=SPEC; the first is the reference")
    ap.add_argument("--prompts", default="heldout_prompts")
    ap.add_argument("--n_prompts", type=int, default=200)
    ap.add_argument("--n_per_prompt", type=int, default=4)
    ap.add_argument("--scorers", nargs="+", default=["compositional"])
    add_sampler_args(ap)
    ap.add_argument("--shift", type=float, default=1.0)
    ap.add_argument("--height", type=int, default=0, help="pixels; 0: each model's training resolution")
    ap.add_argument("--width", type=int, default=0, help="pixels; 0: each model's training resolution")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--val_images", type=int, default=256)
    ap.add_argument("--diversity_floor", type=float, default=0.5,
                    help="flag a model whose per-prompt diversity falls below this × the first model's (collapse)")
    ap.add_argument("--report_prompts", type=int, default=48)
    ap.add_argument("--output_dir", default="runs/eval")
    ap.add_argument("--report_to", default="none", choices=["none", "wandb"])
    ap.add_argument("--overwrite_output_dir", action="store_true", help="replace the results already in --output_dir")
    audit = ap.add_argument_group("memorization audit (reward.memorization)")
    audit.add_argument("--memorization", action="store_true", help="match each generation to its nearest training image")
    audit.add_argument("--train_data", default="", help='"shapes", an image–caption dataset, or a precomputed cache')
    audit.add_argument("--train_num_images", type=int, default=50_000, help="shapes world: train-split scenes")
    audit.add_argument("--train_image_column", default="image")
    audit.add_argument("--feature_model", default="thumbnail", help="thumbnail, a TorchScript file (SSCD) or an "
                                                                      "image–text model folder")
    audit.add_argument("--feature_resolution", type=int, default=288)
    audit.add_argument("--memorization_threshold", type=float, default=0.0,
                       help="0: the feature's default (0.5 for SSCD and image towers, 0.9 for thumbnail)")
    audit.add_argument("--closest_pairs", type=int, default=8)
    args = parse_with_config(ap, argv)
    if args.memorization and not args.train_data:
        raise InputError("--memorization needs --train_data: the data the models were trained on")
    models = []
    for m in args.model:
        name, sep, spec = m.partition("=")
        if not sep or not name or not spec:
            raise InputError(f"--model {m!r}: expected NAME=SPEC, e.g. base=runs/toy/final")
        split_spec(spec)  # every model is checked before the first is sampled
        models.append((name, spec))
    if len(dict(models)) != len(models):
        raise InputError(f"--model: names must differ, got {[n for n, _ in models]}")
    check_output_dir(args.output_dir, args.overwrite_output_dir)  # before hours of sampling, not after
    cfg = EvalConfig(models=models, **{k: v for k, v in vars(args).items()
                                       if k not in ("model", "config", "overwrite_output_dir")})
    out = evaluate(cfg)
    for line in summary_lines(out):
        print(line)
    if cfg.report_to == "wandb":
        _log_wandb(out, cfg)
    print(f"wrote {cfg.output_dir}/results.json and report.html")
    return out


def flat_metrics(out: dict) -> dict[str, float]:
    """Every number of `results.json` that a tracker charts, as "model/metric" keys with CI bounds."""
    flat = {}

    def put(key, d, mean="mean"):
        flat[key] = d[mean]
        flat[f"{key}_ci_low"], flat[f"{key}_ci_high"] = d["ci95"]

    for name, m in out["models"].items():
        if "accuracy" in m:
            put(f"{name}/accuracy", m["accuracy"])
            flat[f"{name}/geneval_overall"] = m["geneval_overall"]
            for task, d in m["tasks"].items():
                put(f"{name}/tasks/{task}", d)
        for s, d in m["scores"].items():
            put(f"{name}/{s}", d)
        if "val_loss" in m:
            flat[f"{name}/val_loss"] = m["val_loss"]["loss"]
        if "diversity" in m:
            put(f"{name}/diversity", m["diversity"])
        if "memorization" in m:
            put(f"{name}/copy_rate", m["memorization"]["copy_rate"])
    for key, pw in out["pairwise"].items():
        for s, d in pw.items():
            if s == "accuracy_diff":
                put(f"{key}/accuracy_diff", d, mean="diff")
            else:
                put(f"{key}/win_rate/{s}", d, mean="win_rate")
    return flat


def _log_wandb(out, cfg):
    import wandb

    os.environ.setdefault("WANDB_MODE", "online" if os.environ.get("WANDB_API_KEY") else "offline")
    run = wandb.init(project="flowalign-eval", config=out["config"], dir=cfg.output_dir)
    run.log(flat_metrics(out))
    with open(os.path.join(cfg.output_dir, "report.html")) as f:
        run.log({"report": wandb.Html(f.read())})
    run.finish()


if __name__ == "__main__":
    main()
