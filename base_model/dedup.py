"""Deduplicate a training set as the seed paper does: copy-detection embeddings, k-means clusters,
and one image kept per group of near-duplicates.

    python -m base_model.dedup --config configs/dedup/toy.yaml
    python -m base_model.dedup --dataset data/laion.parquet --feature_model sscd_disc_mixup.torchscript.pt \
        --output_dir runs/dedup/laion
    python -m base_model.pretrain --dataset data/laion.parquet --keep_index runs/dedup/laion …

1. Every image of the data set (the shapes world, a local image–caption dataset, or a cache of
   `base_model.precompute`) is resized to `--resolution` and embedded by the feature network
   (`base_model.features`: SSCD's TorchScript file, the in-project image tower, or the built-in
   thumbnail), L2-normalised, in batches.
2. Neighbours with cosine ≥ `--threshold` are found with faiss: k-means into `--clusters` clusters,
   then a range search within each image's cluster (an IVF index, `--nprobe` clusters searched), as
   the paper does; or one exact range search over all pairs where that fits (`--search`).
3. The pairs join images into groups (connected components, i.e. union-find over the pairs); each
   group keeps its first row.

The paper's defaults are 16,000 clusters and cosine 0.5 on SSCD features. Clusters scale down with
the data: k = min(16000, n // 40), at least 1, so each cluster keeps the ≥ 39 points per centroid
that faiss's k-means asks for and n ≥ 640,000 gets the paper's 16,000. `--search auto` searches all
pairs exactly up to 20,000 images (no cluster boundary can hide a pair) and by clusters above.

Writes into --output_dir: `kept_rows.npy` (the kept source rows, int64, ascending), `dedup.json`
(what was read, counts, the largest groups; written last) and `report.html` (the largest groups
as images). `--keep_index` of `base_model.pretrain` takes the folder.
"""

from __future__ import annotations

import html
import json
import os
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .cache import Cache, is_cache
from .cli import check_types, parse
from .data import decode_image, resize_center_crop, to_model_space
from .errors import InputError, MissingInput, entry_point
from .features import THUMBNAIL, copy_threshold, embed, load_features
from .outputs import check_output_dir, png_data_uri, write_json, write_text
from .shapes import render, to_uint8
from .sources import open_table, row_name, shapes_scenes, source_identity

FORMAT = "flowalign-dedup/1"
PAPER_CLUSTERS = 16_000
GLOBAL_SEARCH_MAX = 20_000  # --search auto: exact all-pairs search up to this many images
SEARCHES = ("auto", "global", "clusters")


@dataclass
class DedupConfig:
    dataset: str = "shapes"  # "shapes", a local image–caption dataset, or a cache made by base_model.precompute
    image_column: str = "image"  # the image column of an image–caption dataset
    split: str = "train"  # shapes world: the split
    num_images: int = 50_000  # shapes world: how many scenes (pretrain's --num_train)
    feature_model: str = THUMBNAIL  # "thumbnail", a TorchScript file (SSCD) or an image–text model folder
    resolution: int = 288  # images are resized (cover, centre crop) to this side for the features (SSCD: 288)
    threshold: float = 0.0  # cosine at or above which two images are duplicates; 0: the feature's default
    #                         (features.copy_threshold: the paper's 0.5 for SSCD and image towers, 0.9 for thumbnail)
    clusters: int = 0  # k-means clusters; 0: min(16000, n // 40), the paper's 16,000 scaled to the data
    nprobe: int = 1  # clusters searched per image (1: its own, as the paper)
    search: str = "auto"  # "clusters", "global" (exact, all pairs) or "auto" (global up to 20,000 images)
    batch_size: int = 256  # images per feature-network call
    report_groups: int = 12  # largest groups shown in report.html and dedup.json
    output_dir: str = "runs/dedup"
    overwrite_output_dir: bool = False  # replace the kept_rows.npy, dedup.json and report.html there
    seed: int = 0  # k-means initialisation

    def __post_init__(self):
        check_types(self)
        if self.search not in SEARCHES:
            raise ValueError(f"--search {self.search!r}: choose from {list(SEARCHES)}")
        if not -1.0 <= self.threshold <= 1.0:
            raise ValueError(f"--threshold {self.threshold}: a cosine, in [-1, 1]")
        for name in ("resolution", "nprobe", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be ≥ 1")
        if self.clusters < 0:
            raise ValueError("--clusters must be ≥ 0 (0: the scaled default)")


# ---------------------------------------------------------------------------------------------
# Reading images by source row
# ---------------------------------------------------------------------------------------------


def square(images: torch.Tensor, side: int) -> torch.Tensor:
    """(N, 3, H, W) → (N, 3, side, side): resized to cover, then centre-cropped (as precompute does)."""
    h, w = images.shape[-2:]
    scale = max(side / h, side / w)
    size = (max(side, round(h * scale)), max(side, round(w * scale)))
    if size != (h, w):
        images = F.interpolate(images, size=size, mode="bilinear", antialias=True, align_corners=False)
    top, left = (size[0] - side) // 2, (size[1] - side) // 2
    return images[..., top:top + side, left:left + side]


class ImageSource:
    """The images of a data set that pretraining reads, at `resolution`², float in [-1, 1], by
    position 0 … len−1. `rows[p]` is the source row of position p (for a cache, the row its sample
    was made from) and `identity` names the source as a cache's manifest does."""

    def __init__(self, dataset: str, resolution: int, image_column: str = "image", split: str = "train",
                 num_images: int = 50_000):
        self.resolution, self.column, self.bad = resolution, image_column, []
        if is_cache(dataset):
            from .vae import image_space

            self.kind, self.cache = "cache", Cache(dataset)
            if self.cache.kind != "images":
                raise InputError(f"--dataset {dataset!r} is a cache of pairs: deduplication reads image caches")
            self.space = image_space(self.cache.manifest["image_space"]["spec"])
            self.rows = self.cache.source_rows(np.arange(len(self.cache)))
            self.identity = self.cache.manifest["identity"]["inputs"]
        elif dataset == "shapes":
            self.kind, self.scenes = "shapes", shapes_scenes(split, num_images)
            self.rows = np.arange(len(self.scenes))
            self.identity = source_identity("shapes", split, num_images)
        else:
            self.kind = "table"
            self.table = open_table(dataset, [image_column], [image_column]).select_columns([image_column])
            self.rows = np.arange(len(self.table))
            self.identity = source_identity(dataset)

    def __len__(self) -> int:
        return len(self.rows)

    def read(self, positions) -> tuple[np.ndarray, torch.Tensor]:
        """(the positions that decoded, their images (n, 3, R, R)); an undecodable image is skipped
        and named in `self.bad`."""
        positions, R = np.asarray(positions, dtype=np.int64), self.resolution
        if self.kind == "shapes":
            pixels = np.stack([render(self.scenes[p], R) for p in positions])
            return positions, to_model_space(torch.from_numpy(pixels).permute(0, 3, 1, 2))
        if self.kind == "cache":
            buckets = self.cache.bucket_of(positions)
            out = torch.empty(len(positions), 3, R, R)
            for b in np.unique(buckets):
                sel = buckets == b
                z = self.cache.read(positions[sel], text=False)["x"]
                out[torch.from_numpy(sel)] = square(self.space.decode(z).clamp(-1, 1), R)
            return positions, out
        good, pixels = [], []
        for p, value in zip(positions, self.table[positions.tolist()][self.column]):
            try:
                pixels.append(resize_center_crop(decode_image(value), R))
            except Exception as e:  # noqa: BLE001 — any decoder failure is a bad row
                self.bad.append(f"{row_name(value, int(p))} ({type(e).__name__})")
            else:
                good.append(p)
        images = torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2) if pixels else torch.zeros(0, 3, R, R)
        return np.array(good, dtype=np.int64), to_model_space(images)

    def batches(self, batch_size: int):
        """(positions, images) of every image, in order, `batch_size` at a time."""
        for start in range(0, len(self), batch_size):
            positions, images = self.read(np.arange(start, min(start + batch_size, len(self))))
            if len(positions):
                yield positions, images


def embed_source(source: ImageSource, features, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(positions that decoded, their unit embeddings (n, D))."""
    positions = []

    def images():
        for p, x in source.batches(batch_size):
            positions.append(p)
            yield x

    emb = embed(features, images(), len(source))
    return (np.concatenate(positions) if positions else np.zeros(0, np.int64)), emb


# ---------------------------------------------------------------------------------------------
# Search and groups: pure functions of the embeddings
# ---------------------------------------------------------------------------------------------


def cluster_count(n: int, clusters: int = 0) -> int:
    """`clusters` if given, else the paper's 16,000 scaled to n images: min(16000, n // 40), ≥ 1."""
    return clusters or min(PAPER_CLUSTERS, max(1, n // 40))


def search_kind(n: int, search: str) -> str:
    return ("global" if n <= GLOBAL_SEARCH_MAX else "clusters") if search == "auto" else search


def near_pairs(emb: np.ndarray, threshold: float, clusters: int = 0, nprobe: int = 1, seed: int = 0,
               chunk: int = 8192) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(i, j, cos) with i < j for every pair of unit rows of `emb` with cos ≥ threshold that the
    search finds: all of them when `clusters` is 0 (exact), else those within each query's `nprobe`
    nearest k-means clusters (a faiss IVF index of inner products, spherical k-means)."""
    import faiss

    emb = np.ascontiguousarray(emb, dtype=np.float32)
    n, d = emb.shape
    if clusters:
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, clusters, faiss.METRIC_INNER_PRODUCT)
        index.cp.seed, index.cp.spherical = seed, True
        index.train(emb)
        index.nprobe = nprobe
    else:
        index = faiss.IndexFlatIP(d)
    index.add(emb)
    found = []
    for start in range(0, n, chunk):  # faiss keeps the results of one call in memory
        lims, sims, ids = index.range_search(emb[start:start + chunk], threshold - 1e-6)  # it keeps sim > radius
        query = start + np.repeat(np.arange(len(lims) - 1), np.diff(lims.astype(np.int64)))
        keep = (ids > query) & (sims >= threshold)
        found.append((query[keep], ids[keep].astype(np.int64), sims[keep]))
    i, j, s = (np.concatenate(parts) for parts in zip(*found)) if found else (np.zeros(0, np.int64),) * 3
    return i, j, s.astype(np.float32)


def duplicate_groups(n: int, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """Group id of each of n items joined by pairs (i, j): the smallest member's index (connected
    components, i.e. union-find over the pairs). Item p is kept iff groups[p] == p."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    _, labels = connected_components(coo_matrix((np.ones(len(i)), (i, j)), shape=(n, n)), directed=False)
    first = np.full(labels.max() + 1, n, dtype=np.int64)
    np.minimum.at(first, labels, np.arange(n))
    return first[labels]


def largest_groups(groups: np.ndarray, emb: np.ndarray, k: int, shown: int = 24) -> list[dict]:
    """The k largest groups: size, their first `shown` member indices (the kept one first) and each
    one's cosine to the kept one."""
    ids, sizes = np.unique(groups, return_counts=True)
    out = []
    for g in ids[np.argsort(-sizes, kind="stable")][:k]:
        members = np.flatnonzero(groups == g)
        if len(members) < 2:
            break
        out.append({"size": len(members), "members": members[:shown], "cos_to_kept": emb[members[:shown]] @ emb[g]})
    return out


# ---------------------------------------------------------------------------------------------
# The index trainers read, and the report
# ---------------------------------------------------------------------------------------------


def read_keep_index(path: str, inputs: dict | None = None) -> np.ndarray:
    """The kept source rows of a dedup output folder, checked against the `inputs` (source identity)
    of the data a trainer reads."""
    meta_file, rows_file = os.path.join(path, "dedup.json"), os.path.join(path, "kept_rows.npy")
    if not (os.path.isfile(meta_file) and os.path.isfile(rows_file)):
        raise MissingInput(f"--keep_index {path!r}: no dedup.json and kept_rows.npy there; make them with "
                           f"python -m base_model.dedup --output_dir {path}")
    try:
        with open(meta_file) as f:
            meta = json.load(f)
        rows = np.load(rows_file)
    except (OSError, ValueError) as e:
        raise InputError(f"--keep_index {path!r}: unreadable ({e})") from e
    if meta.get("format") != FORMAT or rows.dtype != np.int64 or rows.ndim != 1:
        raise InputError(f"--keep_index {path!r}: not a {FORMAT} index")
    if inputs is not None and meta["inputs"] != inputs:
        raise InputError(f"--keep_index {path!r} was made from other data ({meta['inputs']}); this run reads "
                         f"{inputs}: deduplicate this data set, or give its index")
    return rows


def write_report(path: str, summary: dict, source: ImageSource, groups: list[dict], positions: np.ndarray) -> None:
    e = html.escape
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>dedup</title><style>",
             "body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1200px;color:#222}"
             "td,th{border:1px solid #ccc;padding:4px 8px}table{border-collapse:collapse}"
             "figure{display:inline-block;margin:2px;text-align:center;font-size:11px}"
             "figure img{width:96px;height:96px;image-rendering:pixelated;border:3px solid #d33}"
             "figure.kept img{border-color:#2a2}</style></head><body>",
             f"<h1>Deduplication of <code>{e(summary['dataset'])}</code></h1><table>"]
    for key in ("rows_total", "embedded", "kept", "dropped", "bad", "feature_model", "threshold", "search",
                "clusters", "nprobe", "pairs", "groups_with_duplicates"):
        value = summary[key] if key != "bad" else len(summary["bad"])
        parts.append(f"<tr><th>{key}</th><td>{e(str(value))}</td></tr>")
    parts.append("</table><h2>Largest groups (green: kept; below each image its row and cosine to the kept one)</h2>")
    for g in groups:
        decoded, images = source.read(positions[g["members"]])
        figs = [f"<figure class='{'kept' if m == 0 else ''}'><img src='{png_data_uri(to_uint8(x))}'><figcaption>"
                f"row {int(source.rows[p])}<br>{c:.3f}</figcaption></figure>"
                for m, (p, x, c) in enumerate(zip(decoded, images, g["cos_to_kept"]))]
        parts.append(f"<div><b>{g['size']} images</b> (the first {len(figs)})<br>{''.join(figs)}</div>")
    parts.append("</body></html>")
    write_text(path, "\n".join(parts))


def main(cfg: DedupConfig) -> dict:
    out = cfg.output_dir
    check_output_dir(out, cfg.overwrite_output_dir)  # before anything is read or written
    features = load_features(cfg.feature_model)
    source = ImageSource(cfg.dataset, cfg.resolution, cfg.image_column, cfg.split, cfg.num_images)
    t0 = time.time()
    positions, emb = embed_source(source, features, cfg.batch_size)
    t1 = time.time()
    n = len(emb)
    if not n:
        raise InputError(f"--dataset {cfg.dataset!r}: no image could be read (bad: {'; '.join(source.bad[:5])})")
    search = search_kind(n, cfg.search)
    k = cluster_count(n, cfg.clusters) if search == "clusters" else 0
    if k > n:
        raise InputError(f"--clusters {k}: more than the {n} images read")
    threshold = copy_threshold(cfg.feature_model, cfg.threshold)
    i, j, _ = near_pairs(emb, threshold, k, cfg.nprobe, cfg.seed)
    groups = duplicate_groups(n, i, j)
    kept = groups == np.arange(n)
    kept_rows = np.sort(source.rows[positions[kept]]).astype(np.int64)
    biggest = largest_groups(groups, emb, cfg.report_groups)
    summary = {
        "format": FORMAT, "dataset": cfg.dataset, "inputs": source.identity, "rows_total": len(source),
        "embedded": n, "kept": int(kept.sum()), "dropped": int(n - kept.sum()), "bad": source.bad,
        "feature_model": cfg.feature_model, "embedding_dim": int(emb.shape[1]), "threshold": threshold,
        "search": search, "clusters": k, "nprobe": cfg.nprobe if k else None, "pairs": len(i),
        "groups_with_duplicates": int(len(np.unique(groups[~kept]))),
        "largest_groups": [{"size": g["size"], "rows": source.rows[positions[g["members"]]].tolist(),
                            "cos_to_kept": [round(float(c), 4) for c in g["cos_to_kept"]]} for g in biggest],
        "seconds": {"embed": round(t1 - t0, 2), "search": round(time.time() - t1, 2)}, "config": asdict(cfg)}
    os.makedirs(out, exist_ok=True)
    write_report(os.path.join(out, "report.html"), summary, source, biggest, positions)
    with open(os.path.join(out, "kept_rows.npy.tmp"), "wb") as f:
        np.save(f, kept_rows)
    os.replace(os.path.join(out, "kept_rows.npy.tmp"), os.path.join(out, "kept_rows.npy"))
    write_json(os.path.join(out, "dedup.json"), summary)  # last: the index is complete
    return summary


@entry_point
def cli(argv):
    s = main(parse(DedupConfig, argv))
    print(json.dumps({k: s[k] if k != "bad" else len(s[k]) for k in
                      ("embedded", "kept", "dropped", "bad", "search", "clusters", "pairs", "seconds")}))
    print(f"wrote {s['config']['output_dir']}/kept_rows.npy, dedup.json and report.html")


if __name__ == "__main__":
    cli()
