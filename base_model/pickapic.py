"""The Pick-a-Pic v2 schema that every preference pair of flowalign uses, and writing it.

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
import shutil
import tempfile

import numpy as np
from PIL import Image

from .errors import InputError

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


def write_pairs(rows: list[dict], output: str, info: dict) -> None:
    """save_to_disk into a temporary folder, then swap it in: a kill never leaves half a dataset.
    An existing `output` is replaced only when it is a folder of pairs written here; anything else
    there is refused (InputError naming it), never deleted."""
    output = os.path.normpath(output)  # "runs/pairs/" names the folder itself
    check_replaceable(output)
    parent = os.path.dirname(os.path.abspath(output))
    os.makedirs(parent, exist_ok=True)
    work = tempfile.mkdtemp(dir=parent, prefix=".tmp-pairs-")  # the new pairs, then the old; removed at the end
    try:
        new = os.path.join(work, "new")
        pairs_dataset(rows).save_to_disk(new)
        with open(os.path.join(new, "pairs_info.json"), "w") as f:
            json.dump(info, f)
        if os.path.isdir(output):
            os.replace(output, os.path.join(work, "old"))
        os.replace(new, output)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def check_replaceable(output: str) -> None:
    """`output` must be absent, an empty folder, or a folder that write_pairs wrote: save_to_disk's
    shards, state.json and dataset_info.json, and our pairs_info.json, nothing else."""
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
