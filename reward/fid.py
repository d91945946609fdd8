"""Fréchet distance in the learned image–text feature space (`reward.imagetext`).

FID (Heusel et al. 2017, arXiv 1706.08500) fits a Gaussian to the features of each image set and
measures ‖μ_r − μ_f‖² + Tr(Σ_r + Σ_f − 2(Σ_r Σ_f)^½). Inception features mean little on 32×32 flat
shapes, so the features are the in-project model's unit image embeddings (as "CLIP-FID" uses CLIP's);
the math is torchmetrics' `FrechetInceptionDistance` with that network as its `feature` module.
Values are on the scale of unit vectors (at most ~4), not comparable with Inception FIDs.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .imagetext import ImageTextModel


class ImageFeatures(nn.Module):
    """torchmetrics' custom `feature` network: uint8 (N, 3, H, W) in [0, 255] or float in [-1, 1]
    (the model's pixel convention) → (N, D) unit image embeddings. Never leaves eval mode."""

    def __init__(self, model: ImageTextModel):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.num_features = model.config.embed_dim  # read by torchmetrics instead of a dummy forward

    def train(self, mode: bool = True):
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype == torch.uint8:
            images = images.float().div(127.5).sub(1.0)
        return self.model.image_features(images.float())


def frechet_distance(real_images: torch.Tensor, fake_images: torch.Tensor, model: ImageTextModel | str,
                     batch_size: int = 500) -> float:
    """FID between two image sets (each uint8 or float in [-1, 1], (N, 3, H, W), N ≥ 2) in the
    features of `model` (an ImageTextModel or its folder)."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    if isinstance(model, str):
        model = ImageTextModel.from_pretrained(model)
    if len(real_images) < 2 or len(fake_images) < 2:
        raise ValueError(f"FID needs at least 2 images per set, got {len(real_images)} and {len(fake_images)}")
    # `normalize` only names the input dtype for a custom network: True for floats, False for uint8
    fid = FrechetInceptionDistance(feature=ImageFeatures(model), normalize=real_images.is_floating_point())
    for images, real in ((real_images, True), (fake_images, False)):
        for i in range(0, len(images), batch_size):
            fid.update(images[i:i + batch_size], real=real)
    return float(fid.compute())
