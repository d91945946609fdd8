"""Cost of a Diffusion-DPO step with LoRA, in time and memory.

    .venv/bin/python benchmarks/dpo_step.py                 # both tables
    .venv/bin/python benchmarks/dpo_step.py --repeats 10 --skip_memory

Time: a DPO step (reference forward under no_grad with the adapter disabled + policy forward and
backward on [winners; losers]) ÷ a policy forward + backward on the same 2B samples. The
reference forward is the only extra work; target ≤ 1.3. Steps of the two kinds alternate, medians.

Memory: peak resident memory of one training step (forward, backward, AdamW step), each variant in
a fresh process, minus that process's baseline after imports and data (VmHWM):
LoRA-DPO (one network, reference = adapter disabled) vs full fine-tuning DPO (trainable policy +
frozen reference copy) — target ≤ 0.6 — and LoRA-DPO on a 4-bit NF4 base (bitsandbytes).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from align.lora import add_lora, quantize_base  # noqa: E402
from align.loss import dpo_loss  # noqa: E402
from base_model.flow import flow_loss  # noqa: E402
from base_model.mmdit import MMDiT, preset  # noqa: E402

CONFIGS = {
    # the toy base of the demo; pairs per step as configs/dpo/toy.yaml
    "toy": dict(model=dict(name="toy"), pairs=32, side=32, ctx=16),
    # a d4-width model on 16×16×16 latents (64 tokens): weights dominate memory
    "d4w512": dict(model=dict(name="d4", hidden=512, heads=8, sample_size=16, pos_embed_max_size=16, context_dim=384,
                              pooled_dim=384), pairs=4, side=16, ctx=16),
}


def build(cfg: dict) -> MMDiT:
    spec = dict(cfg["model"])
    torch.manual_seed(0)
    model = MMDiT(preset(spec.pop("name"), **spec))
    with torch.no_grad():  # non-zero adaLN so every layer does work
        for p in model.parameters():
            p.normal_(0, 0.02)
    return model


def batch(model: MMDiT, cfg: dict):
    g = torch.Generator().manual_seed(0)
    B, c, s = cfg["pairs"], model.config.in_channels, cfg["side"]
    x = torch.randn(2 * B, c, s, s, generator=g)
    noise, t = torch.randn(B, c, s, s, generator=g).repeat(2, 1, 1, 1), torch.rand(B, generator=g).repeat(2)
    ctx = torch.randn(B, cfg["ctx"], model.config.context_dim, generator=g).repeat(2, 1, 1)
    pooled = torch.randn(B, model.config.pooled_dim, generator=g).repeat(2, 1)
    return x, noise, t, ctx, pooled


def policy_step(model, data):
    flow_loss(model, *data).mean().backward()


def lora_dpo_step(model, data, beta=500.0):
    with torch.no_grad(), model.disable_adapter():
        ref = flow_loss(model, *data)
    loss, _ = dpo_loss(flow_loss(model, *data), ref, beta)
    loss.backward()


def full_dpo_step(policy, reference, data, beta=500.0):
    with torch.no_grad():
        ref = flow_loss(reference, *data)
    loss, _ = dpo_loss(flow_loss(policy, *data), ref, beta)
    loss.backward()


def reference_forward(model, data):
    with torch.no_grad(), model.disable_adapter():
        flow_loss(model, *data)


def time_table(repeats: int) -> list[str]:
    """The DPO step costs policy + reference forward, so the ratio is 1 + reference ÷ policy: the
    reference column shows where the time goes."""
    rows = ["| config | pairs | policy fwd+bwd ms | reference fwd ms | DPO step ms | ratio (target ≤ 1.3) |",
            "|---|---|---|---|---|---|"]
    for name, cfg in CONFIGS.items():
        model = add_lora(build(cfg).requires_grad_(False), r=16, alpha=16)
        data = batch(model, cfg)
        times = {fn: [] for fn in (policy_step, reference_forward, lora_dpo_step)}
        for i in range(repeats + 2):
            for fn, out in times.items():
                t0 = time.perf_counter()
                fn(model, data)
                if i >= 2:  # warm-up
                    out.append(time.perf_counter() - t0)
                model.zero_grad(set_to_none=True)
        pol, ref, dpo = (statistics.median(v) * 1e3 for v in times.values())
        rows.append(f"| {name} | {cfg['pairs']} | {pol:.1f} | {ref:.1f} | {dpo:.1f} | {dpo / pol:.2f} |")
    return rows


def peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM: unlike ru_maxrss, not inherited across fork/exec)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024


def peak_memory(variant: str, config: str) -> dict:
    """Run inside a fresh process: baseline after imports and data, then one training step."""
    import bitsandbytes  # noqa: F401  (imports count in the baseline, not in a variant)
    import peft  # noqa: F401

    cfg = CONFIGS[config]
    spec = dict(cfg["model"])
    with torch.device("meta"):  # shapes only: the baseline must not include a model
        shape = MMDiT(preset(spec.pop("name"), **spec))
    data = batch(shape, cfg)
    params_mb = sum(p.numel() * p.element_size() for p in shape.parameters()) / 2**20
    baseline = peak_rss_mb()
    model = build(cfg)
    if variant == "full":
        reference = copy.deepcopy(model).requires_grad_(False)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        full_dpo_step(model, reference, data)
    else:
        if variant == "lora_4bit":
            quantize_base(model, 4)
        model = add_lora(model.requires_grad_(False), r=16, alpha=16)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        lora_dpo_step(model, data)
    opt.step()
    peak = peak_rss_mb()
    return {"variant": variant, "config": config, "peak_mb": peak - baseline, "weights_mb": params_mb}


def memory_table() -> list[str]:
    rows = ["| config | weights MB | full-FT DPO MB | LoRA-DPO MB | ratio (target ≤ 0.6) | LoRA-DPO, 4-bit base MB | ratio |",
            "|---|---|---|---|---|---|---|"]
    for config in CONFIGS:
        res = {}
        for variant in ("full", "lora", "lora_4bit"):
            out = subprocess.run([sys.executable, __file__, "--_memory", variant, config], capture_output=True,
                                 text=True, check=True, env={**os.environ, "OMP_NUM_THREADS": "2"})
            res[variant] = json.loads(out.stdout.strip().splitlines()[-1])
        f, lo, q = (res[v]["peak_mb"] for v in ("full", "lora", "lora_4bit"))
        rows.append(f"| {config} | {res['full']['weights_mb']:.0f} | {f:.0f} | {lo:.0f} | {lo / f:.2f} | {q:.0f} | {q / f:.2f} |")
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--skip_memory", action="store_true")
    ap.add_argument("--_memory", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    if args._memory:
        print(json.dumps(peak_memory(*args._memory)))
        return
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}\n")
    print("\n".join(time_table(args.repeats)))
    if not args.skip_memory:
        print()
        print("\n".join(memory_table()))


if __name__ == "__main__":
    main()
