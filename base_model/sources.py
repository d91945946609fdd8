"""The inputs of `base_model.precompute`: the shapes world, image–caption data (local parquet / arrow /
save_to_disk / imagefolder, read through `datasets`' memory-mapped Arrow files) or Pick-a-Pic-schema
pairs. `scan` reads captions and image sizes (headers only) and drops pairs as `load_pairs` does;
`load_rows` decodes the rows of one shard at its bucket's size. `cfg` is a `PrecomputeConfig`.
"""

from __future__ import annotations

import functools
import hashlib
import os
from typing import TYPE_CHECKING

from .data import decode_image, open_dataset, resize_center_crop
from .errors import InputError, MissingInput

if TYPE_CHECKING:
    from .precompute import PrecomputeConfig


def fingerprint(path: str) -> str:
    """SHA-256 over the input files' names, sizes and first and last MiB: cheap, and changes when
    the data does."""
    files = [path] if os.path.isfile(path) else sorted(
        os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs)
    h = hashlib.sha256()
    for file in files:
        size = os.path.getsize(file)
        h.update(f"{os.path.relpath(file, path)}:{size}".encode())
        with open(file, "rb") as f:
            h.update(f.read(1 << 20))
            if size > 2 << 20:
                f.seek(-(1 << 20), os.SEEK_END)
                h.update(f.read())
    return h.hexdigest()


def source_identity(source: str, split: str = "train", num_images: int = 0) -> dict:
    """What names a source's rows: the shapes world's split and size, or a path and its fingerprint.
    A cache records it (manifest identity "inputs"); a dedup index too, so a trainer can check both agree."""
    if source == "shapes":
        return {"world": "shapes", "split": split, "num_images": num_images}
    return {"path": os.path.abspath(source), "fingerprint": fingerprint(source)}


def open_table(path: str, columns: list[str], image_columns: list[str], flag: str = "--dataset"):
    """A datasets.Dataset with `columns`, images left as bytes (decoded here, row by row)."""
    import datasets

    if not os.path.exists(path):
        raise MissingInput(f"{flag} {path!r} does not exist")
    ds = open_dataset(path)
    missing = [c for c in columns if c not in ds.column_names]
    if missing:
        raise InputError(f"{flag} {path!r}: the data lack column(s) {missing}; columns are {ds.column_names}")
    for c in image_columns:
        if isinstance(ds.features[c], datasets.Image):
            ds = ds.cast_column(c, datasets.Image(decode=False))
    return ds


def check_source(cfg: PrecomputeConfig) -> None:
    """The input exists and has its columns: checked before anything is written."""
    from .pickapic import REQUIRED

    if cfg.pairs:
        open_table(cfg.pairs, list(REQUIRED), [], "--pairs")
    elif cfg.dataset != "shapes":
        open_table(cfg.dataset, [cfg.image_column, cfg.caption_column], [])


def row_name(value, i: int) -> str:
    return value["path"] if isinstance(value, dict) and value.get("path") else f"row {i}"


def scan(cfg: PrecomputeConfig) -> dict:
    """Every usable entry: source row, caption, (width, height) of its (first) image, winner swap;
    and what was dropped (counts) or is bad (names)."""
    rows, captions, sizes, swap, bad = [], [], [], [], []
    dropped = {}
    if cfg.pairs:
        from .pickapic import DROPPED, REQUIRED, drop_reason
        ds = open_table(cfg.pairs, list(REQUIRED), ["jpg_0", "jpg_1"], "--pairs")
        cols = list(REQUIRED) + [c for c in ("has_label", "are_different") if c in ds.column_names]
        dropped = {**dict.fromkeys(DROPPED, 0), "bad": 0}
        i = 0
        for batch in ds.select_columns(cols).iter(batch_size=256):
            for j in range(len(batch["caption"])):
                row = {c: batch[c][j] for c in cols}
                reason = drop_reason(row, i)
                if reason in dropped:
                    dropped[reason] += 1
                elif reason:
                    bad.append(reason)
                else:
                    try:
                        sizes.append(decode_image(row["jpg_0"]).size)
                    except Exception as e:  # noqa: BLE001 — any decoder failure is a bad row
                        bad.append(f"row {i}, column jpg_0: undecodable image ({type(e).__name__})")
                    else:
                        rows.append(i)
                        captions.append(str(row["caption"]))
                        swap.append(not row["label_0"] > row["label_1"])
                i += 1
        total = len(ds)
    elif cfg.dataset == "shapes":
        scenes = shapes_scenes(cfg.split, cfg.num_images)
        rows, captions = list(range(len(scenes))), [s.caption for s in scenes]
        sizes, total = [(cfg.resolution, cfg.resolution)] * len(scenes), len(scenes)
    else:
        ds = open_table(cfg.dataset, [cfg.image_column, cfg.caption_column], [cfg.image_column])
        i = 0
        for batch in ds.select_columns([cfg.image_column, cfg.caption_column]).iter(batch_size=256):
            for value, caption in zip(batch[cfg.image_column], batch[cfg.caption_column]):
                try:
                    sizes.append(decode_image(value).size)
                except Exception as e:  # noqa: BLE001
                    bad.append(f"{row_name(value, i)} ({type(e).__name__})")
                else:
                    rows.append(i)
                    captions.append(str(caption))
                i += 1
        total = len(ds)
    return dict(rows=rows, captions=captions, sizes=sizes, swap=swap or [False] * len(rows), bad=bad,
                dropped=dropped, total=total)


@functools.lru_cache(maxsize=2)
def shapes_scenes(split: str, n: int):
    from .shapes import make_split
    return make_split(split, n)


def load_rows(cfg: PrecomputeConfig, rows: list[int], swap: list[bool], hw: tuple[int, int]):
    """Decoded uint8 images (H, W, 3) at bucket size hw for each row: [[x]] or [[chosen, rejected]]
    per row, or a string naming why the row is bad."""
    h, w = hw
    out = []
    if cfg.dataset == "shapes" and not cfg.pairs:
        from .shapes import render
        scenes = shapes_scenes(cfg.split, cfg.num_images)
        return [[render(scenes[r], h)] for r in rows]
    path = cfg.pairs or cfg.dataset
    columns = ["jpg_0", "jpg_1"] if cfg.pairs else [cfg.image_column]
    ds = open_table(path, columns, columns).select_columns(columns)
    values = ds[rows]
    for k, (r, s) in enumerate(zip(rows, swap)):
        try:
            images = []
            for c in columns:
                try:
                    images.append(resize_center_crop(decode_image(values[c][k]), h, w))
                except Exception as e:  # noqa: BLE001
                    raise ValueError(f"{row_name(values[c][k], r)}, column {c}: undecodable image "
                                     f"({type(e).__name__})") from e
        except ValueError as e:
            out.append(str(e))
            continue
        out.append(images[::-1] if s else images)
    return out
