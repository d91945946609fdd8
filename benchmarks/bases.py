"""One recipe's gain over several bases (e.g. the toy preset pretrained with seeds 0, 1, 2).

    python benchmarks/bases.py runs/compare runs/compare-seed1 runs/compare-seed2 --method nft_r4_36

Each folder is the output of one `python -m align.compare` on one base (`--base B --output_dir D`), with
the same splits, prompts and training seeds. Reads the judged images it cached (no model runs) and prints,
per split, each base's accuracy, its per-seed gains and its gain with the comparison's CI, then the gain
pooled over bases: the mean of the bases' gains, with a 95% CI that resamples bases, then seeds, then
prompts (`align.compare.pooled_gain_ci`). How much a base moves a gain, next to how much a seed does.
"""

import argparse
import json
import os

import numpy as np

from align.compare import pooled_gain_ci, prompt_gains
from base_model.outputs import write_json


def read(path):
    with open(path) as f:
        return json.load(f)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("folders", nargs="+", help="align.compare output folders, one per base")
    ap.add_argument("--method", required=True)
    ap.add_argument("--json", help="also write the table's numbers here")
    args = ap.parse_args()
    configs = [read(os.path.join(d, "compare.json"))["config"] for d in args.folders]
    same = ("splits", "seeds", "n_prompts", "n_per_prompt")
    for d, c in zip(args.folders[1:], configs[1:]):
        for key in same:
            if c[key] != configs[0][key]:
                raise SystemExit(f"{d}: {key} {c[key]} differs from {args.folders[0]}'s {configs[0][key]}")
    cfg = configs[0]
    k = cfg["n_per_prompt"]
    out = {"method": args.method, "bases": [c["base"] for c in configs], "splits": {}}
    for split in cfg["splits"]:
        name = f"judged-{split}-{cfg['n_prompts']}x{k}.json"
        print(f"\n{args.method} on {split} ({cfg['n_prompts']} prompts × {k}, seeds {cfg['seeds']})\n")
        print("| base | base accuracy | gain per seed | gain [95% CI] |\n|---|---|---|---|")
        diffs, rows = [], []
        for d, c in zip(args.folders, configs):
            base = np.array(read(os.path.join(d, "base", name))["correct"], dtype=float)
            runs = [np.array(read(os.path.join(d, args.method, f"seed-{s}", name))["correct"], dtype=float)
                    for s in cfg["seeds"]]
            diffs.append(prompt_gains(base, runs, k))
            one = pooled_gain_ci(diffs[-1:])
            rows.append({"base": c["base"], "base_accuracy": float(base.mean()), **one})
            seeds = ", ".join(f"{100 * g:+.1f}" for g in one["per_seed"][0])
            print(f"| {c['base']} | {100 * base.mean():.1f}% | {seeds} | "
                  f"{100 * one['mean']:+.1f} [{100 * one['ci95'][0]:+.1f}, {100 * one['ci95'][1]:+.1f}] |")
        pooled = pooled_gain_ci(diffs)
        print(f"| **pooled over {len(diffs)} bases** | {100 * np.mean([r['base_accuracy'] for r in rows]):.1f}% | "
              f"spread of bases {100 * np.std(pooled['per_base']):.1f}, of seeds within a base "
              f"{100 * np.mean([np.std(s) for s in pooled['per_seed']]):.1f} (std) | "
              f"**{100 * pooled['mean']:+.1f} [{100 * pooled['ci95'][0]:+.1f}, {100 * pooled['ci95'][1]:+.1f}]** |")
        out["splits"][split] = {"per_base": rows, "pooled": pooled}
    if args.json:
        write_json(args.json, out, indent=2)


if __name__ == "__main__":
    main()
