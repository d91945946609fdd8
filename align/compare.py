"""Which alignment method pays: every method on one base, several training seeds, held-out prompts.

    python -m align.compare --config configs/compare/toy.yaml

Each entry of `methods` is a training command (`align.online`, or `align.dpo` on the offline pairs
this driver makes once with `align.pairs`) run once per seed with `--seed S`, or `best_of_n`, the
inference-time baseline: N samples of the base per image, the reward picks one, with N set so that it
spends the reward calls of the method it names. Every model is judged by the exact compositional
checker on the same prompts and seeds (image j of prompt i has seed i·k + j) of each split.

Runs are cached: a run whose folder holds `result.json` for the same command is not run again, so
the comparison resumes where it stopped. Writes `compare.json` (per method and split: mean accuracy,
the gain over the base with a 95% CI from a bootstrap over seeds and prompts, reward calls, training
seconds; GenEval's overall, the unweighted mean of the task accuracies, and each task's gain, with CIs) and
`compare.html` (the tables and plots of accuracy against reward calls and wall time).
Settings are tuned on `val` only; the reported splits are never used to choose them.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from base_model.cli import ArgumentParser, read_yaml
from base_model.errors import InputError, entry_point
from base_model.outputs import write_json, write_text
from base_model.runs import again_flags, command, command_key, run_cached
from reward.stats import group_diversity, mean_ci


@dataclass
class CompareConfig:
    base: str  # the checkpoint every method starts from
    methods: dict  # name → {module, config, flags} or {best_of_n: METHOD}
    output_dir: str = "runs/compare"
    name: str = "compare"  # → output_dir/NAME.json and NAME.html (comparisons can share a folder and its cache)
    seeds: list = field(default_factory=lambda: [0, 1, 2])
    splits: list = field(default_factory=lambda: ["heldout_prompts", "heldout_combos"])
    n_prompts: int = 200
    n_per_prompt: int = 4
    pairs: dict = field(default_factory=dict)  # flags of align.pairs for the offline methods
    reward: str = "compositional"  # the reward best-of-N selects with
    audit_model: str = "runs/reward/imagetext"  # in-project image–text model: the audit's features and proxy
    audit_config: str = "configs/reward/imagetext.yaml"  # how to train it when the folder is missing
    diversity_floor: float = 0.5  # flag a method whose diversity falls below this × the base's
    fd_ceiling: float = 2.0  # flag a method whose FD to real renders grows past this × the base's
    # memorization audit (reward.memorization) on the first split: the nearest pretraining image of each
    # generation by copy-detection features. The reference is fresh renders of the same scenes: a method is
    # flagged when more of its images are copies than of the renders, i.e. beyond the data's own repeats
    train_data: str = "shapes"  # what the base was pretrained on ("" skips the audit): reward.eval --train_data
    train_num_images: int = 20_000  # the base's --num_train for the shapes world
    feature_model: str = "thumbnail"  # base_model.features; its default copy threshold applies
    feature_resolution: int = 32
    copy_margin: float = 0.05  # flag a share of copies above the renders' share + this


def load_config(path: str, overrides: dict) -> CompareConfig:
    raw = read_yaml(path)
    raw.update({k: v for k, v in overrides.items() if v is not None})
    try:
        cfg = CompareConfig(**raw)
    except TypeError as e:
        raise InputError(f"{path}: {e}") from e
    for name, m in cfg.methods.items():
        keys = set(m)
        if "best_of_n" in m:
            if m["best_of_n"] not in cfg.methods:
                raise InputError(f"{path}: methods.{name}.best_of_n names {m['best_of_n']!r}, not a method")
        elif not keys <= {"module", "config", "flags", "guidance"} or "module" not in keys:
            raise InputError(f"{path}: methods.{name} needs 'module' (and optionally 'config', 'flags', 'guidance'); "
                             f"got {sorted(keys)}")
    return cfg


# ---------------------------------------------------------------------------------------------
# Judging: per-image correctness on a split, the same seeds for every model
# ---------------------------------------------------------------------------------------------


def judge(spec: str, split: str, n_prompts: int, k: int, best_of: int = 1, reward: str = "compositional",
          audit_model: str | None = None, train_set=None, guidance: float | None = None) -> dict:
    """Per-image correctness (n·k,) and task of `spec` on `split`, sampled with the shared sampler
    defaults (`guidance`: another CFG scale, for a model trained to be sampled so). With `best_of` N > 1, each image
    is the one of N candidates (seeds (i·k + j)·N + n + 10⁹) that `reward` scores highest. With an
    `audit_model` (reward.imagetext folder): the proxy score (100·cos) of each image, the diversity
    of each prompt's k images (mean pairwise 1 − cos of their image features) and the Fréchet
    distance of all images to renders of the same scenes. With a `train_set`
    (reward.memorization.TrainingSet): each image's cosine to its nearest training image ("copy_cos")."""
    from base_model.adapters import load
    from base_model.data import shapes_data
    from base_model.sampling import GUIDANCE, SOLVER, STEPS
    from reward import compositional
    from reward.scorers import get_scorer

    data, scenes = shapes_data(split, n_prompts)  # the scenes and their renders (uint8)
    gen = load(spec)
    context, pooled = gen.text.encode([s.caption for s in scenes])
    rep = torch.arange(len(scenes)).repeat_interleave(k * best_of)
    seeds = list(range(len(scenes) * k)) if best_of == 1 else \
        [10 ** 9 + i * best_of + n for i in range(len(scenes) * k) for n in range(best_of)]
    images = gen.generate(None, seeds, STEPS, GUIDANCE if guidance is None else guidance, batch_size=256,
                          context=(context[rep], pooled[rep]),
                          solver=SOLVER, progress=False)
    targets = [scenes[i] for i in rep.tolist()]
    judged = [compositional.judge(img, s) for img, s in zip(images, targets)]
    candidates = {}
    if best_of > 1:  # every candidate's score and verdict, for the curve over n ≤ N; the picked ones' are reused
        scores = get_scorer(reward)(images, [s.caption for s in targets]).view(-1, best_of)
        candidates = {"candidate_scores": scores.tolist(),
                      "candidate_correct": np.reshape([float(j.correct) for j in judged], (-1, best_of)).tolist()}
        pick = (scores.argmax(1) + torch.arange(len(scores)) * best_of).tolist()
        images, targets, judged = images[pick], [targets[i] for i in pick], [judged[i] for i in pick]
    out = {"correct": [float(j.correct) for j in judged], "task": [j.task for j in judged],
           "strict": [float(j.correct and compositional.strict_correct(img, s))
                      for j, img, s in zip(judged, images, targets)], **candidates}
    if audit_model:
        from reward.fid import frechet_distance
        from reward.imagetext import load as load_imagetext

        scorer = load_imagetext(audit_model)
        out["proxy"] = scorer(images, [s.caption for s in targets]).tolist()
        out["diversity"] = group_diversity(scorer.embed_images(images).numpy(), k).tolist()
        out["fd"] = frechet_distance(data.images, images, scorer.model)
    if train_set is not None:
        out["copy_cos"] = train_set.nearest(images)[0].tolist()
    return out


def best_of_curve(scores, correct) -> np.ndarray:
    """Best-of-n for every n ≤ N from one draw of N candidates an image: row n − 1 holds each image's verdict
    (`correct`, (images, N)) on the highest-`scores` candidate of its first n (the first on ties, as in `judge`).
    Row N − 1 is `judge`'s best-of-N; row n − 1 is a best-of-n of other candidate seeds, the same in distribution."""
    scores, correct = np.asarray(scores), np.asarray(correct)
    rows = np.arange(len(scores))
    return np.stack([correct[rows, scores[:, :n].argmax(1)] for n in range(1, scores.shape[1] + 1)])


def break_even_images(calls: float, gain: float, curve_gains) -> float | None:
    """The number of generated images beyond which a trained method's one-time `calls` beat best-of-n at equal
    reward calls. Serving M images, those calls buy best-of-(calls / M); with n* the smallest n whose best-of-n gain
    (`curve_gains[n − 1]`) reaches the method's `gain`, every affordable n gains less once M > calls / n*.
    None when no n of the curve reaches the gain: the method wins from calls / N images on, or fewer; infinity when
    best-of-1, the base sampled once, gains as much: then no number of images makes the calls pay."""
    reached = [n for n, g in enumerate(curve_gains, start=1) if g >= gain]
    return None if not reached else float("inf") if reached[0] == 1 else calls / reached[0]


def gain_ci(base: np.ndarray, runs: list[np.ndarray], k: int, n_boot: int = 2000, seed: int = 0) -> dict:
    """Mean over seeds of (accuracy − base accuracy), with a 95% bootstrap CI that resamples seeds,
    then prompts (the same prompts for every seed and for the base: the comparison is paired)."""
    out = pooled_gain_ci([prompt_gains(base, runs, k)], n_boot, seed)
    return {"mean": out["mean"], "ci95": out["ci95"], "per_seed": out["per_seed"][0]}


def prompt_gains(base: np.ndarray, runs: list[np.ndarray], k: int) -> np.ndarray:
    """(seeds, prompts): each run's per-prompt accuracy − the base's, from per-image verdicts (k per prompt)."""
    return np.stack([r - base for r in runs]).reshape(len(runs), -1, k).mean(2)


def pooled_gain_ci(diffs: list[np.ndarray], n_boot: int = 2000, seed: int = 0) -> dict:
    """The gain of one recipe over several bases (e.g. pretraining seeds): `diffs[b]` is base b's
    (training seeds, prompts) array of per-prompt gains over base b, on the same prompts for every base.
    Mean over bases of each base's mean, with a 95% bootstrap CI that resamples bases, then each drawn
    base's seeds, then prompts (one draw for all: the comparison stays paired). One base: `gain_ci`."""
    rng = np.random.default_rng(seed)
    n_prompts = diffs[0].shape[1]
    boots = []
    for _ in range(n_boot):
        bases = rng.integers(len(diffs), size=len(diffs)) if len(diffs) > 1 else [0]
        seeds = [rng.integers(len(diffs[b]), size=len(diffs[b])) for b in bases]
        p = rng.integers(n_prompts, size=n_prompts)
        boots.append(np.mean([diffs[b][s][:, p].mean() for b, s in zip(bases, seeds)]))
    lo, hi = np.percentile(boots, [2.5, 97.5])
    return {"mean": float(np.mean([d.mean() for d in diffs])), "ci95": [float(lo), float(hi)],
            "per_base": [float(d.mean()) for d in diffs], "per_seed": [[float(x.mean()) for x in d] for d in diffs]}


def task_gain_ci(base: np.ndarray, runs: list[np.ndarray], tasks: list[str], k: int, n_boot: int = 2000,
                 seed: int = 0) -> dict:
    """GenEval's overall score, the unweighted mean of the task accuracies (the unit of the anchors' reports),
    as a gain over the base: mean over seeds of the mean over tasks of each task's gain. 95% bootstrap CI that
    resamples seeds, then prompts within each task (every task stays in every draw; paired with the base).
    Also each task's own gain and CI (`tasks`)."""
    diffs = prompt_gains(base, runs, k)  # (seeds, prompts)
    prompt_task = np.array(tasks[::k])
    names = list(dict.fromkeys(prompt_task.tolist()))
    cols = {t: np.flatnonzero(prompt_task == t) for t in names}
    rng = np.random.default_rng(seed)
    boots, per_task = [], {t: [] for t in names}
    for _ in range(n_boot):
        seeds = rng.integers(len(diffs), size=len(diffs))
        for t, c in cols.items():
            per_task[t].append(diffs[seeds][:, rng.choice(c, size=len(c))].mean())
        boots.append(np.mean([per_task[t][-1] for t in names]))
    by_seed = np.stack([diffs[:, c].mean(1) for c in cols.values()]).mean(0)  # (seeds,)
    return {"mean": float(by_seed.mean()), "ci95": _ci95(boots), "per_seed": [float(x) for x in by_seed],
            "tasks": {t: {"gain": float(diffs[:, c].mean()), "ci95": _ci95(per_task[t]), "prompts": int(len(c))}
                      for t, c in cols.items()}}


# ---------------------------------------------------------------------------------------------
# The driver
# ---------------------------------------------------------------------------------------------


@entry_point
def main(argv=None):
    ap = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True)
    ap.add_argument("--base")
    ap.add_argument("--output_dir")
    ap.add_argument("--seeds", type=int, nargs="+")
    ap.add_argument("--n_prompts", type=int)
    ap.add_argument("--methods", nargs="+", help="run only these methods of the config (the other rows of an earlier "
                    "comparison on the same base, splits, seeds and prompts stay in its table)")
    args = ap.parse_args(argv)
    cfg = load_config(args.config, {"base": args.base, "output_dir": args.output_dir, "seeds": args.seeds,
                                    "n_prompts": args.n_prompts})
    methods = {m: cfg.methods[m] for m in (args.methods or cfg.methods)}
    out, k = cfg.output_dir, cfg.n_per_prompt
    os.makedirs(out, exist_ok=True)

    audit = cfg.audit_model if cfg.audit_model else None
    if audit and not os.path.isdir(audit):
        cmd = command("reward.imagetext", cfg.audit_config, {"output": audit})
        run_cached(cmd, command_key(cmd, cfg.audit_config), audit + "-run", lambda: {}, tag="compare")

    train_set, copy_at = None, 0.0
    if audit and cfg.train_data:  # embedded once; a bad --train_data stops here, before any training
        from base_model.features import copy_threshold
        from reward.memorization import TrainingSet

        train_set = TrainingSet(cfg.train_data, cfg.feature_model, cfg.feature_resolution, cfg.train_num_images)
        copy_at = copy_threshold(cfg.feature_model)

    def judged(spec, folder, split, best_of=1, guidance=None):
        path = os.path.join(folder, f"judged-{split}-{cfg.n_prompts}x{k}" + (f"-bo{best_of}" if best_of > 1 else "")
                            + (f"-cfg{guidance:g}" if guidance is not None else "") + ".json")
        cached = None
        if os.path.isfile(path):
            with open(path) as f:
                cached = json.load(f)
        memorize = train_set if split == cfg.splits[0] else None  # the audit's split
        if cached is None or "strict" not in cached or (audit and "fd" not in cached) or \
                (memorize is not None and "copy_cos" not in cached) or (best_of > 1 and "candidate_scores" not in cached):
            res = judge(spec, split, cfg.n_prompts, k, best_of, cfg.reward, audit, memorize, guidance)
            os.makedirs(folder, exist_ok=True)
            write_json(path, res, indent=None)
            return res
        return cached

    base_judged = {s: judged(cfg.base, os.path.join(out, "base"), s) for s in cfg.splits}
    base = {s: np.array(j["correct"]) for s, j in base_judged.items()}
    pairs_dir = os.path.join(out, "pairs")
    if any(m.get("module") == "align.dpo" for m in methods.values()):
        cmd = command("align.pairs", None, {**cfg.pairs, "base": cfg.base, "output": pairs_dir})
        run_cached(cmd, command_key(cmd, None), pairs_dir + "-run", lambda: {},
                   lambda: ["--overwrite_output_dir"] if os.path.isdir(pairs_dir) else [], tag="compare")

    def train(name, m, seed):
        folder = os.path.join(out, name, f"seed-{seed}")
        flags = {**m.get("flags", {}), "base": cfg.base, "output_dir": folder, "seed": seed}
        if m["module"] == "align.dpo":
            flags["pairs"] = pairs_dir
        cmd = command(m["module"], m.get("config"), flags)
        return run_cached(cmd, command_key(cmd, m.get("config")), folder, lambda: _train_record(folder),
                          lambda: again_flags(folder), tag="compare")

    results = {"config": asdict(cfg), "base": {s: float(v.mean()) for s, v in base.items()},
               "base_geneval": {s: geneval_overall(base[s], j["task"]) for s, j in base_judged.items()},
               "methods": kept_methods(os.path.join(out, f"{cfg.name}.json"), cfg) if args.methods else {},
               "base_audit": {s: audit_summary([j], k, copy_at) for s, j in base_judged.items()} if audit else {}}
    if train_set is not None:  # the reference: how many fresh renders of the same scenes are "copies"
        from base_model.data import shapes_data, to_model_space

        real = to_model_space(shapes_data(cfg.splits[0], cfg.n_prompts)[0].images)
        results["render_copies"] = {**mean_ci(train_set.nearest(real)[0] >= copy_at), "threshold": copy_at}
    trained = {}
    for name, m in methods.items():  # each method trained on every seed, then judged, in config order
        entry = {"splits": {}}
        if "best_of_n" not in m:
            trained[name] = [train(name, m, seed) for seed in cfg.seeds]
        if "best_of_n" in m:
            ref = m["best_of_n"]
            trained.setdefault(ref, [train(ref, cfg.methods[ref], seed) for seed in cfg.seeds])
            calls = np.mean([r["reward_calls"] for r in trained[ref]])
            n = max(2, int(round(calls / (cfg.n_prompts * k))))
            entry.update(best_of=n, reward_calls=n * cfg.n_prompts * k, train_seconds=0.0)
            per_split = {s: [judged(cfg.base, os.path.join(out, name), s, n)] for s in cfg.splits}
        else:
            runs = trained[name]
            entry.update(guidance=m.get("guidance"), reward_calls=float(np.mean([r["reward_calls"] for r in runs])),
                         train_seconds=float(np.mean([r["wall_s"] for r in runs])))
            per_split = {s: [judged(os.path.join(out, name, f"seed-{seed}", "final"),
                                    os.path.join(out, name, f"seed-{seed}"), s, guidance=m.get("guidance"))
                             for seed in cfg.seeds] for s in cfg.splits}
        for s, runs_judged in per_split.items():
            arrays, tasks = [np.array(j["correct"]) for j in runs_judged], runs_judged[0]["task"]
            entry["splits"][s] = {"accuracy": float(np.mean(arrays)), "gain": gain_ci(base[s], arrays, k),
                                  "geneval": {"overall": float(np.mean([geneval_overall(a, tasks) for a in arrays])),
                                              "gain": task_gain_ci(base[s], arrays, tasks, k)}}
            if "candidate_scores" in runs_judged[0]:  # best-of-n for every n ≤ N, from the same candidates
                curve = best_of_curve(runs_judged[0]["candidate_scores"], runs_judged[0]["candidate_correct"])
                entry["splits"][s]["curve"] = [{"n": n, "reward_calls": n * cfg.n_prompts * k,
                                                "accuracy": float(c.mean()), "gain": gain_ci(base[s], [c], k)}
                                               for n, c in enumerate(curve, start=1)]
            if audit:
                a = audit_summary(runs_judged, k, copy_at)
                b = results["base_audit"][s]
                a["flags"] = ([f"diversity {a['diversity']:.3f} < {cfg.diversity_floor} × base {b['diversity']:.3f}"]
                              if a["diversity"] < cfg.diversity_floor * b["diversity"] else []) + \
                             ([f"FD {a['fd']:.3f} > {cfg.fd_ceiling} × base {b['fd']:.3f}"]
                              if a["fd"] > cfg.fd_ceiling * b["fd"] else []) + \
                             ([f"copies {a['copies']['mean']:.1%} > renders {ref:.1%} + {cfg.copy_margin:.0%}"]
                              if "copies" in a and a["copies"]["mean"] > (ref := results["render_copies"]["mean"])
                              + cfg.copy_margin else [])
                a["proxy_gain"] = a["proxy"] - b["proxy"]
                a["strict_gain"] = a["strict"] - b["strict"]  # gold-vs-proxy for a checker-trained method
                entry["splits"][s]["audit"] = a
        results["methods"][name] = entry
        results["methods"] = {m: results["methods"][m] for m in cfg.methods if m in results["methods"]}  # config order
        write_json(os.path.join(out, f"{cfg.name}.json"), results, indent=2)
    write_html(results, os.path.join(out, f"{cfg.name}.html"))
    for line in table(results):
        print(line)


def kept_methods(path: str, cfg: CompareConfig) -> dict:
    """The rows of an earlier comparison at `path` that a run of some `--methods` keeps: those of methods
    still in the config, when it was made on the same base, splits, seeds and prompts (else none)."""
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        earlier = json.load(f)
    same = ("base", "splits", "seeds", "n_prompts", "n_per_prompt")
    if any(earlier.get("config", {}).get(key) != getattr(cfg, key) for key in same):
        return {}
    return {m: row for m, row in earlier.get("methods", {}).items() if m in cfg.methods}


def _ci95(boots) -> list[float]:
    return [float(x) for x in np.percentile(boots, [2.5, 97.5])]


def geneval_overall(correct: np.ndarray, tasks: list[str]) -> float:
    """The unweighted mean of the task accuracies (GenEval's "overall"), from per-image verdicts."""
    from reward.compositional import task_accuracies
    return float(np.mean(list(task_accuracies(correct, tasks).values())))


def audit_summary(judged_runs: list[dict], k: int, copy_at: float) -> dict:
    """Mean proxy score, diversity, FD and strict-checker accuracy over a method's seeds; where the
    images were matched to the training set, the share of copies (nearest cosine ≥ `copy_at`) with a
    bootstrap CI over prompts (the seeds' images of a prompt resampled together)."""
    out = {m: float(np.mean([np.mean(j[m]) for j in judged_runs])) for m in ("proxy", "diversity", "fd", "strict")}
    if all("copy_cos" in j for j in judged_runs):
        copies = np.stack([np.array(j["copy_cos"]) >= copy_at for j in judged_runs])  # (seeds, prompts·k)
        groups = np.tile(np.arange(copies.shape[1]) // k, len(judged_runs))
        out["copies"] = {**mean_ci(copies.ravel().astype(float), groups), "threshold": copy_at}
    return out


def _train_record(folder: str) -> dict:
    """Reward calls of a run: the online loop records them; offline DPO spent the pairs' calls."""
    with open(os.path.join(folder, "final", "flowalign_base.json")) as f:
        record = json.load(f)
    if "reward_calls" in record:
        return {"reward_calls": record["reward_calls"], "train_seconds": record.get("train_seconds")}
    info = os.path.join(record["dpo_config"]["pairs"], "pairs_info.json")
    calls = 0
    if os.path.isfile(info):
        with open(info) as f:
            s = json.load(f)["summary"]
        calls = s["prompts"] * s["k"]
    return {"reward_calls": calls, "train_seconds": None}


def table(results: dict) -> list[str]:
    splits = results["config"]["splits"]
    head = f"{'method':14s} {'reward calls':>12s} {'train s':>8s} " + " ".join(f"{s + ' gain [95% CI]':>34s}" for s in splits)
    lines = [head, f"{'base':14s} {'':>12s} {'':>8s} " + " ".join(f"{'acc ' + format(results['base'][s], '.1%'):>34s}"
                                                                  for s in splits)]
    for name, e in results["methods"].items():
        cells = []
        for s in splits:
            g = e["splits"][s]["gain"]
            cells.append(f"{e['splits'][s]['accuracy']:.1%} {g['mean'] * 100:+.1f} [{g['ci95'][0] * 100:+.1f}, "
                         f"{g['ci95'][1] * 100:+.1f}]")
        label = name + (f" cfg{e['guidance']:g}" if e.get("guidance") is not None else "")
        lines.append(f"{label:14s} {e['reward_calls']:12.0f} {e['train_seconds']:8.0f} " + " ".join(f"{c:>34s}" for c in cells))
    lines += geneval_table(results) + break_even_table(results)
    if results.get("base_audit"):
        s = splits[0]
        b = results["base_audit"][s]
        lines += ["", f"audit on {s}: proxy = in-project image–text score (100·cos), diversity = mean pairwise "
                      "1 − cos of a prompt's images, FD to renders of the same scenes, strict = accuracy under the "
                      "stricter checker (no extra objects, unambiguous shapes, twice the position margin)",
                  f"{'base':14s} proxy {b['proxy']:6.2f}            diversity {b['diversity']:.3f}  FD {b['fd']:.3f}  "
                  f"strict {b['strict']:.1%}{_copies(b)}"]
        if "render_copies" in results:
            lines.append(f"{'renders':14s} copies = nearest pretraining image at cosine ≥ "
                         f"{results['render_copies']['threshold']}:{_copies({'copies': results['render_copies']})} "
                         "of fresh renders of the same scenes (the reference)")
        for name, e in results["methods"].items():
            a = e["splits"][s].get("audit")
            if a:
                lines.append(f"{name:14s} proxy {a['proxy']:6.2f} ({a['proxy_gain']:+.2f})  diversity {a['diversity']:.3f}  "
                             f"FD {a['fd']:.3f}  strict {a['strict']:.1%} ({a['strict_gain'] * 100:+.1f}){_copies(a)}  "
                             f"{'FLAGGED: ' + '; '.join(a['flags']) if a['flags'] else 'ok'}")
    return lines


def longest_curve(results: dict, split: str) -> tuple[str, list] | None:
    """The best-of-n curve over the most candidates among the comparison's best-of-N rows, and its row's name."""
    curves = [(n, e["splits"][split]["curve"]) for n, e in results["methods"].items() if "curve" in e["splits"][split]]
    return max(curves, key=lambda c: len(c[1])) if curves else None


def break_even_table(results: dict) -> list[str]:
    """Best-of-n's gain for every n, and for each trained method the images it must serve to beat it at equal calls."""
    lines, images = [], results["config"]["n_prompts"] * results["config"]["n_per_prompt"]
    for split in results["config"]["splits"]:
        found = longest_curve(results, split)
        if found is None:
            continue
        name, curve = found
        lines += ["", f"best-of-n on {split} ({name}'s candidates; gain, points): "
                  + ", ".join(f"n={c['n']} {c['gain']['mean'] * 100:+.1f}" for c in curve),
                  "at equal reward calls a trained method beats best-of-n once it serves more images than its calls / n*, "
                  f"n* the smallest n whose best-of-n gains as much (this comparison serves {images})"]
        for m, e in results["methods"].items():
            if "best_of" in e or not e["reward_calls"]:
                continue
            gain = e["splits"][split]["gain"]["mean"]
            at = break_even_images(e["reward_calls"], gain, [c["gain"]["mean"] for c in curve])
            lines.append(f"{m:14s} {gain * 100:+.1f} from {e['reward_calls']:.0f} calls: " + (
                f"no n ≤ {len(curve)} gains as much; beats best-of-n from {e['reward_calls'] / len(curve):.0f} images "
                "or fewer" if at is None else "no more than the base sampled once: never" if at == float("inf") else
                f"best-of-{e['reward_calls'] / at:.0f} gains as much; beats best-of-n beyond {at:.0f} images"))
    return lines


def geneval_table(results: dict) -> list[str]:
    """GenEval's overall (the unweighted mean of the task accuracies) per split, and each task's gain on the first."""
    splits, rows = results["config"]["splits"], results["methods"]
    have = {n: e for n, e in rows.items() if all("geneval" in e["splits"][s] for s in splits)}
    if not have or "base_geneval" not in results:
        return []
    tasks = list(next(iter(have.values()))["splits"][splits[0]]["geneval"]["gain"]["tasks"])
    lines = ["", f"GenEval overall = the unweighted mean of the task accuracies (the anchors' unit); task columns: "
                 f"the gain on {splits[0]} (points)",
             f"{'method':14s} " + " ".join(f"{s + ' overall gain [95% CI]':>36s}" for s in splits) + " "
             + " ".join(f"{t:>13s}" for t in tasks),
             f"{'base':14s} " + " ".join(f"{'overall ' + format(results['base_geneval'][s], '.1%'):>36s}" for s in splits)]
    for name, e in have.items():
        cells = []
        for s in splits:
            g = e["splits"][s]["geneval"]
            cells.append(f"{g['overall']:.1%} {g['gain']['mean'] * 100:+.1f} [{g['gain']['ci95'][0] * 100:+.1f}, "
                         f"{g['gain']['ci95'][1] * 100:+.1f}]")
        per_task = e["splits"][splits[0]]["geneval"]["gain"]["tasks"]
        lines.append(f"{name:14s} " + " ".join(f"{c:>36s}" for c in cells) + " "
                     + " ".join(f"{per_task[t]['gain'] * 100:+13.1f}" for t in tasks))
    return lines


def _copies(a: dict) -> str:
    c = a.get("copies")
    return f"  copies {c['mean']:.1%} [{c['ci95'][0]:.1%}, {c['ci95'][1]:.1%}]" if c else ""


def write_html(results: dict, path: str):
    import base64
    import io
    from html import escape as html_escape

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    split = results["config"]["splits"][0]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for name, e in results["methods"].items():
        g = e["splits"][split]["gain"]
        acc = e["splits"][split]["accuracy"] * 100
        err = [[g["mean"] * 100 - g["ci95"][0] * 100], [g["ci95"][1] * 100 - g["mean"] * 100]]
        for ax, x in zip(axes, (e["reward_calls"], e["train_seconds"])):
            ax.errorbar([x], [acc], yerr=err, fmt="o", capsize=3, label=name)
    found = longest_curve(results, split)
    if found is not None:
        axes[0].plot([c["reward_calls"] for c in found[1]], [c["accuracy"] * 100 for c in found[1]], "k:",
                     label=f"best-of-n, n = 1…{len(found[1])}")
    for ax, label in zip(axes, ("reward calls in training (best-of-n: at inference)", "training wall time (s)")):
        ax.axhline(results["base"][split] * 100, color="grey", ls="--", label="base")
        ax.set_xlabel(label)
        ax.set_ylabel(f"accuracy on {split} (%)")
    axes[1].legend(fontsize=8)
    if found is not None:
        axes[0].legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    img = base64.b64encode(buf.getvalue()).decode()
    rows = html_escape("\n".join(table(results)))
    html = (f"<!doctype html><meta charset=utf-8><title>flowalign: which alignment method pays</title>"
            f"<h1>Which alignment method pays</h1><p>Gain = accuracy − base accuracy, mean over seeds "
            f"{results['config']['seeds']}, 95% CI by bootstrap over seeds and prompts.</p>"
            f"<pre>{rows}</pre><img src='data:image/png;base64,{img}'>")
    write_text(path, html)


if __name__ == "__main__":
    main()
