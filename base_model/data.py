"""Images from data: the built-in shapes world as tensors, and the pieces that read image–caption
data through `datasets` (opening a local dataset, decoding one image, resize and centre crop).
Trainers read their data from a precomputed cache (`base_model.precompute`, `base_model.cache`).
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from .errors import MissingInput
from .shapes import WorldConfig, make_split, render


@dataclass
class ImageCaptions:
    images: torch.Tensor  # (N, 3, H, W) uint8
    captions: list[str]
    skipped: int = 0  # undecodable rows skipped

    def __len__(self):
        return len(self.captions)


def to_model_space(images_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] → float [-1, 1], the pixel-space convention of the model."""
    return images_uint8.float().div(127.5).sub(1.0)


def shapes_data(split: str, n: int, resolution: int = 32, world: WorldConfig = WorldConfig()):
    """The first n scenes of a shapes-world split, rendered. Returns (ImageCaptions, scenes)."""
    scenes = make_split(split, n, world)
    images = np.stack([render(s, resolution, world) for s in scenes])  # (N, H, W, 3)
    return ImageCaptions(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(),
                         [s.caption for s in scenes]), scenes


def open_dataset(path: str):
    import datasets

    if not os.path.exists(path):
        raise MissingInput(f"--dataset {path!r} does not exist")
    if os.path.isdir(path) and os.path.exists(os.path.join(path, "dataset_info.json")):
        return datasets.load_from_disk(path)  # a save_to_disk folder
    if path.endswith(".parquet") or (os.path.isdir(path) and any(f.endswith(".parquet") for f in os.listdir(path))):
        files = path if path.endswith(".parquet") else os.path.join(path, "*.parquet")
        return datasets.load_dataset("parquet", data_files=files, split="train")
    if os.path.isdir(path) and any(f.endswith(".arrow") for f in os.listdir(path)):
        return datasets.load_dataset("arrow", data_files=os.path.join(path, "*.arrow"), split="train")
    return datasets.load_dataset("imagefolder", data_dir=path, split="train")  # needs metadata.jsonl/csv


def decode_image(value) -> Image.Image:
    if isinstance(value, Image.Image):
        return value
    if isinstance(value, dict):  # datasets.Image(decode=False): {"bytes": ..., "path": ...}
        value = value.get("bytes") or value.get("path")
    if isinstance(value, (bytes, bytearray)):
        return Image.open(io.BytesIO(value))
    return Image.open(value)


def resize_center_crop(img: Image.Image, height: int, width: int | None = None) -> np.ndarray:
    """Resize to cover height × width (a square `height` when width is None), then centre crop."""
    width = width or height
    img = img.convert("RGB")
    scale = max(height / img.height, width / img.width)
    w, h = max(width, round(img.width * scale)), max(height, round(img.height * scale))
    img = img.resize((w, h), Image.BICUBIC)
    left, top = (w - width) // 2, (h - height) // 2
    return np.asarray(img.crop((left, top, left + width, top + height)))
