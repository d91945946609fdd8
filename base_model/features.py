"""Copy-detection features: the embedding that deduplication (`base_model.dedup`) and the
memorization audit (`reward.memorization`) compare images by. One feature network, three kinds:

    "thumbnail"     built in: the image at 8×8 (antialiased), minus its mean, as a unit vector. A
                    perceptual-hash-like feature: it finds exact copies, re-encodes, colour jitter and
                    small crops of flat synthetic images (measured in tests/test_dedup.py at cosine
                    ≥ 0.9), not semantic copies. Needs no weights.
    FILE            a TorchScript file, e.g. SSCD's (Pizzi et al. 2022, arXiv 2202.10261), the seed
                    paper's copy detector: `torch.jit.load`. It gets images resized to the run's
                    resolution (SSCD: 288) and normalised with ImageNet's mean and std, as SSCD's
                    README prescribes.
    FOLDER          the image tower of the in-project image–text model (`reward.imagetext`): a folder
                    with config.json + model.safetensors. The one place base_model reads a reward
                    model; it is imported only when such a folder is given.

Every kind maps float images (N, 3, H, W) in [-1, 1] to L2-normalised float32 (N, D).
"""

from __future__ import annotations

import os
from typing import Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .errors import InputError, MissingInput

THUMBNAIL = "thumbnail"
# the cosine at or above which two images are copies, per kind: the seed paper's 0.5 for SSCD (and
# learned features); the thumbnail needs 0.9 (at 0.5 it merges most distinct shapes-world scenes)
DEFAULT_THRESHOLD = {THUMBNAIL: 0.9}
SSCD_THRESHOLD = 0.5


def copy_threshold(spec: str, threshold: float = 0.0) -> float:
    """`threshold`, or (0) the default of the feature network `spec`."""
    return threshold if threshold else DEFAULT_THRESHOLD.get(spec, SSCD_THRESHOLD)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def thumbnail(images: torch.Tensor, side: int = 8) -> torch.Tensor:
    """(N, 3, H, W) in [-1, 1] → (N, 3·side²) unit vectors: the antialiased thumbnail minus its mean."""
    x = F.interpolate(images.float(), size=(side, side), mode="bilinear", antialias=True, align_corners=False)
    x = x.flatten(1)
    return F.normalize(x - x.mean(1, keepdim=True), dim=1)


def imagenet_normalised(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] → [0, 1] → (x − mean) / std per channel, the input convention of SSCD's TorchScript files."""
    mean, std = (torch.tensor(v, dtype=images.dtype).view(1, 3, 1, 1) for v in (IMAGENET_MEAN, IMAGENET_STD))
    return ((images + 1) / 2 - mean) / std


def load_features(spec: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The feature network of `spec` ("thumbnail", a TorchScript file, or an image–text model folder)
    as a function from images in [-1, 1] to unit vectors. A missing or unreadable path is an InputError."""
    if spec == THUMBNAIL:
        return thumbnail
    if not os.path.exists(spec):
        raise MissingInput(f"--feature_model {spec!r}: neither {THUMBNAIL!r} nor an existing file or folder")
    if os.path.isdir(spec):
        from reward.imagetext import ImageTextModel  # the image tower; see the module docstring

        try:
            model = ImageTextModel.from_pretrained(spec).requires_grad_(False)
        except FileNotFoundError as e:
            raise MissingInput(f"--feature_model {spec!r}: {e}") from e
        return model.image_features
    try:
        net = torch.jit.load(spec, map_location="cpu").eval()
    except (RuntimeError, ValueError) as e:
        raise InputError(f"--feature_model {spec!r}: not a TorchScript file ({' '.join(str(e).split())[:200]})") from e
    return lambda images: F.normalize(net(imagenet_normalised(images.float())).float(), dim=1)


@torch.no_grad()
def embed(features: Callable, batches: Iterable[torch.Tensor], total: int, desc: str = "embed") -> np.ndarray:
    """float32 (N, D) unit embeddings of every image of `batches` (each (B, 3, H, W) in [-1, 1]),
    with a progress bar over the `total` images."""
    out = []
    with tqdm(total=total, unit="img", unit_scale=True, desc=desc) as bar:
        for images in batches:
            e = F.normalize(features(images).float(), dim=1)
            if e.ndim != 2 or len(e) != len(images):
                raise InputError(f"the feature network returned shape {tuple(e.shape)} for {len(images)} images; "
                                 f"expected (N, D)")
            out.append(e.numpy())
            bar.update(len(images))
    return np.concatenate(out) if out else np.zeros((0, 1), np.float32)
