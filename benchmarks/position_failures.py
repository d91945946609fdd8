"""Why position prompts fail: a missing or wrong object, or only the relation.

    python benchmarks/position_failures.py runs/toy/final runs/toy/final+runs/compare/nft_r4_36/seed-0/final

For each model spec (as every `--model` flag takes it), the first `--n_prompts` position prompts of a
shapes-world split × `--n_per_prompt` images (the comparison's sampler: 5 midpoint steps, CFG 2), each
judged by the compositional checker and tallied: correct; "relation only" (both objects right, the
relation wrong); "objects" (a requested object missing or wrong, whatever the relation). Then the share of
images with both objects right whose relation holds, and the mean over those images of how far the first object
sits toward the asked side of the second (`relation_reward.toward`: the shrunk, normalised centre offset along
the asked direction, in [-1, 1]; the relation holds above 0.5): near 0 when the model ignores the relation word.
"""

import argparse
import collections

import torch

from base_model.adapters import load
from base_model.sources import read_prompts
from reward import compositional
from relation_reward import toward


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("models", nargs="+")
    ap.add_argument("--split", default="val")
    ap.add_argument("--n_prompts", type=int, default=150)
    ap.add_argument("--n_per_prompt", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    captions, scenes = read_prompts(args.split, 8 * args.n_prompts)
    position = [(c, s) for c, s in zip(captions, scenes) if s.task == "position"][:args.n_prompts]
    if len(position) < args.n_prompts:
        raise SystemExit(f"{args.split}: only {len(position)} position prompts among its first {8 * args.n_prompts} scenes")
    caps = [c for c, _ in position for _ in range(args.n_per_prompt)]
    scns = [s for _, s in position for _ in range(args.n_per_prompt)]
    print(f"{len(position)} position prompts of {args.split} × {args.n_per_prompt}\n")
    print("| model | correct | relation only | objects | relation holds when both objects are right | toward the asked side |\n"
          "|---|---|---|---|---|---|")
    for spec in args.models:
        model = load(spec)
        images = model.generate(caps, range(len(caps)), steps=5, guidance=2.0, solver="midpoint", progress=False,
                                batch_size=256)
        tally, along = collections.Counter(), []
        for image, scene in zip(images, scns):
            j = compositional.judge(image, scene)
            only_relation = j.reason.startswith("not ") and ";" not in j.reason
            tally["correct" if j.correct else "relation only" if only_relation else "objects"] += 1
            if j.correct or only_relation:
                a, b = compositional.first_matches(scene, list(j.detections))
                along.append(toward(a.box, b.box, scene.relation))
        both = tally["correct"] + tally["relation only"]
        print(f"| {spec} | {tally['correct']} | {tally['relation only']} | {tally['objects']} | "
              f"{tally['correct'] / max(both, 1):.0%} | {sum(along) / max(len(along), 1):+.2f} |")


if __name__ == "__main__":
    main()
