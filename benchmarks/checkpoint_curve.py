"""Accuracy of an online run's policy at each of its checkpoints: does a longer run keep gaining?

    python benchmarks/checkpoint_curve.py runs/toy-seed1/final runs/tune-seed1/nft_r4_r48/seed-0 --split val

An `align.online` checkpoint (`checkpoint-N/model.safetensors`) holds the whole LoRA model's state, the
policy's adapter ("default") beside NFT's old one. For each checkpoint, the policy's LoRA factors are
written as a PEFT adapter folder (the run's `final/` config files beside them) and judged with
`align.compare.judge` on the same prompts and seeds as the comparison (200 prompts × 4 by default), then
`final/` itself. Prints round, accuracy and gain over the base, and writes them to `--json` if given.
"""

import argparse
import json
import os
import re
import shutil
import tempfile

import torch
from safetensors.torch import load_file, save_file

from align.compare import judge
from base_model.outputs import write_json


def policy_adapter(checkpoint: str, final: str, folder: str) -> str:
    """A PEFT adapter folder with the policy's ("default") LoRA factors of an align.online checkpoint."""
    state = load_file(os.path.join(checkpoint, "model.safetensors"))
    lora = {k.replace(".default.", "."): v for k, v in state.items() if "lora_" in k and ".default." in k}
    if not lora:
        raise SystemExit(f"{checkpoint}: no LoRA factors of the 'default' adapter in model.safetensors")
    shutil.copytree(final, folder)
    save_file(lora, os.path.join(folder, "adapter_model.safetensors"))
    return folder


def accuracy(spec: str, split: str, n: int, k: int) -> float:
    correct = judge(spec, split, n, k)["correct"]
    return 100.0 * sum(correct) / len(correct)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("base", help="the run's base (checkpoint folder)")
    ap.add_argument("run", help="an align.online output folder with checkpoint-N/ and final/")
    ap.add_argument("--split", default="val")
    ap.add_argument("--n_prompts", type=int, default=200)
    ap.add_argument("--n_per_prompt", type=int, default=4)
    ap.add_argument("--json", help="also write the table's numbers here")
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    final = os.path.join(args.run, "final")
    rounds = sorted(int(m.group(1)) for d in os.listdir(args.run) if (m := re.fullmatch(r"checkpoint-(\d+)", d)))
    n, k = args.n_prompts, args.n_per_prompt
    base = accuracy(args.base, args.split, n, k)
    rows = []
    print(f"{args.split}, {n} prompts × {k}; base {base:.1f}%\n| round | accuracy | gain |\n|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for r in rounds:
            folder = policy_adapter(os.path.join(args.run, f"checkpoint-{r}"), final, os.path.join(tmp, str(r)))
            rows.append({"round": r, "accuracy": accuracy(f"{args.base}+{folder}", args.split, n, k)})
            print(f"| {r} | {rows[-1]['accuracy']:.1f}% | {rows[-1]['accuracy'] - base:+.1f} |", flush=True)
    with open(os.path.join(args.run, "log.jsonl")) as f:
        last = max(json.loads(line).get("round", 0) for line in f if line.strip())
    if last not in rounds:
        rows.append({"round": last, "accuracy": accuracy(f"{args.base}+{final}", args.split, n, k)})
        print(f"| {last} (final) | {rows[-1]['accuracy']:.1f}% | {rows[-1]['accuracy'] - base:+.1f} |")
    if args.json:
        write_json(args.json, {"base": args.base, "run": args.run, "split": args.split, "n_prompts": n,
                               "n_per_prompt": k, "base_accuracy": base, "rounds": rows})


if __name__ == "__main__":
    main()
