"""Preference pairs in the Pick-a-Pic v2 schema: loading them, and making them on-policy.

One format for every pair: a `datasets.Dataset` with Pick-a-Pic's columns (`caption`, `jpg_0`,
`jpg_1` as encoded image bytes, `label_0`, `label_1`, and where known `model_0`, `model_1`,
`user_id`, `ranking_id`, `image_0_uid`, `image_1_uid`, `best_image_uid`, `has_label`,
`are_different`), saved with `save_to_disk` or as parquet. On-policy pairs add `seed_0`,
`seed_1`, `score_0`, `score_1`.

    python -m align.pairs --base runs/toy/final --prompts train --n_prompts 400 --k 8 \
        --reward compositional --rule threshold --output runs/pairs
"""

from __future__ import annotations

import argparse
import json
import os

import torch

from base_model.errors import InputError, entry_point
from base_model.pickapic import (REQUIRED, Pairs, encode_png, load_pairs, pairs_dataset,  # noqa: F401 (re-exported)
                                 write_pairs)
from base_model.sampling import GUIDANCE, SOLVER, STEPS, add_sampler_args
from base_model.sources import read_prompts

# ---------------------------------------------------------------------------------------------
# On-policy pairs (AI feedback): sample K per prompt, score, keep winner/loser pairs
# ---------------------------------------------------------------------------------------------


def choose_pairs(scores: torch.Tensor, rule: str = "threshold", threshold: float = 1.0, margin: float = 0.0,
                 max_pairs: int = 3) -> list[tuple[int, int]]:
    """Winner/loser indices among one prompt's K scores.
    `threshold`: a winner scores ≥ threshold and a loser below it (for the compositional reward,
    threshold 1.0 is correct vs incorrect); pairs the best winners with the worst losers, at most
    `max_pairs`, each image used once. `best_worst`: the best vs the worst if they differ by > margin."""
    order = torch.argsort(scores, descending=True, stable=True).tolist()
    if rule == "best_worst":
        best, worst = order[0], order[-1]
        return [(best, worst)] if scores[best] - scores[worst] > margin else []
    if rule != "threshold":
        raise InputError(f"unknown pair rule {rule!r}; choose 'threshold' or 'best_worst'")
    winners = [i for i in order if scores[i] >= threshold]
    losers = [i for i in reversed(order) if scores[i] < threshold and scores[i] <= threshold - margin]
    return list(zip(winners, losers))[:max_pairs]


def on_policy_pairs(gen, prompts: list[str], k: int, reward: str, rule: str = "threshold",
                    threshold: float = 1.0, margin: float = 0.0, max_pairs: int = 3, steps: int = STEPS,
                    guidance: float = GUIDANCE, seed: int = 0, model_name: str = "policy",
                    batch_size: int = 256, solver: str = SOLVER) -> tuple[list[dict], dict]:
    """Sample K images per prompt from `gen` (a `base_model.adapters.Loaded`; seed = seed + prompt·K + j,
    recorded), score them, pick pairs. Returns (Pick-a-Pic rows, {"summary", "scores", "seeds"})."""
    from base_model.shapes import to_uint8
    from reward.scorers import get_scorer

    score_fn = get_scorer(reward)
    context, pooled = gen.text.encode(prompts)
    rep = torch.arange(len(prompts)).repeat_interleave(k)
    seeds = [seed + i for i in range(len(prompts) * k)]
    images = gen.generate(None, seeds, steps, guidance, batch_size=batch_size, context=(context[rep], pooled[rep]),
                          solver=solver)
    scores = score_fn(images, [prompts[i] for i in rep.tolist()]).view(len(prompts), k)
    rows = []
    for p, caption in enumerate(prompts):
        for w, l in choose_pairs(scores[p], rule, threshold, margin, max_pairs):
            iw, il = p * k + w, p * k + l
            rows.append({"caption": caption, "jpg_0": encode_png(to_uint8(images[iw])),
                         "jpg_1": encode_png(to_uint8(images[il])), "label_0": 1.0, "label_1": 0.0,
                         "model_0": model_name, "model_1": model_name, "ranking_id": p,
                         "image_0_uid": str(seeds[iw]), "image_1_uid": str(seeds[il]),
                         "best_image_uid": str(seeds[iw]), "seed_0": seeds[iw], "seed_1": seeds[il],
                         "score_0": float(scores[p, w]), "score_1": float(scores[p, l])})
    summary = {"prompts": len(prompts), "k": k, "pairs": len(rows), "reward": reward,
               "mean_score": float(scores.mean()), "prompts_with_pair": len({r["ranking_id"] for r in rows})}
    return rows, {"summary": summary, "scores": scores.tolist(), "seeds": seeds}


@entry_point
def main(argv=None):
    from base_model.adapters import load
    from base_model.cli import ArgumentParser, parse_with_config
    from base_model.pickapic import check_replaceable

    ap = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", required=True, help="checkpoint, or CHECKPOINT+ADAPTER")
    ap.add_argument("--prompts", default="train", help="a shapes-world split name or a text file")
    ap.add_argument("--n_prompts", type=int, default=400)
    ap.add_argument("--prompt_offset", type=int, default=0, help="skip this many prompts of the split or file")
    ap.add_argument("--k", type=int, default=8, help="samples per prompt")
    ap.add_argument("--reward", default="compositional")
    ap.add_argument("--rule", default="threshold", choices=["threshold", "best_worst"])
    ap.add_argument("--threshold", type=float, default=1.0)
    ap.add_argument("--margin", type=float, default=0.0)
    ap.add_argument("--max_pairs_per_prompt", type=int, default=3)
    add_sampler_args(ap)
    ap.add_argument("--seed", type=int, default=1_000_000)
    ap.add_argument("--output", required=True)
    ap.add_argument("--overwrite_output_dir", action="store_true", help="replace pairs already at --output")
    args = parse_with_config(ap, argv)
    check_replaceable(os.path.normpath(args.output), args.overwrite_output_dir)  # before any sampling

    prompts, _ = read_prompts(args.prompts, args.n_prompts, args.prompt_offset)
    gen = load(args.base)
    rows, info = on_policy_pairs(gen, prompts, args.k, args.reward,
                                 args.rule, args.threshold, args.margin, args.max_pairs_per_prompt,
                                 args.steps, args.guidance, seed=args.seed, model_name=args.base,
                                 solver=args.solver)
    if not rows:
        raise InputError(f"no pair met the rule {args.rule!r}: {info['summary']}")
    write_pairs(rows, args.output, {**info, "args": vars(args)}, args.overwrite_output_dir)
    print(json.dumps(info["summary"]))


if __name__ == "__main__":
    main()
