"""Where the flow runs: pixel space, or the latent space of a frozen autoencoder (SD3's recipe).

Both spaces share one interface: `encode(x) -> z`, `decode(z) -> x`, `channels`, `downsample`, and
`encode_cached(keys, images)`, which encodes each image once (SD3 precomputes its latents).
Images are (B, 3, H, W) in [-1, 1]; latents are (B, channels, H / downsample, W / downsample).

The shapes world is small and flat-coloured, so it trains in pixel space (an identity
"autoencoder"). For real images, `LatentSpace` wraps a diffusers `AutoencoderKL` and normalises
its latents as SD3 does: `z = (mean − shift_factor) · scaling_factor` (0.0609 and 1.5305 for SD3's
16-channel VAE), which brings them to about unit variance, the scale of the noise.
"""

from __future__ import annotations

import os
from typing import Hashable, Sequence

import torch

from .errors import InputError, MissingInput


class ImageSpace:
    """The shared part: a cache of encoded images by key."""

    channels: int
    downsample: int

    def __init__(self):
        self.cache: dict[Hashable, torch.Tensor] = {}  # image key → z (channels, h, w)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def encode_cached(self, keys: Sequence[Hashable], images: torch.Tensor) -> torch.Tensor:
        """z for images (B, 3, H, W) named by `keys`; only keys not seen before are encoded, once
        each, so an epoch over the data set costs one encoder pass in total. A sampling encoder
        (`LatentSpace(sample=True)`) thus fixes one latent sample per image, as precomputing does."""
        first = {}  # key → index of its first image in this batch
        for i, k in enumerate(keys):
            if k not in self.cache:
                first.setdefault(k, i)
        if first:
            z = self.encode(images[list(first.values())])
            for k, zk in zip(first, z):
                self.cache[k] = zk.clone()  # clone: keep one image's latent, not the batch
        return torch.stack([self.cache[k] for k in keys])


class PixelSpace(ImageSpace):
    """Identity: the flow runs on the pixels themselves, already in [-1, 1]."""

    channels, downsample = 3, 1

    def encode(self, x):
        return x

    def decode(self, z):
        return z


class LatentSpace(ImageSpace):
    """A frozen diffusers `AutoencoderKL`, fp32, eval mode, with SD3's latent normalisation."""

    def __init__(self, path: str, sample: bool = False, generator: torch.Generator | None = None):
        super().__init__()
        from diffusers import AutoencoderKL  # imported here: pixel space needs no diffusers

        if not os.path.isfile(os.path.join(path, "config.json")):
            where = "folder" if os.path.isdir(path) else "path (it does not exist)"
            raise MissingInput(f"VAE {where} {path!r} has no config.json: point at a folder written by "
                                    "AutoencoderKL.save_pretrained (for SD3, the repository's vae/ folder), "
                                    "holding config.json and diffusion_pytorch_model.safetensors")
        self.vae = AutoencoderKL.from_pretrained(path, local_files_only=True, dtype=torch.float32)
        self.vae.eval().requires_grad_(False)
        cfg = self.vae.config
        self.channels = cfg.latent_channels
        self.downsample = 2 ** (len(cfg.block_out_channels) - 1)  # one 2× downsampling between levels
        self.scaling_factor = cfg.scaling_factor
        self.shift_factor = cfg.shift_factor or 0.0  # SD1/SDXL VAEs have none
        # The posterior's mean is deterministic, so cached latents do not depend on the batch; a
        # sample adds the VAE's tiny posterior noise, drawn from `generator`.
        self.sample, self.generator = sample, generator

    @torch.no_grad()
    def encode(self, x):
        dist = self.vae.encode(x).latent_dist
        z = dist.sample(self.generator) if self.sample else dist.mean  # (B, channels, H/f, W/f)
        return (z - self.shift_factor) * self.scaling_factor

    @torch.no_grad()
    def decode(self, z):
        return self.vae.decode(z / self.scaling_factor + self.shift_factor).sample


def image_space(spec: str = "pixels", sample: bool = False) -> ImageSpace:
    """From a config string: "pixels", or "vae:PATH" for a local AutoencoderKL folder."""
    if spec == "pixels":
        return PixelSpace()
    kind, _, path = spec.partition(":")
    if kind != "vae" or not path:
        raise InputError(f"unknown image space {spec!r}: use 'pixels' or 'vae:PATH'")
    return LatentSpace(path, sample=sample)
