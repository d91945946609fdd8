"""GenEval-style scores of one model on shapes-world prompts, per task, with 95% intervals: a
shorthand for `reward.eval` with one model, one image per prompt and the compositional judge.

    python -m reward.score_checkpoint --checkpoint runs/toy/final --split heldout_prompts --n 600

Image i has the seed of scene i of the split (`shapes.SPLIT_OFFSETS[split] + i`), as this command
always drew them. `--checkpoint` is any spec of `base_model.adapters` (CHECKPOINT+ADAPTER, an SD3
folder). Prints a table of the tasks and writes `reward.eval`'s `results.json` and `report.html`
beside the weights scored (the adapter's folder, else the checkpoint's), or in --output_dir.
"""

from __future__ import annotations

import argparse

from base_model.adapters import split_spec
from base_model.cli import ArgumentParser
from base_model.errors import entry_point
from base_model.sampling import add_sampler_args
from base_model.shapes import SPLIT_OFFSETS

from .eval import EvalConfig, evaluate

NAME = "checkpoint"  # the model's name in results.json


def task_table(m: dict) -> list[str]:
    """A markdown table of a model's per-task accuracy in `reward.eval`'s results."""
    lines = ["| task | accuracy | 95% CI | n |", "|---|---|---|---|"]
    for task, r in m["tasks"].items():
        lines.append(f"| {task} | {r['mean']:.1%} | {r['ci95'][0]:.1%}–{r['ci95'][1]:.1%} | {r['n']} |")
    lines.append(f"| **overall** (mean of tasks) | {m['geneval_overall']:.1%} | | {m['accuracy']['n']} |")
    return lines


@entry_point
def main(argv=None):
    ap = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--split", default="heldout_prompts", choices=list(SPLIT_OFFSETS))
    ap.add_argument("--n", type=int, default=600)
    add_sampler_args(ap)
    ap.add_argument("--shift", type=float, default=1.0, help="sampling shift of our checkpoints (SD3 folders "
                                                             "sample with their scheduler's)")
    ap.add_argument("--output_dir", default="")
    args = ap.parse_args(argv)

    base, adapter = split_spec(args.checkpoint)  # checked before anything is loaded
    cfg = EvalConfig(models=[(NAME, args.checkpoint)], prompts=args.split, n_prompts=args.n, n_per_prompt=1,
                     scorers=["compositional"], solver=args.solver, steps=args.steps, guidance=args.guidance,
                     shift=args.shift, seed=SPLIT_OFFSETS[args.split], val_images=0,
                     output_dir=args.output_dir or adapter or base)  # beside the weights scored
    out = evaluate(cfg)
    print("\n".join(task_table(out["models"][NAME])))
    return out


if __name__ == "__main__":
    main()
