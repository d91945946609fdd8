"""`report.html` of an evaluation: one self-contained file (images and plots embedded as PNG).

Sections: metrics with 95% CIs, pairwise comparisons against the reference model, per-task
compositional accuracy, win rates, reward distributions, then the images: one row per prompt,
the same seeds side by side for every model, each image with its score and verdict.
"""

from __future__ import annotations

import html

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from base_model.outputs import png_data_uri  # noqa: E402
from base_model.shapes import to_uint8  # noqa: E402

CSS = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1200px;color:#222}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}
th{background:#f3f3f3}td:first-child{text-align:left}
.prompt{margin:1.2em 0;border-top:1px solid #ddd;padding-top:.6em}.models{display:flex;gap:2em;flex-wrap:wrap}
figure{display:inline-block;margin:2px;text-align:center;font-size:11px}
figure img{width:96px;height:96px;image-rendering:pixelated;border:3px solid #bbb}
figure.ok img{border-color:#2a2}figure.bad img{border-color:#d33}.plots img{max-width:49%}
"""


def _ci(m: dict, pct: bool = True) -> str:
    f = (lambda v: f"{v:.1%}") if pct else (lambda v: f"{v:.3f}")  # noqa: E731
    return f"{f(m['mean'])} [{f(m['ci95'][0])}, {f(m['ci95'][1])}]"


def task_plot(out: dict):
    models = [n for n, m in out["models"].items() if "tasks" in m]
    if not models:
        return None
    tasks = list(out["models"][models[0]]["tasks"])
    fig, ax = plt.subplots(figsize=(7, 3))
    width = 0.8 / len(models)
    for i, name in enumerate(models):
        t = out["models"][name]["tasks"]
        means = np.array([t[k]["mean"] for k in tasks])
        err = np.array([[t[k]["mean"] - t[k]["ci95"][0], t[k]["ci95"][1] - t[k]["mean"]] for k in tasks]).T
        ax.bar(np.arange(len(tasks)) + i * width, means, width, yerr=err, capsize=2, label=name)
    ax.set_xticks(np.arange(len(tasks)) + width * (len(models) - 1) / 2, tasks, rotation=20, fontsize=8)
    ax.set_ylabel("accuracy")
    ax.set_title("Compositional accuracy per task (95% CI over prompts)")
    ax.legend(fontsize=8)
    return fig


def win_plot(out: dict):
    rows = [(f"{key} ({s})", w) for key, pw in out["pairwise"].items() for s, w in pw.items() if s != "accuracy_diff"]
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(7, 0.5 + 0.5 * len(rows)))
    for i, (label, w) in enumerate(rows):
        ax.errorbar(w["win_rate"], i, xerr=[[w["win_rate"] - w["ci95"][0]], [w["ci95"][1] - w["win_rate"]]],
                    fmt="o", capsize=4)
    ax.axvline(0.5, color="grey", ls="--")
    ax.set_yticks(range(len(rows)), [r[0] for r in rows], fontsize=8)
    ax.set_xlabel("win rate (W + T/2) / N, 95% CI over prompts")
    ax.set_xlim(0, 1)
    return fig


def distribution_plot(per_image: dict, scorer: str):
    fig, ax = plt.subplots(figsize=(5, 2.6))
    values = [per_image[n]["scores"][scorer] for n in per_image]
    lo, hi = min(v.min() for v in values), max(v.max() for v in values)
    bins = np.linspace(lo, hi if hi > lo else lo + 1, 21)
    for name, v in zip(per_image, values):
        ax.hist(v, bins=bins, alpha=0.5, label=name)
    ax.set_title(f"{scorer} scores per image")
    ax.legend(fontsize=8)
    return fig


def memorization_section(out: dict, images: dict, per_image: dict, captions: list[str], cfg) -> str:
    """The audit's table (share of copies per model, 95% CI over prompts) and each model's closest
    pairs: the generation beside its nearest training image."""
    e = html.escape
    rows, pairs = [], []
    for n, m in out["models"].items():
        a = m["memorization"]
        rows.append(f"<tr><td>{e(n)}</td><td>{_ci(a['copy_rate'])}</td><td>{a['copies']}/{a['copy_rate']['n']}</td>"
                    f"<td>{_ci(a['nearest_cos'], pct=False)}</td></tr>")
        figs = []
        for c, train_image in zip(a["closest"], per_image[n]["train_images"]):
            verdict = "bad" if c["cos"] >= a["threshold"] else "ok"
            caption = captions[c["image"] // cfg.n_per_prompt]
            figs.append(f"<figure class='{verdict}' title='{e(caption)}'><img alt='generated' "
                        f"src='{png_data_uri(to_uint8(images[n][c['image']]))}'><img alt='training row {c['train_row']}' "
                        f"src='{png_data_uri(to_uint8(train_image))}'><figcaption>{e(caption)}<br>cos {c['cos']:.3f}, "
                        f"row {c['train_row']}</figcaption></figure>")
        pairs.append(f"<div><b>{e(n)}</b><br>{''.join(figs)}</div>")
    threshold = next(iter(out["models"].values()))["memorization"]["threshold"]
    return (f"<h2>Memorization: generations that copy a training image</h2><p>Features <code>"
            f"{e(cfg.feature_model)}</code>; a copy has cosine ≥ {threshold} to its nearest image of "
            f"<code>{e(cfg.train_data)}</code>.</p><table><tr><th>model</th><th>share of copies [95% CI]</th>"
            f"<th>copies</th><th>mean nearest cosine [95% CI]</th></tr>{''.join(rows)}</table>"
            f"<h3>Closest pairs (generated, then training image; red = a copy)</h3>{''.join(pairs)}")


def write_report(out: dict, images: dict, per_image: dict, captions: list[str], cfg, path: str) -> None:
    e = html.escape
    names = list(out["models"])
    scorers = list(next(iter(per_image.values()))["scores"])
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>flowalign evaluation</title>"
             f"<style>{CSS}</style></head><body><h1>flowalign evaluation</h1>",
             f"<p>{len(captions)} prompts ({e(cfg.prompts)}) × {cfg.n_per_prompt} seeds per model; "
             f"{cfg.steps} {cfg.solver} steps, guidance {cfg.guidance}. Models: "
             + ", ".join(f"<b>{e(n)}</b> = <code>{e(s)}</code>" for n, s in cfg.models) + "</p>"]
    head = "<tr><th>model</th>" + ("<th>accuracy</th><th>GenEval overall</th>" if "compositional" in scorers else "")
    head += "".join(f"<th>{e(s)}</th>" for s in scorers) + "<th>val loss</th><th>diversity</th></tr>"
    rows = []
    for n in names:
        m = out["models"][n]
        cells = [e(n)]
        if "accuracy" in m:
            cells += [_ci(m["accuracy"]), f"{m['geneval_overall']:.1%}"]
        cells += [_ci(m["scores"][s], pct=False) for s in scorers]
        cells.append(f"{m['val_loss']['loss']:.4f}" if "val_loss" in m else "–")
        cells.append((_ci(m["diversity"], pct=False) + (" <b>collapsed</b>" if m.get("collapsed") else ""))
                     if "diversity" in m else "–")
        rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    parts.append("<h2>Metrics (95% bootstrap CI over prompts)</h2><table>" + head + "".join(rows) + "</table>"
                 "<p>diversity: the mean pairwise 1 − cos of the thumbnail features of each prompt's images; a model "
                 f"below {cfg.diversity_floor} × the first model's is <b>collapsed</b>: its accuracy is not a gain.</p>")
    if out["pairwise"]:
        prow = []
        for key, pw in out["pairwise"].items():
            d = pw.get("accuracy_diff")
            for s, w in pw.items():
                if s == "accuracy_diff":
                    continue
                prow.append(f"<tr><td>{e(key)}</td><td>{e(s)}</td><td>{w['win_rate']:.3f} [{w['ci95'][0]:.3f}, "
                            f"{w['ci95'][1]:.3f}]</td><td>{w['wins']}/{w['ties']}/{w['losses']}</td>"
                            f"<td>{w['sign_test_p']:.3g}</td><td>"
                            + (f"{d['diff']:+.1%} [{d['ci95'][0]:+.1%}, {d['ci95'][1]:+.1%}]" if d else "–")
                            + "</td></tr>")
        parts.append("<h2>Against the reference</h2><table><tr><th>comparison</th><th>scorer</th><th>win rate</th>"
                     "<th>W/T/L</th><th>sign test p</th><th>Δ accuracy</th></tr>" + "".join(prow) + "</table>")
    if "bradley_terry" in out:
        bt = out["bradley_terry"]
        parts.append("<h2>Bradley–Terry ratings</h2><table><tr><th>model</th><th>rating [95% CI]</th></tr>" + "".join(
            f"<tr><td>{e(n)}</td><td>{r:.0f} [{lo:.0f}, {hi:.0f}]</td></tr>"
            for n, r, (lo, hi) in zip(bt["models"], bt["ratings"], bt["ci95"])) + "</table>")
    if any("memorization" in out["models"][n] for n in names):
        parts.append(memorization_section(out, images, per_image, captions, cfg))
    plots = [f for f in (task_plot(out), win_plot(out)) if f is not None]
    plots += [distribution_plot(per_image, s) for s in scorers]
    parts.append("<h2>Plots</h2><div class='plots'>" + "".join(f"<img src='{png_data_uri(f)}'>" for f in plots) + "</div>")
    parts.append("<h2>Images (same seed across models; green = correct, red = not)</h2>")
    k = cfg.n_per_prompt
    for i, caption in enumerate(captions[:cfg.report_prompts]):
        blocks = []
        for n in names:
            figs = []
            for j in range(i * k, (i + 1) * k):
                info = per_image[n]
                verdict = "" if "correct" not in info else ("ok" if info["correct"][j] else "bad")
                score = " ".join(f"{s} {info['scores'][s][j]:.2f}" for s in scorers)
                why = e(info["explain"][j]) if "explain" in info else ""
                figs.append(f"<figure class='{verdict}' title='{why}'><img alt='{e(n)} seed {cfg.seed + j}' "
                            f"src='{png_data_uri(to_uint8(images[n][j]))}'><figcaption>{e(score)}<br>{why}"
                            f"</figcaption></figure>")
            blocks.append(f"<div><b>{e(n)}</b><br>{''.join(figs)}</div>")
        parts.append(f"<div class='prompt'><b>{e(caption)}</b><div class='models'>{''.join(blocks)}</div></div>")
    parts.append("</body></html>")
    with open(path, "w") as f:
        f.write("\n".join(parts))
