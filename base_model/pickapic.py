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
import shutil

import numpy as np
from PIL import Image

REQUIRED = ("caption", "jpg_0", "jpg_1", "label_0", "label_1")
OPTIONAL = {"model_0": "", "model_1": "", "user_id": 0, "ranking_id": 0, "image_0_uid": "", "image_1_uid": "",
            "best_image_uid": "", "has_label": True, "are_different": True}


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
    """save_to_disk into a temporary folder, then rename: a kill never leaves half a dataset."""
    tmp = output.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    pairs_dataset(rows).save_to_disk(tmp)
    with open(os.path.join(tmp, "pairs_info.json"), "w") as f:
        json.dump(info, f)
    shutil.rmtree(output, ignore_errors=True)
    os.replace(tmp, output)
