"""Training data as tensors: the built-in shapes world, or image–caption data through `datasets`.

Both give `ImageCaptions`: uint8 images (N, 3, H, W) and their captions. Images are decoded and
resized once; text embeddings and latents are cached once per caption / image by the caller.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from .errors import InputError, MissingInput
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


def _open_dataset(path: str):
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


def _decode(value) -> Image.Image:
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


def load_image_captions(path: str, resolution: int, image_column: str = "image",
                        caption_column: str = "caption", max_bad_fraction: float = 0.01) -> ImageCaptions:
    """Images and captions from a local save_to_disk, parquet, arrow or imagefolder dataset.
    An undecodable image is skipped and counted; more than `max_bad_fraction` stops the run
    with the offending rows named."""
    import datasets

    ds = _open_dataset(path)
    missing = [c for c in (image_column, caption_column) if c not in ds.column_names]
    if missing:
        raise InputError(f"{path}: missing column(s) {missing}; columns are {ds.column_names} "
                         f"(set --image_column / --caption_column)")
    if isinstance(ds.features[image_column], datasets.Image):
        ds = ds.cast_column(image_column, datasets.Image(decode=False))  # decode here, row by row
    images, captions, bad = [], [], []
    for i, row in enumerate(ds):
        try:
            images.append(resize_center_crop(_decode(row[image_column]), resolution))
            captions.append(str(row[caption_column]))
        except Exception as e:  # noqa: BLE001 — any decoder failure is a bad row
            value = row[image_column]
            name = value.get("path") if isinstance(value, dict) and value.get("path") else f"row {i}"
            bad.append(f"{name} ({type(e).__name__})")
    if len(bad) > max_bad_fraction * len(ds):
        raise InputError(f"{path}: {len(bad)} of {len(ds)} images could not be decoded "
                         f"(more than {max_bad_fraction:.0%}): {', '.join(bad[:20])}")
    if not images:
        raise InputError(f"{path}: no images")
    return ImageCaptions(torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous(), captions, len(bad))
