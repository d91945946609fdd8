"""GenEval-style scores of a checkpoint on shapes-world prompts, per task, with 95% intervals.

    python -m reward.score_checkpoint --checkpoint runs/toy/final --split heldout_prompts --n 600

Samples one image per scene (seed = the scene's seed) with the checkpoint's own text encoders
(through `adapters.load`, so CHECKPOINT+ADAPTER works too),
judges each with `reward.compositional`, prints a table and writes `scores.json` and a grid beside
the checkpoint (or in --output_dir).
"""

from __future__ import annotations

import argparse
import json
import math
import os

import torch

from base_model.cli import ArgumentParser
from base_model.errors import InputError, entry_point
from base_model.adapters import load
from base_model.sampling import add_sampler_args
from base_model.shapes import TASKS, make_split, save_grid

from .compositional import score


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (well-behaved at 0 and 1)."""
    if n == 0:
        return (0.0, 1.0)
    p = k / n
    centre, half = p + z * z / (2 * n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return ((centre - half) / (1 + z * z / n), (centre + half) / (1 + z * z / n))


@entry_point
def main(argv=None):
    ap = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--split", default="heldout_prompts")
    ap.add_argument("--n", type=int, default=600)
    add_sampler_args(ap)
    ap.add_argument("--shift", type=float, default=None, help="sampling shift (default: 1 for ours, an SD3 "
                                                              "folder's scheduler's)")
    ap.add_argument("--output_dir", default="")
    args = ap.parse_args(argv)

    loaded = load(args.checkpoint)  # a checkpoint, CHECKPOINT+ADAPTER or an SD3 folder
    if loaded.space.downsample != 1:
        raise InputError("--checkpoint: the compositional scorer judges pixel-space shapes-world models")
    scenes = make_split(args.split, args.n)
    images = loaded.generate([s.caption for s in scenes], [s.seed for s in scenes], steps=args.steps,
                             guidance=args.guidance, shift=args.shift, solver=args.solver)
    result = score(list(images), scenes)
    correct = torch.tensor(result["correct"])
    rows = {}
    for task in TASKS:
        sel = torch.tensor([s.task == task for s in scenes])
        k, n = int(correct[sel].sum()), int(sel.sum())
        rows[task] = {"accuracy": k / max(n, 1), "ci95": wilson(k, n), "n": n}
    out = {"checkpoint": args.checkpoint, "split": args.split, "n": args.n, "solver": args.solver, "steps": args.steps,
           "shift": loaded.shift if args.shift is None else args.shift,
           "guidance": args.guidance, "overall": result["overall"], "tasks": rows,
           "graded_mean": float(torch.tensor(result["graded"]).mean())}
    out_dir = args.output_dir or args.checkpoint
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "scores.json"), "w") as f:
        json.dump(out, f, indent=2)
    save_grid(images[:32], os.path.join(out_dir, "scored_samples.png"), nrow=8)
    print("| task | accuracy | 95% CI | n |\n|---|---|---|---|")
    for task, r in rows.items():
        print(f"| {task} | {r['accuracy']:.1%} | {r['ci95'][0]:.1%}–{r['ci95'][1]:.1%} | {r['n']} |")
    print(f"| **overall** (mean of tasks) | {out['overall']:.1%} | | {args.n} |")
    return out


if __name__ == "__main__":
    main()
