"""bf16 training throughput and MFU of our MM-DiT vs diffusers' SD3Transformer2DModel on one GPU.

    python benchmarks/gpu_throughput.py                       # d24 width (1536, 24 heads), 4 blocks
    python benchmarks/gpu_throughput.py --blocks 8 --batch 16 --compile
    python benchmarks/gpu_throughput.py --device cpu --hidden 64 --heads 2 --blocks 1 --batch 2 \
        --latent 16 --context 8 --steps 2 --warmup 1           # a smoke test of the script itself

One step = forward + rectified-flow loss + backward + AdamW step under bf16 autocast (fp32 master
weights), identical converted weights, whole timed windows of the two models alternating.
Model FLOPs per step = 3 × `count_flops` (forward) × batch; MFU = achieved FLOP/s ÷ the card's
dense bf16 peak (`--peak_tflops`, or looked up from the device name). The table goes to stdout
and, with `--json FILE`, to a file.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), HERE]  # the repository and benchmarks/ (train_step's helpers)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from base_model.convert import to_diffusers  # noqa: E402
from base_model.mmdit import MMDiT, count_flops, count_params, preset  # noqa: E402
from train_step import velocity  # noqa: E402

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 70.0}  # dense


def peak_tflops(device: torch.device, override: float | None) -> float | None:
    if override:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def make_step(model, ours: bool, batch: tuple, device: torch.device):
    x, t, ctx, pooled = batch
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device.type == "cuda")

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16):
            v = velocity(model, ours, x, t, ctx, pooled)
        F.mse_loss(v.float(), x).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def timed(step, n: int, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(n):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - t0) / n


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--blocks", type=int, default=4, help="joint blocks; the width is d24's")
    ap.add_argument("--hidden", type=int, default=64 * 24)
    ap.add_argument("--heads", type=int, default=24)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--latent", type=int, default=64, help="latent side: 64 → 1024 image tokens (512 px)")
    ap.add_argument("--context", type=int, default=154, help="text tokens (SD3: 77 CLIP + 77 T5)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10, help="steps per timed window")
    ap.add_argument("--windows", type=int, default=3, help="alternating windows per model; medians")
    ap.add_argument("--compile", action="store_true", help="torch.compile both models")
    ap.add_argument("--peak_tflops", type=float, default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    torch.manual_seed(0)
    cfg = preset("d24", depth=args.blocks, hidden=args.hidden, heads=args.heads)
    ours = MMDiT(cfg)
    for p in ours.parameters():  # non-zero everywhere, so no branch is trivially zero
        torch.nn.init.normal_(p, std=0.02)
    theirs = to_diffusers(ours)
    ours, theirs = ours.to(device).train(), theirs.to(device).train()
    if args.compile:
        ours, theirs = torch.compile(ours), torch.compile(theirs)
    B = args.batch
    batch = (torch.randn(B, cfg.in_channels, args.latent, args.latent, device=device), torch.rand(B, device=device),
             torch.randn(B, args.context, cfg.context_dim, device=device), torch.randn(B, cfg.pooled_dim, device=device))
    steps = {"flowalign": make_step(ours, True, batch, device), "diffusers": make_step(theirs, False, batch, device)}
    for step in steps.values():
        timed(step, args.warmup, device)
    times = {k: [] for k in steps}
    for _ in range(args.windows):
        for k, step in steps.items():
            times[k].append(timed(step, args.steps, device))

    flops = 3 * count_flops(cfg, args.latent, args.context) * B
    peak = peak_tflops(device, args.peak_tflops)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    params = count_params(cfg) / 1e6  # shapes only, no second model
    print(f"{name}, torch {torch.__version__}, {args.blocks} blocks of width {cfg.hidden} ({params:.0f}M params), "
          f"batch {B}, {(args.latent // cfg.patch_size) ** 2}+{args.context} tokens, bf16 autocast"
          f"{', compiled' if args.compile else ''}; medians of {args.windows} windows of {args.steps} steps")
    print("| model | step ms | samples/s | TFLOP/s | MFU |")
    print("|---|---|---|---|---|")
    rows = {}
    for k, v in times.items():
        s = statistics.median(v)
        tflops = flops / s / 1e12
        rows[k] = {"step_ms": 1e3 * s, "samples_per_s": B / s, "tflops": tflops,
                   "mfu": tflops / peak if peak else None}
        mfu = f"{tflops / peak:.1%}" if peak else "–"
        print(f"| {k} | {1e3 * s:.1f} | {B / s:.1f} | {tflops:.1f} | {mfu} |")
    print(f"speed-up (diffusers ÷ flowalign step time): {rows['diffusers']['step_ms'] / rows['flowalign']['step_ms']:.2f}×")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": name, "args": vars(args), "flops_per_step": flops, "peak_tflops": peak,
                       "results": rows}, f, indent=2)
    return rows


if __name__ == "__main__":
    main()
