"""Training-step time of flowalign's MMDiT vs diffusers' SD3Transformer2DModel, same weights.

    python benchmarks/train_step.py [--repeats 20] [--bf16_repeats 3] [--threads 2]

One step = forward + rectified-flow loss + backward. Steps of the two models alternate so that
both see the same machine state; the table gives medians and the ratio diffusers / ours
(> 1 means ours is faster), in fp32 and under bf16 autocast.
"""

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from base_model.convert import to_diffusers
from base_model.mmdit import MMDiT, MMDiTConfig

CONFIGS = {
    # name: (model config, batch, image side, context length)
    "toy preset (32px p4 w128 d4 h4), 64 tok": (dict(depth=4, hidden=128, heads=4, patch_size=4, in_channels=3,
                                                     sample_size=32, pos_embed_max_size=8), 32, 32, 16),
    "d4 w256, 256 tok": (dict(depth=4, patch_size=2, in_channels=16, sample_size=32,
                              pos_embed_max_size=16), 8, 32, 32),
}


def velocity(model, is_ours, x, t, ctx, pooled):
    """One forward of either model: ours takes t in [0, 1], diffusers' the timestep 1000·t."""
    if is_ours:
        return model(x, t, ctx, pooled)
    return model(hidden_states=x, encoder_hidden_states=ctx, pooled_projections=pooled, timestep=1000 * t).sample


def step_fn(model, is_ours, x, t, ctx, pooled, dtype):
    def step():
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
            v = velocity(model, is_ours, x, t, ctx, pooled)
        F.mse_loss(v.float(), x).backward()
    return step


def bench(steps: dict, repeats: int) -> dict:
    times = {k: [] for k in steps}
    for _ in range(2):  # warm-up
        for s in steps.values():
            s()
    for _ in range(repeats):
        for k, s in steps.items():
            t0 = time.perf_counter()
            s()
            times[k].append(time.perf_counter() - t0)
    return {k: (statistics.median(v), min(v)) for k, v in times.items()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--bf16_repeats", type=int, default=3, help="0 skips bf16 (slow without avx512_bf16/AMX)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
          f"{args.threads} threads; median (min) of alternating steps")
    print("| config | batch | dtype | ours ms | diffusers ms | speed-up (medians) |")
    print("|---|---|---|---|---|---|")
    for name, (mcfg, batch, side, ctx_len) in CONFIGS.items():
        torch.manual_seed(0)
        cfg = MMDiTConfig(**mcfg)
        ours = MMDiT(cfg)
        for p in ours.parameters():  # non-zero weights everywhere, so no branch is trivially zero
            torch.nn.init.normal_(p, std=0.02)
        theirs = to_diffusers(ours)
        x = torch.randn(batch, cfg.in_channels, side, side)
        t, ctx, pooled = torch.rand(batch), torch.randn(batch, ctx_len, cfg.context_dim), torch.randn(batch, cfg.pooled_dim)
        for dtype, repeats in (("fp32", args.repeats), ("bf16", args.bf16_repeats)):
            if repeats == 0:
                continue
            r = bench({"ours": step_fn(ours, True, x, t, ctx, pooled, dtype),
                       "diffusers": step_fn(theirs, False, x, t, ctx, pooled, dtype)}, repeats)
            (o, o_min), (d, d_min) = r["ours"], r["diffusers"]
            print(f"| {name} | {batch} | {dtype} ×{repeats} | {1e3 * o:.1f} ({1e3 * o_min:.1f}) "
                  f"| {1e3 * d:.1f} ({1e3 * d_min:.1f}) | {d / o:.2f}× |", flush=True)


if __name__ == "__main__":
    main()
