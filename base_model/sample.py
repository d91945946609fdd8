"""Sample a grid from an MMDiT checkpoint (or a freshly initialised preset), with fixed seeds.

    python -m base_model.sample --checkpoint runs/toy/final --output_dir runs/samples
    python -m base_model.sample --preset toy --output_dir runs/demo   # untrained: noise-like output

Until the text stage lands (issue "Pretraining"), the context is a fixed random tensor per seed.
Writes `grid.png` and prints where it is.
"""

import argparse
import os

import torch

from .mmdit import MMDiT, preset
from .sampling import sample
from .shapes import save_grid


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", help="a folder with config.json + model.safetensors")
    ap.add_argument("--preset", default="toy", help="used when no --checkpoint is given")
    ap.add_argument("--output_dir", default="runs/samples")
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--shift", type=float, default=1.0)
    ap.add_argument("--guidance", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    torch.manual_seed(args.seed)
    model = MMDiT.from_pretrained(args.checkpoint) if args.checkpoint else MMDiT(preset(args.preset))
    cfg = model.config
    gen = torch.Generator().manual_seed(args.seed)
    context = torch.randn(args.n, 8, cfg.context_dim, generator=gen)
    pooled = torch.randn(args.n, cfg.pooled_dim, generator=gen)
    seeds = list(range(args.seed, args.seed + args.n))
    shape = (cfg.in_channels, cfg.sample_size, cfg.sample_size)
    images = sample(model.eval(), context, pooled, seeds, shape, steps=args.steps, shift=args.shift,
                    guidance=args.guidance)
    os.makedirs(args.output_dir, exist_ok=True)
    path = os.path.join(args.output_dir, "grid.png")
    save_grid(images.clamp(-1, 1), path, nrow=8)
    print(f"wrote {path} ({args.n} samples, {args.steps} Euler steps)")


if __name__ == "__main__":
    main()
