"""The Pick-a-Pic v2 schema that every preference pair of flowalign uses: writing it, and reading it
(`load_pairs`, decoded into memory; `base_model.precompute --pairs` reads the same rows into a cache).

Columns: `caption`, `jpg_0`, `jpg_1` (encoded image bytes), `label_0`, `label_1` (1/0 a win,
0.5/0.5 a tie), and where known `model_0`, `model_1`, `user_id`, `ranking_id`, `image_0_uid`,
`image_1_uid`, `best_image_uid`, `has_label`, `are_different`. It lives in base_model/ because both
`align/` (training) and `reward/` (human votes → pairs) write it, and `reward/` never imports `align/`.
"""

from __future__ import annotations

import io
import json
import os
import re
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from .data import decode_image, open_dataset, resize_center_crop
from .errors import InputError, MissingInput
from .outputs import atomic_folder

REQUIRED = ("caption", "jpg_0", "jpg_1", "label_0", "label_1")
OPTIONAL = {"model_0": "", "model_1": "", "user_id": 0, "ranking_id": 0, "image_0_uid": "", "image_1_uid": "",
            "best_image_uid": "", "has_label": True, "are_different": True}
OWN_FILES = {"state.json", "dataset_info.json", "pairs_info.json"}  # with SHARDs: all that write_pairs writes
SHARD = re.compile(r"data-\d{5}-of-\d{5}\.arrow")  # datasets.save_to_disk's file names


def encode_png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.asarray(image, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def pairs_dataset(rows: list[dict]):
    """A Pick-a-Pic-schema `datasets.Dataset` from dicts holding at least REQUIRED; absent optional
    columns get neutral values (has_label and are_different True)."""
    import datasets

    columns = list(REQUIRED) + list(OPTIONAL) + sorted({k for r in rows for k in r} - set(REQUIRED) - set(OPTIONAL))
    return datasets.Dataset.from_dict({c: [r.get(c, OPTIONAL.get(c)) for r in rows] for c in columns})


def write_pairs(rows: list[dict], output: str, info: dict, overwrite: bool = False) -> None:
    """save_to_disk into a temporary folder, then swap it in (`outputs.atomic_folder`): a kill never
    leaves half a dataset. An existing folder of pairs written here is replaced only with `overwrite`
    (--overwrite_output_dir); anything else there is refused (InputError naming it), never deleted."""
    output = os.path.normpath(output)  # "runs/pairs/" names the folder itself
    check_replaceable(output, overwrite)
    with atomic_folder(output) as new:
        pairs_dataset(rows).save_to_disk(new)
        with open(os.path.join(new, "pairs_info.json"), "w") as f:
            json.dump(info, f)


def check_replaceable(output: str, overwrite: bool = False) -> None:
    """`output` must be absent, an empty folder, or (with `overwrite`) a folder that write_pairs
    wrote: save_to_disk's shards, state.json and dataset_info.json, and our pairs_info.json, nothing else."""
    if not os.path.lexists(output):
        return
    if os.path.islink(output) or not os.path.isdir(output):
        raise InputError(f"pairs output {output!r} exists and is not a folder; give a new path for the pairs")
    names = sorted(os.listdir(output))
    foreign = [n for n in names if not (os.path.isfile(os.path.join(output, n)) and
                                        (n in OWN_FILES or SHARD.fullmatch(n)))]
    if foreign or (names and "pairs_info.json" not in names):
        raise InputError(f"pairs output {output!r} holds what write_pairs did not write "
                         f"({(foreign or names)[:5]}); refusing to replace it: give a new or empty folder")
    if names and not overwrite:
        raise InputError(f"pairs output {output!r} already holds pairs: pass --overwrite_output_dir to replace "
                         f"them, or give a new folder")


@dataclass
class Pairs:
    """Decoded pairs, winner first: images uint8 (N, 3, R, R)."""
    captions: list[str]
    chosen: torch.Tensor
    rejected: torch.Tensor
    dropped: dict[str, int] = field(default_factory=dict)  # reason → rows dropped

    def __len__(self):
        return len(self.captions)


def _open(path: str):
    if os.path.exists(path):
        return open_dataset(path)
    import datasets  # a hub name: only what is already in the local cache

    try:
        return datasets.load_dataset(path, split="train")
    except Exception as e:
        raise MissingInput(f"pairs {path!r}: not a local folder or file, and not loadable from the "
                          f"local datasets cache ({type(e).__name__}: {e})") from e


DROPPED = ("tie", "no_label", "not_different")  # reasons a row is no training pair, counted


def drop_reason(row: dict, i: int) -> str | None:
    """Why row `i` is no training pair: one of DROPPED (`has_label` or `are_different` False, a tie
    label_0 == 0.5), a message naming an empty field (a bad row), or None for a usable pair."""
    if row.get("has_label", True) is False:
        return "no_label"
    if row.get("are_different", True) is False:
        return "not_different"
    if row["label_0"] is None or row["caption"] is None:
        return f"row {i}: {'label_0' if row['label_0'] is None else 'caption'} is empty"
    return "tie" if row["label_0"] == 0.5 else None


def load_pairs(path: str, resolution: int, max_bad_fraction: float = 0.01) -> Pairs:
    """Pairs from a parquet / arrow / save_to_disk folder (or a cached hub dataset), winner first.

    Dropped and counted by reason: `tie` (label_0 == 0.5), `no_label` (has_label False),
    `not_different` (are_different False). Images are resized (centre crop) to `resolution`. An
    undecodable image is skipped, counted as `bad` and named; more than `max_bad_fraction` bad rows
    stop the load with the rows named. A missing required column is an error naming it."""
    ds = _open(path)
    missing = [c for c in REQUIRED if c not in ds.column_names]
    if missing:
        raise InputError(f"pairs {path!r} lack column(s) {missing}; Pick-a-Pic needs {list(REQUIRED)}")
    dropped = {**dict.fromkeys(DROPPED, 0), "bad": 0}
    captions, chosen, rejected, bad = [], [], [], []
    for i, row in enumerate(ds):
        reason = drop_reason(row, i)
        if reason in dropped:
            dropped[reason] += 1
            continue
        if reason:
            bad.append(reason)
            continue
        try:
            images = []
            for col in ("jpg_0", "jpg_1"):
                try:
                    images.append(resize_center_crop(decode_image(row[col]), resolution))
                except Exception as e:
                    raise ValueError(f"row {i}, column {col}: undecodable image ({type(e).__name__})") from e
        except ValueError as e:
            bad.append(str(e))
            continue
        first_wins = row["label_0"] > row["label_1"]
        captions.append(row["caption"])
        chosen.append(images[0] if first_wins else images[1])
        rejected.append(images[1] if first_wins else images[0])
    dropped["bad"] = len(bad)
    if len(bad) > max_bad_fraction * len(ds):
        raise InputError(f"pairs {path!r}: {len(bad)} of {len(ds)} rows are bad (> {max_bad_fraction:.0%}): "
                         + "; ".join(bad[:20]))
    if not captions:
        raise InputError(f"pairs {path!r}: no usable pair (dropped: {dropped})")
    to_tensor = lambda imgs: torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).contiguous()  # noqa: E731
    return Pairs(captions, to_tensor(chosen), to_tensor(rejected), dropped)
