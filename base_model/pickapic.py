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

import numpy as np
from PIL import Image

from .errors import InputError
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
