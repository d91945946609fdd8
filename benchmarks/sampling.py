"""Sampling time of flowalign's Euler + CFG loop vs diffusers' SD3 denoising loop, same weights.

    python benchmarks/sampling.py [--repeats 5] [--steps 28] [--guidance 7] [--threads 2]

Ours: `base_model.sampling.sample` on an MMDiT. Reference: the loop of StableDiffusion3Pipeline
(minus text encoders and VAE) on the converted SD3Transformer2DModel with
FlowMatchEulerDiscreteScheduler(shift=3): [x, x] through the transformer at each `t`, CFG, then
`scheduler.step`. Both start from the same noise with zeroed text as the unconditional branch; the
table gives the max |ours − diffusers| of the final samples and median (min) seconds of alternating
runs, with the ratio diffusers / ours (≥ 1 means ours is no slower). On a machine shared with
other jobs use --threads 1: competing OpenMP threads make 2-thread timings erratic.
"""

import argparse
import statistics
import time
from functools import partial

import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from base_model.convert import to_diffusers
from base_model.mmdit import MMDiT, MMDiTConfig, preset
from base_model.sampling import noise_from_seeds, sample

CONFIGS = {
    # name: (model config, images, context length)
    "toy preset (32px p4 w128 d4), 64 tok": (preset("toy"), 8, 16),
    "d4 w256, 256 tok": (MMDiTConfig(depth=4, patch_size=2, in_channels=16, sample_size=32,
                                     pos_embed_max_size=16), 2, 32),
}


@torch.no_grad()  # as StableDiffusion3Pipeline.__call__
def diffusers_sample(transformer, context, pooled, noise, steps, shift, guidance):
    """StableDiffusion3Pipeline's denoising loop; the batch is [uncond; cond] as there."""
    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    scheduler.set_timesteps(steps)
    prompt_embeds = torch.cat([torch.zeros_like(context), context])
    pooled_embeds = torch.cat([torch.zeros_like(pooled), pooled])
    latents = noise
    for t in scheduler.timesteps:
        latent_model_input = torch.cat([latents] * 2)
        noise_pred = transformer(hidden_states=latent_model_input, timestep=t.expand(len(latent_model_input)),
                                 encoder_hidden_states=prompt_embeds, pooled_projections=pooled_embeds,
                                 return_dict=False)[0]
        uncond, cond = noise_pred.chunk(2)
        noise_pred = uncond + guidance * (cond - uncond)
        latents = scheduler.step(noise_pred, t, latents, return_dict=False)[0]
    return latents


def bench(runs: dict, repeats: int) -> dict:
    times = {k: [] for k in runs}
    for r in runs.values():  # warm-up
        r()
    for _ in range(repeats):
        for k, r in runs.items():
            t0 = time.perf_counter()
            r()
            times[k].append(time.perf_counter() - t0)
    return {k: (statistics.median(v), min(v)) for k, v in times.items()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--steps", type=int, default=28)
    ap.add_argument("--shift", type=float, default=3.0)
    ap.add_argument("--guidance", type=float, default=7.0)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
          f"{args.threads} threads; {args.steps} Euler steps, shift {args.shift}, CFG {args.guidance}, fp32; "
          f"median (min) of {args.repeats} alternating runs")
    print("| config | images (CFG batch) | max abs diff | ours s | diffusers s | speed-up (medians) |")
    print("|---|---|---|---|---|---|")
    for name, (cfg, n, ctx_len) in CONFIGS.items():
        torch.manual_seed(0)
        ours = MMDiT(cfg)
        for p in ours.parameters():  # non-zero weights everywhere, so no branch is trivially zero
            torch.nn.init.normal_(p, std=0.02)
        theirs = to_diffusers(ours)
        ours.eval(), theirs.eval()
        context, pooled = torch.randn(n, ctx_len, cfg.context_dim), torch.randn(n, cfg.pooled_dim)
        seeds, shape = list(range(n)), (cfg.in_channels, cfg.sample_size, cfg.sample_size)
        noise = noise_from_seeds(seeds, shape)  # the noise `sample` draws from these seeds
        run_ours = partial(sample, ours, context, pooled, seeds, shape, steps=args.steps, shift=args.shift,
                           guidance=args.guidance, progress=False)
        run_theirs = partial(diffusers_sample, theirs, context, pooled, noise, args.steps, args.shift, args.guidance)
        diff = (run_ours() - run_theirs()).abs().max().item()
        r = bench({"ours": run_ours, "diffusers": run_theirs}, args.repeats)
        (o, o_min), (d, d_min) = r["ours"], r["diffusers"]
        print(f"| {name} | {n} ({2 * n}) | {diff:.1e} | {o:.2f} ({o_min:.2f}) | {d:.2f} ({d_min:.2f}) "
              f"| {d / o:.2f}× |", flush=True)


if __name__ == "__main__":
    main()
