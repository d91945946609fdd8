"""Memorization audit: does a model copy its training images?

Each generated image is embedded with the copy-detection features of deduplication
(`base_model.features`) and matched to its nearest training image (an exact faiss inner-product
search). A generation whose cosine to its nearest training image is ≥ the threshold counts as a
copy: the copy-detection test of Somepalli et al. 2023 (arXiv 2212.03860, SSCD similarity), at
the feature network's threshold by default (`features.copy_threshold`: the seed paper's 0.5
for SSCD). `reward.eval --memorization` reports per
model the share of copies with a bootstrap CI over prompts (`reward.stats`) and the closest pairs.
"""

from __future__ import annotations

import numpy as np
import torch

from base_model.dedup import ImageSource, embed_source, square
from base_model.features import embed, load_features

from . import stats


class TrainingSet:
    """The embedded training images of an audit: built once, matched against every model."""

    def __init__(self, dataset: str, feature_model: str, resolution: int, num_images: int = 50_000,
                 image_column: str = "image", batch_size: int = 256):
        import faiss

        self.source = ImageSource(dataset, resolution, image_column, "train", num_images)
        self.features, self.resolution = load_features(feature_model), resolution
        self.positions, emb = embed_source(self.source, self.features, batch_size)
        self.index = faiss.IndexFlatIP(emb.shape[1])
        self.index.add(np.ascontiguousarray(emb, dtype=np.float32))

    def nearest(self, images: torch.Tensor, batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
        """(cosine, position) of the nearest training image of each image (N, 3, H, W) in [-1, 1]."""
        batches = (square(images[i:i + batch_size].float(), self.resolution) for i in range(0, len(images), batch_size))
        emb = embed(self.features, batches, len(images), desc="audit")
        sims, ids = self.index.search(np.ascontiguousarray(emb, dtype=np.float32), 1)
        return sims[:, 0], self.positions[ids[:, 0]]


def audit(cos: np.ndarray, groups: np.ndarray, threshold: float) -> dict:
    """The share of generations whose nearest training image has cosine ≥ threshold, and the mean of
    that cosine, each with a bootstrap CI resampling prompts (`groups`)."""
    copies = (cos >= threshold).astype(np.float64)
    return {"threshold": threshold, "copy_rate": stats.mean_ci(copies, groups),
            "nearest_cos": stats.mean_ci(cos, groups), "copies": int(copies.sum())}


def closest_pairs(cos: np.ndarray, positions: np.ndarray, rows: np.ndarray, n: int) -> list[dict]:
    """The n generations closest to a training image: {"image": index, "train_row", "cos"}, closest first."""
    order = np.argsort(-cos, kind="stable")[:n]
    return [{"image": int(i), "train_position": int(positions[i]), "train_row": int(rows[positions[i]]),
             "cos": float(cos[i])} for i in order]
