"""`study.html` of `base_model.study`: one self-contained file (plots and image grids embedded as PNG).

Sections: the table (parameters, FLOPs, validation loss, accuracy and FD at the last setting, the
mean rank), the settings' tables, plots (validation-loss curves, accuracy and FD against sampling
steps, the scaling fit, validation loss against the scores), then one grid per cell: the same
prompts and seeds for every variant (its first seed's run).
"""

from __future__ import annotations

import base64
import html
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from reward.report import CSS  # noqa: E402

from .outputs import png_data_uri, write_text  # noqa: E402
from .shapes import make_split  # noqa: E402


def curves_plot(study: dict):
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for cell in study["cells"]:
        curves = [dict(r["val_curve"]) for r in study["runs"] if r["cell"] == cell]
        steps = sorted(set.intersection(*(set(c) for c in curves)))
        ax.plot(steps, [np.mean([c[s] for c in curves]) for s in steps], marker=".", label=cell)
    ax.set_xlabel("training step")
    ax.set_ylabel("validation loss (mean over seeds)")
    ax.legend(fontsize=7)
    return fig


def settings_plot(study: dict, metric: str, label: str):
    cfg = study["config"]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for i, cell in enumerate(study["cells"].values()):
        for g, style in zip(cfg["guidance"], ("-", "--", ":", "-.")):
            rows = [s for s in cell["settings"] if s["guidance"] == g and metric in s]
            if rows:
                ax.plot([s["steps"] for s in rows], [s[metric]["mean"] for s in rows], style, marker="o", color=f"C{i}",
                        label=f"{list(study['cells'])[i]}, CFG {g}")
    ax.set_xscale("log")
    ax.set_xlabel("sampling steps")
    ax.set_ylabel(label)
    ax.legend(fontsize=6, ncol=2)
    return fig


def scaling_plot(study: dict):
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for i, cell in enumerate(study["cells"]):
        pts = np.array([[r["train_flops"], r["val_loss"]] for r in study["runs"] if r["cell"] == cell])
        ax.scatter(pts[:, 0], pts[:, 1], s=12, color=f"C{i % 10}", label=cell)
    fit = study["scaling"]["fit"]
    xs = np.array(study["scaling"]["points"])[:, 0]
    x = np.geomspace(xs.min(), xs.max(), 50)
    ax.plot(x, fit["c"] * x ** fit["exponent"], "k--", label=f"{fit['c']:.3g}·C^{fit['exponent']:.3f}, R² {fit['r2']:.2f}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("training FLOPs C")
    ax.set_ylabel("final validation loss")
    ax.legend(fontsize=6, ncol=2)
    return fig


def correlation_plot(study: dict):
    corr = study["correlation"]
    keys = [k for k in ("val_loss_vs_accuracy", "val_loss_vs_fd") if corr.get(k)]
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 3.5), squeeze=False)
    for ax, k in zip(axes[0], keys):
        metric = k.split("_vs_")[1]
        for i, cell in enumerate(study["cells"]):
            rs = [r for r in study["runs"] if r["cell"] == cell]
            ax.scatter([r["val_loss"] for r in rs], [r["settings"][-1][metric] for r in rs], s=12, color=f"C{i % 10}")
        c = corr[k]
        ax.set_title(f"r = {c['r']:+.2f} [{c['ci95'][0]:+.2f}, {c['ci95'][1]:+.2f}]", fontsize=9)
        ax.set_xlabel("final validation loss")
        ax.set_ylabel(f"{metric} ({corr['setting']['steps']} steps, CFG {corr['setting']['guidance']})")
    return fig


def _png_file(path: str) -> str:
    with open(path, "rb") as f:
        return "data:image/png;base64," + base64.b64encode(f.read()).decode()


def write_report(study: dict, output_dir: str, path: str, table: list[str]) -> None:
    e = html.escape
    cfg = study["config"]
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{e(study['name'])}</title>"
             f"<style>{CSS}</style></head><body><h1>{e(study['name'])}</h1>",
             f"<p>{len(study['runs'])} runs of <code>{e(cfg['pretrain_config'])}</code>, seeds {cfg['seeds']}; "
             f"{cfg['n_prompts']} {e(cfg['prompts'])} prompts, one image each (seed = prompt index), sampler "
             f"{e(cfg['solver'])} (DDIM for eps/v) at steps {cfg['steps']} and CFG {cfg['guidance']}. FD: in-project "
             f"image features to renders of the same scenes. Means over seeds with 95% bootstrap CIs over seeds.</p>",
             f"<pre>{e(chr(10).join(table))}</pre>"]
    head = "<tr><th>cell</th>" + "".join(f"<th>{s['steps']} st, CFG {s['guidance']}</th>"
                                         for s in next(iter(study["cells"].values()))["settings"]) + "</tr>"
    for metric, fmt in (("accuracy", "{:.1%}"), ("fd", "{:.3f}")):
        rows = []
        for cell, c in study["cells"].items():
            cells = [f"{fmt.format(s[metric]['mean'])} [{fmt.format(s[metric]['ci95'][0])}, "
                     f"{fmt.format(s[metric]['ci95'][1])}]" if metric in s else "–" for s in c["settings"]]
            rows.append(f"<tr><td>{e(cell)}</td>" + "".join(f"<td>{x}</td>" for x in cells) + "</tr>")
        parts.append(f"<h2>{metric} per setting</h2><table>{head}{''.join(rows)}</table>")
    plots = [curves_plot(study), settings_plot(study, "accuracy", "compositional accuracy")]
    if cfg["fd_model"]:
        plots.append(settings_plot(study, "fd", "FD (in-project features)"))
    if "scaling" in study:
        plots.append(scaling_plot(study))
    if study["correlation"].get("val_loss_vs_accuracy"):
        plots.append(correlation_plot(study))
    parts.append("<h2>Plots</h2><div class='plots'>" + "".join(f"<img src='{png_data_uri(f)}'>" for f in plots) + "</div>")
    captions = [s.caption for s in make_split(cfg["prompts"], cfg["grid_prompts"])]
    last = study["runs"][0]["settings"][-1]
    parts.append(f"<h2>Samples</h2><p>The same prompts and seeds for every cell (its first seed), "
                 f"{last['steps']} steps, CFG {last['guidance']}. Prompts, left to right: "
                 + "; ".join(e(c) for c in captions) + "</p>")
    for cell in study["cells"]:
        run = next(r for r in study["runs"] if r["cell"] == cell)
        grid = os.path.join(output_dir, "runs", run["key"], run["grid_png"])
        parts.append(f"<div class='prompt'><b>{e(cell)}</b> (seed {run['seed']})<br><img src='{_png_file(grid)}'></div>")
    parts.append("</body></html>")
    write_text(path, "\n".join(parts))
