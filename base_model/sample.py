"""Sample a grid from an MMDiT checkpoint with fixed seeds, conditioned on prompts.

    python -m base_model.sample --checkpoint runs/toy/final --prompts "a red square" "a blue circle"
    python -m base_model.sample --checkpoint runs/toy/final            # 16 held-out shapes prompts
    python -m base_model.sample --checkpoint runs/real/final --height 384 --width 640   # an aspect bucket

The checkpoint's `conditioning.json` (written by pretraining) names its text encoders. Writes
`output_dir/grid.png` (one image per prompt, seed = index) and prints where it is.
"""

import argparse
import json
import os

from .cli import ArgumentParser
from .errors import InputError, entry_point
from .mmdit import MMDiT
from .sampling import add_sampler_args, sample
from .shapes import make_split, save_grid


def load_conditioning(checkpoint: str) -> dict:
    """Text encoders and image space a checkpoint was trained with (pretraining's defaults if absent)."""
    path = os.path.join(checkpoint, "conditioning.json")
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    return {"text_encoders": ["minilm"], "image_space": "pixels"}


@entry_point
def main(argv=None):
    from .text import TextEmbedder
    from .vae import image_space

    ap = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="a folder with config.json + model.safetensors")
    ap.add_argument("--prompts", nargs="*", default=None)
    ap.add_argument("--output_dir", default="runs/samples")
    add_sampler_args(ap)
    ap.add_argument("--shift", type=float, default=1.0)
    ap.add_argument("--height", type=int, default=0, help="pixels; 0: the model's training resolution")
    ap.add_argument("--width", type=int, default=0, help="pixels; 0: the model's training resolution")
    args = ap.parse_args(argv)

    model = MMDiT.from_pretrained(args.checkpoint).eval()
    cond = load_conditioning(args.checkpoint)
    prompts = args.prompts or [s.caption for s in make_split("heldout_prompts", 16)]
    context, pooled = TextEmbedder(cond["text_encoders"]).encode(prompts)
    cfg, space = model.config, image_space(cond["image_space"])
    step = space.downsample * cfg.patch_size  # a side must be a whole number of patches
    h, w = ((args.height or cfg.sample_size * space.downsample) // space.downsample,
            (args.width or cfg.sample_size * space.downsample) // space.downsample)
    if (args.height or 0) % step or (args.width or 0) % step:
        raise InputError(f"--height/--width must be multiples of {step} px (patch × the image space's downsampling)")
    z = sample(model, context, pooled, list(range(len(prompts))), (cfg.in_channels, h, w),
               steps=args.steps, shift=args.shift, guidance=args.guidance, solver=args.solver)
    images = space.decode(z).clamp(-1, 1)
    os.makedirs(args.output_dir, exist_ok=True)
    path = os.path.join(args.output_dir, "grid.png")
    save_grid(images, path, nrow=8)
    print(f"wrote {path}: " + "; ".join(prompts))


if __name__ == "__main__":
    main()
