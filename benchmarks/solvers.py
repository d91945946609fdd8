"""Which sampler to use: GenEval-style accuracy and time of Euler and midpoint settings on one checkpoint.

    python benchmarks/solvers.py --checkpoint runs/toy5/final --n 600 \
        euler:20:4 euler:10:4 euler:10:2 midpoint:5:2 midpoint:6:2 midpoint:6:3

Each setting is SOLVER:STEPS:GUIDANCE. Every setting samples the same held-out scenes with the
same seeds (one image each), so the accuracies compare pairwise; "model calls" counts velocity
evaluations per image (midpoint: two a step, one for the step into t = 0), each a CFG batch.
"""

import argparse
import time

import torch

from base_model.adapters import load
from base_model.shapes import make_split
from reward.compositional import score


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="a model spec (checkpoint or CHECKPOINT+ADAPTER)")
    ap.add_argument("--n", type=int, default=600, help="held-out scenes")
    ap.add_argument("settings", nargs="+", help="SOLVER:STEPS:GUIDANCE")
    args = ap.parse_args(argv)

    gen = load(args.checkpoint)
    scenes = make_split("heldout_prompts", args.n)
    cond = gen.text.encode([s.caption for s in scenes])
    single = torch.tensor([s.task == "single_object" for s in scenes])
    print(f"{args.checkpoint}: {args.n} held-out scenes, {torch.get_num_threads()} threads\n")
    print("| solver | steps | model calls | guidance | seconds | correct | single object | GenEval overall |")
    print("|---|---|---|---|---|---|---|---|")
    for setting in args.settings:
        solver, steps, guidance = setting.split(":")
        steps, guidance = int(steps), float(guidance)
        t0 = time.perf_counter()
        images = gen.generate(None, [s.seed for s in scenes], steps, guidance, batch_size=128, progress=False,
                              context=cond, solver=solver)
        seconds = time.perf_counter() - t0
        result = score(list(images), scenes)
        correct = torch.tensor(result["correct"], dtype=torch.float)
        calls = steps if solver == "euler" else 2 * steps - 1
        print(f"| {solver} | {steps} | {calls} | {guidance:g} | {seconds:.1f} | {correct.mean():.1%} "
              f"| {correct[single].mean():.1%} (n={int(single.sum())}) | {result['overall']:.1%} |", flush=True)


if __name__ == "__main__":
    main()
