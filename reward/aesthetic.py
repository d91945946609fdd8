"""LAION aesthetic predictor v2 (improved-aesthetic-predictor, `simple_inference.py`).

A linear-probe MLP on the L2-normalised CLIP ViT-L/14 image embedding, trained to regress 1-10
ratings (SAC + LAION-Logos + AVA): score = MLP(e / ‖e‖). Prompts are ignored.

`load(path)` takes one folder: a transformers CLIP ViT-L/14 folder (config.json and
model.safetensors or pytorch_model.bin of openai/clip-vit-large-patch14; the processor's
preprocessor_config.json optional) plus `mlp.safetensors`, the head's weights under the authors'
names (layers.0, .2, .4, .6, .7). From their release:

    save_file(torch.load("sac+logos+ava1-l14-linearMSE.pth", weights_only=True), "mlp.safetensors")
"""

from __future__ import annotations

import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from .clipscore import HF_WEIGHTS, default_device, in_batches, processor_settings, require, to_model_pixels

MLP_FILE = "mlp.safetensors"


class MLP(nn.Module):
    """The authors' head, kept as they wrote it: linear layers with dropout and no activations
    (their ReLUs are commented out), so it is one affine map at inference. ImageReward reuses it."""

    def __init__(self, input_size: int = 768):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(input_size, 1024), nn.Dropout(0.2),
            nn.Linear(1024, 128), nn.Dropout(0.2),
            nn.Linear(128, 64), nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def load_mlp(path: str) -> MLP:
    from safetensors.torch import load_file

    state = load_file(os.path.join(path, MLP_FILE))
    mlp = MLP(state["layers.0.weight"].shape[1])
    mlp.load_state_dict(state)
    return mlp.eval()


def load(path: str | None, batch_size: int = 32, device: str | None = None):
    from transformers import CLIPConfig, CLIPVisionModelWithProjection

    require(path, "aesthetic", ["config.json", HF_WEIGHTS, MLP_FILE])
    device = default_device(device)
    config = CLIPConfig.from_pretrained(path, local_files_only=True)
    config.vision_config.projection_dim = config.projection_dim  # the tower alone would read its own (default 512)
    clip = CLIPVisionModelWithProjection.from_pretrained(path, config=config.vision_config, local_files_only=True,
                                                         dtype=torch.float32)
    clip, mlp = clip.eval().to(device), load_mlp(path).to(device)
    size, crop, mean, std = processor_settings(path, clip.config.image_size)

    def score_batch(images, prompts):
        emb = clip(pixel_values=to_model_pixels(images.to(device), size, crop, mean, std)).image_embeds
        return mlp(F.normalize(emb, dim=-1)).squeeze(-1)

    return lambda images, prompts: in_batches(score_batch, images, prompts, batch_size)
