"""Sample a grid from an MMDiT checkpoint with fixed seeds, conditioned on prompts.

    python -m base_model.sample --checkpoint runs/toy/final --prompts "a red square" "a blue circle"
    python -m base_model.sample --checkpoint runs/toy/final            # 16 held-out shapes prompts
    python -m base_model.sample --checkpoint runs/real/final --height 384 --width 640   # an aspect bucket

The checkpoint's `conditioning.json` (written by pretraining) names its text encoders; an adapter
(CHECKPOINT+ADAPTER) or an SD3 folder loads through the same `adapters.load`. Writes
`output_dir/grid.png` (one image per prompt, seed = index) and prints where it is.
"""

import argparse
import os

from .cli import ArgumentParser
from .errors import entry_point
from .sampling import add_sampler_args
from .shapes import make_split, save_grid


@entry_point
def main(argv=None):
    from .adapters import load

    ap = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="a checkpoint folder, CHECKPOINT+ADAPTER or an SD3 folder")
    ap.add_argument("--prompts", nargs="*", default=None)
    ap.add_argument("--output_dir", default="runs/samples")
    add_sampler_args(ap)
    ap.add_argument("--shift", type=float, default=None, help="sampling shift (default: 1 for ours, an SD3 "
                                                              "folder's scheduler's)")
    ap.add_argument("--height", type=int, default=0, help="pixels; 0: the model's training resolution")
    ap.add_argument("--width", type=int, default=0, help="pixels; 0: the model's training resolution")
    args = ap.parse_args(argv)

    loaded = load(args.checkpoint)  # the one load-and-sample path (adapters.load → Loaded.generate)
    prompts = args.prompts or [s.caption for s in make_split("heldout_prompts", 16)]
    images = loaded.generate(prompts, range(len(prompts)), steps=args.steps, guidance=args.guidance,
                             shift=args.shift, solver=args.solver, height=args.height, width=args.width)
    os.makedirs(args.output_dir, exist_ok=True)
    path = os.path.join(args.output_dir, "grid.png")
    save_grid(images, path, nrow=8)
    print(f"wrote {path}: " + "; ".join(prompts))


if __name__ == "__main__":
    main()
