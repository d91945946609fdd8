"""The inputs of `base_model.precompute`: the shapes world, image–caption data (local parquet / arrow /
save_to_disk / imagefolder, read through `datasets`' memory-mapped Arrow files, or webdataset tar
shards read with the standard library's `tarfile`), Pick-a-Pic-schema pairs, or captions alone
(`--text_only`: a shapes split's, or a text file of prompts). `scan` reads captions and image sizes
(headers only) and drops pairs as `load_pairs` does; `load_rows` decodes the rows of one shard at its
bucket's size. `cfg` is a `PrecomputeConfig`.

`read_prompts` is the one prompt reader of the project (pairs, online rounds, eval, human eval): a
shapes-world split name or a text file.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import tarfile
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


# ---------------------------------------------------------------------------------------------
# webdataset tar shards: members grouped by key (dir/name up to the first dot), an image and a caption each
# ---------------------------------------------------------------------------------------------

IMAGE_EXTS, CAPTION_EXTS = ("jpg", "jpeg", "png", "webp"), ("txt", "json")


def tar_files(path: str) -> list[str]:
    """The tar shards of a webdataset: the file itself, or a folder's *.tar in name order ([] otherwise)."""
    if os.path.isfile(path):
        return [path] if path.endswith(".tar") else []
    return sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".tar")) if os.path.isdir(path) else []


@functools.lru_cache(maxsize=2)
def tar_samples(path: str) -> list[tuple]:
    """Every sample of the shards in order: (tar file, key, {ext: (data offset, size)}). Only headers are
    read (tarfile seeks over the data), and the member list is not kept, so memory holds the index alone."""
    out = []
    for file in tar_files(path):
        groups: dict[str, dict] = {}
        with tarfile.open(file, "r:") as tar:
            for m in tar:
                tar.members = []  # tarfile would keep every header
                if m.isfile():
                    folder, base = os.path.split(m.name)
                    key, _, ext = base.partition(".")
                    groups.setdefault(os.path.join(folder, key), {})[ext.lower()] = (m.offset_data, m.size)
        out += [(file, key, members) for key, members in groups.items()]
    return out


def read_member(file: str, where: tuple[int, int]) -> bytes:
    with open(file, "rb") as f:
        f.seek(where[0])
        return f.read(where[1])


def tar_image(sample: tuple) -> bytes:
    file, key, members = sample
    ext = next((e for e in IMAGE_EXTS if e in members), None)
    if ext is None:
        raise ValueError(f"no image ({'/'.join(IMAGE_EXTS)})")
    return read_member(file, members[ext])


def tar_caption(sample: tuple, caption_column: str) -> str:
    """The .txt member, or the `caption_column` field of the .json member."""
    file, key, members = sample
    if "txt" in members:
        return read_member(file, members["txt"]).decode("utf-8").strip()
    if "json" in members:
        return str(json.loads(read_member(file, members["json"]))[caption_column])
    raise ValueError(f"no caption ({'/'.join(CAPTION_EXTS)})")


def check_source(cfg: PrecomputeConfig) -> None:
    """The input exists and has its columns: checked before anything is written."""
    from .pickapic import REQUIRED

    if cfg.pairs:
        open_table(cfg.pairs, list(REQUIRED), [], "--pairs")
    elif cfg.text_only and cfg.dataset != "shapes":
        read_prompts(cfg.dataset, flag="--dataset")
    elif tar_files(cfg.dataset):
        if not tar_samples(cfg.dataset):
            raise InputError(f"--dataset {cfg.dataset!r}: its tar shards hold no sample")
    elif cfg.dataset != "shapes":
        open_table(cfg.dataset, [cfg.image_column, cfg.caption_column], [])


def read_prompts(spec: str, n: int | None = None, offset: int = 0, flag: str = "--prompts"):
    """The one prompt reader: a shapes-world split name or a text file → (captions, scenes or None).
    A split gives its scenes offset … offset+n−1 (its seeds follow `shapes.SPLIT_OFFSETS`), and the
    scenes too, for the compositional judge; it needs n ≥ 1. A file gives its prompts from line
    offset+1 on, n of them or all when n is None or 0, one per line, stripped. An empty line, or a
    file with no prompt, is an error naming the file (and the line); `flag` names the option."""
    from .shapes import SPLIT_OFFSETS, make_split

    if spec in SPLIT_OFFSETS:
        if not n or n < 1:
            raise InputError(f"{flag} {spec!r} is a shapes-world split: give a number of prompts ≥ 1")
        scenes = make_split(spec, offset + n)[offset:]
        return [s.caption for s in scenes], scenes
    if not os.path.isfile(spec):
        raise MissingInput(f"{flag} {spec!r}: neither a shapes-world split {list(SPLIT_OFFSETS)} nor a file")
    with open(spec, encoding="utf-8") as f:
        lines = f.read().splitlines()
    for i, line in enumerate(lines, 1):
        if not line.strip():
            raise InputError(f"{flag} {spec!r}, line {i}: empty prompt; every line must hold one")
    prompts = [line.strip() for line in lines][offset:offset + n if n else None]
    if not prompts:
        raise InputError(f"{flag} {spec!r}: no prompt" + (f" after line {offset}" if offset else ""))
    return prompts, None


def row_name(value, i: int) -> str:
    return value["path"] if isinstance(value, dict) and value.get("path") else f"row {i}"


def scan(cfg: PrecomputeConfig) -> dict:
    """Every usable entry: source row, caption, (width, height) of its (first) image, winner swap;
    and what was dropped (counts) or is bad (names)."""
    rows, captions, sizes, swap, bad = [], [], [], [], []
    dropped = {}
    if cfg.text_only:  # no image entries: the captions go to the text table only
        captions = ([s.caption for s in shapes_scenes(cfg.split, cfg.num_images)] if cfg.dataset == "shapes"
                    else read_prompts(cfg.dataset, flag="--dataset")[0])
        total = 0
    elif cfg.pairs:
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
    elif tar_files(cfg.dataset):
        samples = tar_samples(cfg.dataset)
        for i, sample in enumerate(samples):
            try:
                caption = tar_caption(sample, cfg.caption_column)
                sizes.append(decode_image(tar_image(sample)).size)
            except Exception as e:  # noqa: BLE001 — any reader or decoder failure is a bad row
                bad.append(f"{sample[0]}:{sample[1]} ({type(e).__name__}: {e})")
            else:
                rows.append(i)
                captions.append(caption)
        total = len(samples)
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
    if not cfg.pairs and tar_files(path):
        samples = tar_samples(path)
        for r in rows:
            try:
                out.append([resize_center_crop(decode_image(tar_image(samples[r])), h, w)])
            except Exception as e:  # noqa: BLE001
                out.append(f"{samples[r][0]}:{samples[r][1]}: undecodable image ({type(e).__name__})")
        return out
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
