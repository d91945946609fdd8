"""The whole pipeline on the built-in shapes world, each stage its real command (`make demo`).

    python -m align.demo                       # configs/demo/*.yaml → runs/demo/
    python -m align.demo --stages eval         # rerun one stage (the others' outputs are reused)

Stages: pretrain the toy MM-DiT → online alignment with LoRA, DiffusionNFT (`align.online --method
nft`: each round samples groups from the policy, the compositional scorer judges them, the better
and worse samples of each group are the positives and negatives) → its control, RAFT (the same
rounds, flow matching on the policy's own correct samples: SFT on winners) → evaluation of base,
NFT and RAFT on held-out prompts (same prompts and seeds) → `runs/demo/report.html` and a summary
with the time of each stage.
Every command is printed before it runs, so any stage can be rerun alone. `--override STAGE:FLAG=VALUE`
(repeatable) changes one flag of one stage, e.g. for a small run in tests.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time

from base_model.cli import ArgumentParser
from base_model.errors import InputError, entry_point

STAGES = ("pretrain", "nft", "raft", "eval")


def commands(configs: str, out: str) -> dict[str, list[str]]:
    base = f"{out}/pretrain/final"
    py = [sys.executable, "-m"]
    cmds = {
        "pretrain": py + ["base_model.pretrain", "--config", f"{configs}/pretrain.yaml", "--output_dir", f"{out}/pretrain"],
        "nft": py + ["align.online", "--config", f"{configs}/nft.yaml", "--base", base, "--output_dir", f"{out}/nft"],
        "raft": py + ["align.online", "--config", f"{configs}/raft.yaml", "--base", base, "--output_dir", f"{out}/raft"],
        "eval": py + ["reward.eval", "--config", f"{configs}/eval.yaml", "--model", f"base={base}",
                      "--model", f"nft={base}+{out}/nft/final", "--model", f"raft={base}+{out}/raft/final",
                      "--output_dir", f"{out}/eval"],
    }
    # The demo owns its folder: a rerun of a stage replaces that stage's earlier output.
    return {stage: cmd + ["--overwrite_output_dir"] for stage, cmd in cmds.items()}


def summary(out: str, times: dict) -> list[str]:
    with open(os.path.join(out, "eval", "results.json")) as f:
        res = json.load(f)
    lines = ["", "flowalign demo: held-out shapes-world prompts "
             f"({res['config']['n_prompts']} prompts × {res['config']['n_per_prompt']} seeds, same seeds per model)"]
    for name, m in res["models"].items():
        a = m["accuracy"]
        lines.append(f"  {name:5s} compositional accuracy {a['mean']:6.1%}  95% CI [{a['ci95'][0]:.1%}, {a['ci95'][1]:.1%}]"
                     f"   GenEval overall {m['geneval_overall']:.1%}"
                     + (f"   diversity {m['diversity']['mean']:.2f}" if "diversity" in m else "")
                     + ("  FLAGGED: collapsed" if m.get("collapsed") else ""))
    for key, pw in res["pairwise"].items():
        d, w = pw["accuracy_diff"], pw["compositional"]
        lines.append(f"  {key:12s} Δ accuracy {d['diff']:+.1%} [{d['ci95'][0]:+.1%}, {d['ci95'][1]:+.1%}]   "
                     f"win rate {w['win_rate']:.3f} [{w['ci95'][0]:.3f}, {w['ci95'][1]:.3f}] (ties half)")
    lines.append("  stage times: " + ", ".join(f"{k} {v:.0f} s" for k, v in times.items())
                 + f"; total {sum(times.values()) / 60:.1f} min")
    lines.append(f"  report: {os.path.join(out, 'report.html')}")
    return lines


@entry_point
def main(argv=None):
    ap = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default="configs/demo")
    ap.add_argument("--output_dir", default="runs/demo")
    ap.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    ap.add_argument("--override", action="append", default=[], help="STAGE:--flag=value (repeatable)")
    args = ap.parse_args(argv)
    cmds = commands(args.configs, args.output_dir)
    for o in args.override:
        stage, _, flag = o.partition(":")
        if stage not in cmds or not flag.startswith("--"):
            raise InputError(f"--override {o!r}: expected STAGE:--flag=value with STAGE in {STAGES}")
        cmds[stage] += flag.split("=", 1)
    os.makedirs(args.output_dir, exist_ok=True)
    times_file = os.path.join(args.output_dir, "stage_times.json")
    times = json.load(open(times_file)) if os.path.exists(times_file) else {}
    for stage in args.stages:
        print(f"\n[{stage}] {shlex.join(cmds[stage])}", flush=True)
        t0 = time.time()
        code = subprocess.run(cmds[stage]).returncode
        if code:
            raise SystemExit(f"demo stage {stage!r} failed (exit {code}); its message is above")
        times[stage] = time.time() - t0
        with open(times_file, "w") as f:
            json.dump(times, f, indent=2)
    shutil.copy(os.path.join(args.output_dir, "eval", "report.html"), os.path.join(args.output_dir, "report.html"))
    lines = summary(args.output_dir, {s: times[s] for s in STAGES if s in times})
    with open(os.path.join(args.output_dir, "summary.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
