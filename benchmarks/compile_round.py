"""An online round's two halves, eager vs `torch.compile` (inductor), as `align.online --torch_compile` runs them.

    python benchmarks/compile_round.py [--base runs/toy/final] [--rank 4] [--repeats 3] [--threads 2]

Rollout: what a round of configs/online/toy.yaml samples, 32 prompts × 8 images, 5 midpoint steps (9 model
calls), CFG 2, batches of 64 prompts, the adapter merged (`align.lora.merged`). Training: 16 NFT-shaped steps of
64 samples (the old policy's forward without gradients, the policy's forward and backward). Columns: the first
call's seconds (compiling included; inductor's on-disk cache makes a later process's first call shorter), the
median (min) of the next `--repeats`, the speed-up of the medians, and the largest |difference| from eager: of one
forward, and of the rollout's x0 (float rounding grown through 9 guided calls). The adapter's B is random.
--base defaults to the toy preset with random weights.
"""

import argparse
import statistics
import time

import torch

from align.lora import add_lora, merged
from align.online import OnlineConfig
from base_model.flow import interpolate, velocity_target
from base_model.mmdit import MMDiT, preset
from base_model.sampling import sample


def timed(f, repeats):
    t0 = time.perf_counter()
    out = f()
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        f()
        times.append(time.perf_counter() - t0)
    return out, first, times


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", default="", help="a checkpoint folder (default: the toy preset, random weights)")
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    base = MMDiT.from_pretrained(args.base) if args.base else MMDiT(preset("toy"))
    model = add_lora(base.eval().requires_grad_(False), args.rank, args.rank, OnlineConfig().lora_target_modules)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.01)
    compiled = torch.compile(base, dynamic=False)  # shares base's parameters and adapters
    c, n = base.config, 32 * 8
    context, pooled = torch.randn(n, 16, c.context_dim), torch.randn(n, c.pooled_dim)
    params = [p for p in model.parameters() if p.requires_grad]
    x0, cc, pp = torch.randn(64, c.in_channels, c.sample_size, c.sample_size), context[:64], pooled[:64]

    def rollout(net):
        def run():
            with merged(model, "default"):
                return sample(net, context, pooled, list(range(n)), (c.in_channels, c.sample_size, c.sample_size),
                              steps=5, shift=3.0, guidance=2.0, batch_size=64, progress=False, solver="midpoint")
        return run

    def training(net):
        def run():
            g = torch.Generator().manual_seed(0)
            for _ in range(16):
                t, noise = torch.rand(64, generator=g), torch.randn(x0.shape, generator=g)
                x_t = interpolate(x0, noise, t)
                with merged(model, "default"):
                    v_old = net(x_t, t, cc, pp)
                base.train()
                loss = (net(x_t, t, cc, pp) - v_old - velocity_target(x0, noise)).pow(2).mean()
                loss.backward()
                base.eval()
                for p in params:
                    p.grad = None
            return loss.detach()
        return run

    with torch.no_grad():
        probe = (x0, torch.rand(64), cc, pp)
        forward_delta = (base(*probe) - compiled(*probe)).abs().max().item()
    print("| half of a round | model | first call s | median s (min) | speed-up | max abs Δ |\n|---|---|---|---|---|---|")
    for name, make in (("rollout (256 images)", rollout), ("training (16 steps of 64)", training)):
        eager_out, eager_first, eager_times = timed(make(base), args.repeats)
        comp_out, comp_first, comp_times = timed(make(compiled), args.repeats)
        delta = (eager_out - comp_out).abs().max().item()
        ref = statistics.median(eager_times)
        for label, first, times, d in (("eager", eager_first, eager_times, "0"),
                                       ("compiled", comp_first, comp_times,
                                        f"{forward_delta:.1e} a forward, {delta:.1e} out")):
            med = statistics.median(times)
            print(f"| {name} | {label} | {first:.1f} | {med:.2f} ({min(times):.2f}) | {ref / med:.2f}× | {d} |",
                  flush=True)


if __name__ == "__main__":
    main()
