"""Loading a model as a spec: a checkpoint, or a checkpoint plus a LoRA adapter (PEFT format).

    "runs/toy/final"                    an MMDiT checkpoint (config.json + model.safetensors)
    "/models/sd3-medium"                a diffusers SD3 / SD3.5 folder (`base_model/sd3.py`)
    "runs/toy/final+runs/dpo/final"     that checkpoint with an adapter applied (merged for speed)
    "runs/dpo/final"                    an adapter folder alone: its base is the one it records

An adapter folder written by `align.dpo` holds PEFT's `adapter_config.json` and
`adapter_model.safetensors`, plus `flowalign_base.json` with the base's path and the SHA-256 of
its weights, checked on load. This lives beside the model's own loading so that evaluation
(`reward/`) never imports the trainer it judges (`align/`).

    python -m base_model.adapters merge --model runs/toy/final+runs/dpo/final --output runs/dpo/merged
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
from dataclasses import dataclass

import torch

from .cli import ArgumentParser
from .errors import InputError, MissingInput, entry_point
from .mmdit import MMDiT
from .outputs import atomic_folder, check_model_output
from .sd3 import is_sd3_folder

BASE_RECORD = "flowalign_base.json"


def weights_sha256(checkpoint: str) -> str:
    """SHA-256 of the transformer's weights: model.safetensors, or an SD3 folder's transformer/ shards."""
    files = [os.path.join(checkpoint, "model.safetensors")]
    if is_sd3_folder(checkpoint):
        folder = os.path.join(checkpoint, "transformer")
        files = sorted(os.path.join(folder, n) for n in os.listdir(folder) if n.endswith(".safetensors"))
    h = hashlib.sha256()
    for path in files:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def is_adapter(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "adapter_config.json"))


def split_spec(spec: str) -> tuple[str, str | None]:
    """→ (base checkpoint, adapter folder or None), validating that both exist."""
    base, _, adapter = spec.partition("+")
    if not adapter and is_adapter(base):
        base, adapter = read_base_record(base)["base"], base
    if not os.path.isfile(os.path.join(base, "config.json")) and not is_sd3_folder(base):
        raise MissingInput(f"model spec {spec!r}: {base!r} is neither an MMDiT checkpoint (no config.json) "
                          "nor a diffusers SD3 folder (model_index.json + transformer/)")
    if adapter and not is_adapter(adapter):
        raise MissingInput(f"model spec {spec!r}: {adapter!r} is not a PEFT adapter folder "
                          "(expected adapter_config.json and adapter_model.safetensors)")
    return base, adapter or None


def read_base_record(adapter: str) -> dict:
    path = os.path.join(adapter, BASE_RECORD)
    if not os.path.isfile(path):
        raise MissingInput(f"{adapter!r} records no base model ({BASE_RECORD}); pass BASE+ADAPTER")
    with open(path) as f:
        return json.load(f)


def conditioning_dir(spec: str) -> str:
    """The folder whose conditioning.json describes the model's text encoders and image space."""
    return split_spec(spec)[0]


def load_model(spec: str, device="cpu", merge: bool = True) -> torch.nn.Module:
    """An MMDiT from a spec (see the module doc). With an adapter, the base's hash must match the
    adapter's record; the adapter is merged into the weights unless `merge=False` (then a PeftModel)."""
    base, adapter = split_spec(spec)
    if is_sd3_folder(base):
        from .sd3 import load_sd3
        model = load_sd3(base, device=device)[0]
    else:
        model = MMDiT.from_pretrained(base, device=device)
    return apply_adapter(model, base, adapter, merge)


def apply_adapter(model, base: str, adapter: str | None, merge: bool = True):
    if adapter is None:
        return model
    if not os.path.isfile(os.path.join(adapter, "adapter_model.safetensors")):
        held = os.path.isfile(os.path.join(adapter, "adapter_model.bin"))  # a pickle: loading it can run code
        raise InputError(f"adapter {adapter!r} has no adapter_model.safetensors"
                         f"{' (only adapter_model.bin, never loaded)' if held else ''}; adapters load from "
                         "safetensors only")
    record_path = os.path.join(adapter, BASE_RECORD)
    if os.path.isfile(record_path):
        expected = read_base_record(adapter)["sha256"]
        if weights_sha256(base) != expected:
            raise InputError(f"adapter {adapter!r} was trained on a base with SHA-256 {expected[:12]}…, "
                             f"but {base!r} differs")
    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(model, adapter)
    return peft_model.merge_and_unload() if merge else peft_model


@dataclass
class Loaded:
    """Everything needed to generate from a spec: the network, its text conditioning, its image
    space, and how it samples (the shift, and the unconditional branch of CFG: None means zeroed
    text, as flowalign's own models are trained; SD3 uses the encoded empty prompt)."""
    model: torch.nn.Module
    text: object  # TextEmbedder (or SD3TextEncoder)
    space: object  # ImageSpace
    shift: float
    uncond: tuple | None
    image_space: str  # "pixels", "vae:PATH" or "sd3"
    conditioning: dict  # what a checkpoint trained from this one records in conditioning.json

    @property
    def image_shape(self) -> tuple[int, int, int]:
        c = self.model.config  # a PeftModel forwards .config to the MMDiT
        return (c.in_channels, c.sample_size, c.sample_size)

    def shape_at(self, height: int = 0, width: int = 0) -> tuple[int, int, int]:
        """(C, h, w) of a sample `height` × `width` px (0: the training resolution). A side must be a
        whole number of patches and within the position table, or an InputError names the limit."""
        if not height and not width:
            return self.image_shape
        c, f = self.model.config, self.space.downsample
        height, width = height or self.resolution, width or self.resolution
        step = f * c.patch_size
        if height % step or width % step:
            raise InputError(f"--height/--width {height}x{width}: sides must be multiples of {step} px "
                             f"(patch × the image space's downsampling)")
        if max(height, width) > self.max_side:
            raise InputError(f"--height/--width {height}x{width}: the model's position table covers "
                             f"sides up to {self.max_side} px")
        return (c.in_channels, height // f, width // f)

    @property
    def resolution(self) -> int:
        return self.model.config.sample_size * self.space.downsample

    @property
    def encoders(self) -> tuple[list[str], str]:
        """(text encoder specs, image space spec): what a data cache for this model is made with."""
        text = self.conditioning.get("text_encoders") or [f"sd3:{self.conditioning.get('sd3')}"]
        return list(text), self.image_space

    @property
    def max_side(self) -> int:
        """The longest image side (px) its position table covers."""
        c = self.model.config
        return c.pos_embed_max_size * c.patch_size * self.space.downsample

    def generate(self, captions, seeds, steps: int = 20, guidance: float = 4.0, shift: float | None = None,
                 batch_size: int = 64, progress: bool = True, context=None, solver: str = "euler",
                 height: int = 0, width: int = 0) -> torch.Tensor:
        """Images (N, 3, H, W) in [-1, 1], one per (caption, seed); `height` × `width` px (0: the
        training resolution)."""
        from .sampling import sample

        context, pooled = context if context is not None else self.text.encode(list(captions))
        z = sample(self.model, context, pooled, list(seeds), self.shape_at(height, width), steps=steps,
                   shift=self.shift if shift is None else shift, guidance=guidance, uncond=self.uncond,
                   batch_size=batch_size, progress=progress, solver=solver)
        return self.space.decode(z).clamp(-1, 1)


def load_conditioning(checkpoint: str) -> dict:
    """Text encoders and image space a checkpoint was trained with (pretraining's defaults if absent)."""
    path = os.path.join(checkpoint, "conditioning.json")
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    return {"text_encoders": ["minilm"], "image_space": "pixels"}


def load(spec: str, merge: bool = True, sample_shift: float = 1.0, text_encoders: bool = True) -> Loaded:
    """Model + text encoders + image space of a spec (checkpoint, +adapter, or SD3 folder).
    Checkpoints of ours sample with `sample_shift`; SD3 folders with their scheduler's shift.
    `text_encoders=False`: a checkpoint of ours comes without them (text None), for a trainer that
    reads its embeddings from a cache."""
    from .text import TextEmbedder
    from .vae import image_space

    base, adapter = split_spec(spec)
    if is_sd3_folder(base):
        from .sd3 import load_sd3

        model, text, space, info = load_sd3(base)
        model = apply_adapter(model, base, adapter, merge).eval()
        return Loaded(model, text, space, info["shift"], text.encode([""]), "sd3",
                      {"sd3": os.path.abspath(base), "image_space": "sd3", "resolution": info["resolution"]})
    cond = load_conditioning(base)
    model = apply_adapter(MMDiT.from_pretrained(base), base, adapter, merge).eval()
    if "sd3" in cond:  # pretraining continued from SD3 weights: SD3's text encoders, VAE and schedule
        from .sd3 import SD3TextEncoder, scheduler_shift
        from .vae import LatentSpace

        text = SD3TextEncoder(cond["sd3"])
        return Loaded(model, text, LatentSpace(os.path.join(cond["sd3"], "vae")), scheduler_shift(cond["sd3"]),
                      text.encode([""]), "sd3", cond)
    text = TextEmbedder(cond["text_encoders"]) if text_encoders else None
    return Loaded(model, text, image_space(cond["image_space"]), sample_shift,
                  None, cond["image_space"], cond)


def require_rf(loaded: Loaded, flag: str = "--base") -> Loaded:
    """The alignment losses are rectified flow's velocity losses: refuse a base trained as eps or v."""
    form = loaded.model.config.formulation
    if form != "rf":
        raise InputError(f"{flag}: the model was trained as {form!r}; alignment trains rectified-flow (rf) models only")
    return loaded


def merge(spec: str, output: str, overwrite: bool = False) -> str:
    """Write base + adapter as one plain checkpoint that `MMDiT.from_pretrained` loads (atomically;
    an existing `output` is replaced only with `overwrite` and only when it is a checkpoint)."""
    base, _ = split_spec(spec)
    check_model_output(output, overwrite)
    model = load_model(spec)
    with atomic_folder(output) as tmp:
        model.save_pretrained(tmp)
        if os.path.isfile(os.path.join(base, "conditioning.json")):
            shutil.copy(os.path.join(base, "conditioning.json"), os.path.join(tmp, "conditioning.json"))
    return output


@entry_point
def main(argv=None):
    ap = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    m = sub.add_parser("merge", help="merge an adapter into its base and save a plain checkpoint")
    m.add_argument("--model", required=True, help="BASE+ADAPTER, or an adapter folder that records its base")
    m.add_argument("--output", required=True)
    m.add_argument("--overwrite_output_dir", action="store_true", help="replace a checkpoint already at --output")
    args = ap.parse_args(argv)
    print(f"merged model written to {merge(args.model, args.output, args.overwrite_output_dir)}")


if __name__ == "__main__":
    main()
