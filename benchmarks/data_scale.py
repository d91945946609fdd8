"""Data at scale, measured side by side in one run: peak memory of the trainers on a small and a
large data set, step time reading the cache against indexing tensors in memory, precompute
throughput, and bytes per sample on disk.

    OMP_NUM_THREADS=1 python benchmarks/data_scale.py --small 2000 --large 20000 --workdir /tmp/data_scale

Everything it reads it writes first: Pick-a-Pic-schema parquet at 256 px (synthetic JPEGs), a tiny
randomly initialised diffusers AutoencoderKL (8× downsampling, 4 channels), a tiny base MMDiT on the
MiniLM encoder and that VAE. `align.dpo` and `base_model.pretrain` run as child processes on caches
made by `base_model.precompute`; peak RSS is the largest of their processes (ru_maxrss).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
RES = 256


def write_vae(path: str) -> None:
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                  up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(4, 4, 4, 4), layers_per_block=0,
                  latent_channels=4, norm_num_groups=1, sample_size=RES).save_pretrained(path)


def write_base(path: str, vae: str) -> None:
    import torch

    from base_model.mmdit import MMDiT, preset

    torch.manual_seed(0)
    model = MMDiT(preset("toy", depth=2, hidden=64, heads=2, in_channels=4, sample_size=RES // 8,
                         pos_embed_max_size=RES // 16))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    model.save_pretrained(path)
    with open(os.path.join(path, "conditioning.json"), "w") as f:
        json.dump({"text_encoders": ["minilm"], "image_space": f"vae:{vae}", "resolution": RES}, f)


def jpeg_pool(n: int, seed: int = 0) -> list[bytes]:
    """n distinct 256-px JPEGs: coloured rectangles on a gradient."""
    from PIL import Image, ImageDraw

    rng, pool = np.random.default_rng(seed), []
    ramp = np.linspace(0, 255, RES, dtype=np.uint8)
    for _ in range(n):
        img = Image.fromarray((np.stack([np.tile(ramp, (RES, 1))] * 3, -1) // rng.integers(1, 4)).astype(np.uint8))
        draw = ImageDraw.Draw(img)
        for _ in range(3):
            x, y = rng.integers(0, RES - 40, 2)
            draw.rectangle([x, y, x + rng.integers(20, 120), y + rng.integers(20, 120)],
                           fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=85)
        pool.append(buf.getvalue())
    return pool


def write_pairs(path: str, n: int, pool: list[bytes]) -> None:
    """n Pick-a-Pic-schema rows written in row groups (never all in memory); 2,000 distinct captions."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([("caption", pa.string()), ("jpg_0", pa.binary()), ("jpg_1", pa.binary()),
                        ("label_0", pa.float64()), ("label_1", pa.float64())])
    with pq.ParquetWriter(path, schema) as w:
        for s in range(0, n, 1000):
            idx = range(s, min(n, s + 1000))
            w.write_table(pa.table({
                "caption": [f"a photo of object {i % 2000} in style {i % 7}" for i in idx],
                "jpg_0": [pool[(2 * i) % len(pool)] for i in idx], "jpg_1": [pool[(2 * i + 1) % len(pool)] for i in idx],
                "label_0": [float(i % 2) for i in idx], "label_1": [float(1 - i % 2) for i in idx]}, schema=schema))


def run(cmd: list[str]) -> tuple[float, int]:
    """(seconds, peak RSS in bytes of the largest process of the command and its children)."""
    probe = ("import resource, subprocess, sys, time; t = time.time(); r = subprocess.run(sys.argv[1:]); "
             "print(time.time() - t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, r.returncode)")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    out = subprocess.run([sys.executable, "-c", probe, *cmd], cwd=ROOT, env=env, capture_output=True, text=True)
    seconds, rss, rc = out.stdout.strip().splitlines()[-1].split()
    if int(rc) != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
    return float(seconds), int(rss) * 1024


def disk_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def step_times(base: str, cache_path: str, steps: int, batch: int, workers: int) -> tuple[float, float]:
    """Median seconds per DPO step (LoRA, [winners; losers]) with batches read from the cache by the
    DataLoader, and with the same batches indexed from tensors in memory; steps alternate."""
    import torch

    from align.dpo import dpo_step_losses
    from align.lora import DEFAULT_TARGETS, add_lora
    from align.loss import dpo_loss
    from base_model.adapters import load
    from base_model.cache import Cache, GlobalBatches, loader

    torch.set_num_threads(1)
    peft = add_lora(load(base, text_encoders=False).model.train().requires_grad_(False), 4, 4, DEFAULT_TARGETS)
    opt = torch.optim.AdamW([p for p in peft.parameters() if p.requires_grad], lr=1e-4)
    cache = Cache(cache_path)
    batches = GlobalBatches(cache.buckets(), batch, seed=0)
    memory = Cache(cache_path).read(np.arange(len(cache)))  # the in-memory baseline: every tensor in RAM

    def step(b):
        g = torch.Generator().manual_seed(0)
        n = len(b["chosen"])
        b = {**b, "noise": torch.randn(b["chosen"].shape, generator=g), "t": torch.rand(n, generator=g)}
        pol, ref = dpo_step_losses(peft, peft, b, "sigmoid")
        loss, _ = dpo_loss(pol, ref, 100.0, "sigmoid")
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    # one step from each source in turn, so a change of load on the machine hits both alike
    data = iter(loader(cache, batches, 0, 1, 0, steps, workers))
    times = {"cache": [], "memory": []}
    for k in range(steps):
        t0 = time.perf_counter()
        step(next(data))
        times["cache"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        step({key: v[torch.from_numpy(batches(k)[1])] for key, v in memory.items()})
        times["memory"].append(time.perf_counter() - t0)
    warm = 5  # the loader's workers start during the first steps
    return float(np.median(times["cache"][warm:])), float(np.median(times["memory"][warm:]))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", type=int, default=2000, help="pairs (and images) in the small set")
    ap.add_argument("--large", type=int, default=50_000, help="pairs (and images) in the large set")
    ap.add_argument("--workdir", default="/tmp/data_scale")
    ap.add_argument("--train_steps", type=int, default=30, help="steps of each trainer run")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    w = args.workdir
    shutil.rmtree(w, ignore_errors=True)
    os.makedirs(w)
    write_vae(f"{w}/vae")
    write_base(f"{w}/base", f"{w}/vae")
    pool = jpeg_pool(512)
    py = [sys.executable, "-m"]
    rows = {}
    for name, n in (("small", args.small), ("large", args.large)):
        write_pairs(f"{w}/{name}.parquet", n, pool)
        secs, _ = run(py + ["base_model.precompute", "--pairs", f"{w}/{name}.parquet", "--base", f"{w}/base",
                            "--resolution", str(RES), "--min_bucket", "64", "--output", f"{w}/{name}-pairs"])
        isecs, _ = run(py + ["base_model.precompute", "--dataset", f"{w}/{name}.parquet", "--image_column", "jpg_0",
                             "--text_encoders", "minilm", "--image_space", f"vae:{w}/vae", "--resolution", str(RES),
                             "--min_bucket", "64", "--output", f"{w}/{name}-images"])
        common = ["--max_steps", str(args.train_steps), "--per_device_train_batch_size", str(args.batch),
                  "--report_to", "none", "--num_samples", "2", "--sample_steps", "2", "--logging_steps", "10",
                  "--dataloader_num_workers", str(args.workers)]
        _, dpo_rss = run(py + ["align.dpo", "--base", f"{w}/base", "--pairs", f"{w}/{name}-pairs",
                               "--output_dir", f"{w}/{name}-dpo", "--lora_r", "4", "--lora_alpha", "4", *common])
        _, pt_rss = run(py + ["base_model.pretrain", "--dataset", f"{w}/{name}-images", "--resolution", str(RES),
                              "--image_space", f"vae:{w}/vae", "--model_preset", "toy", "--num_val", "16",
                              "--output_dir", f"{w}/{name}-pretrain", *common])
        rows[name] = dict(n=n, precompute_pairs_s=secs, precompute_images_s=isecs, dpo_rss=dpo_rss, pretrain_rss=pt_rss,
                          pair_bytes=disk_bytes(f"{w}/{name}-pairs") / n,
                          image_bytes=disk_bytes(f"{w}/{name}-images") / n,
                          parquet_bytes=os.path.getsize(f"{w}/{name}.parquet") / n)
    steps = {n: step_times(f"{w}/base", f"{w}/small-pairs", 100, args.batch, n) for n in sorted({0, args.workers})}

    s, big = rows["small"], rows["large"]
    mib = 2 ** 20
    print(f"\n## data_scale: {args.small} vs {args.large} pairs at {RES} px, tiny AutoencoderKL (8×, 4 ch), MiniLM\n")
    print(f"| measure | {args.small} | {args.large} | large ÷ small |")
    print("|---|---|---|---|")
    for key, label in (("dpo_rss", "align.dpo peak RSS (MiB)"), ("pretrain_rss", "base_model.pretrain peak RSS (MiB)")):
        print(f"| {label} | {s[key] / mib:.0f} | {big[key] / mib:.0f} | {big[key] / s[key]:.3f} (target ≤ 1.1) |")
    for key, label, images in (("precompute_pairs_s", "precompute pairs, images/s (2 per pair, whole command)", 2),
                               ("precompute_images_s", "precompute images, images/s (whole command)", 1)):
        print(f"| {label} | {images * s['n'] / s[key]:.0f} | {images * big['n'] / big[key]:.0f} | |")
    print(f"| cache bytes per pair (2 latents 4×32×32 fp16, text table shared) | {s['pair_bytes']:.0f} | "
          f"{big['pair_bytes']:.0f} | |")
    print(f"| cache bytes per image (1 latent, text table shared) | {s['image_bytes']:.0f} | {big['image_bytes']:.0f} | |")
    print(f"| parquet bytes per pair (a pool of 512 JPEGs, repeated) | {s['parquet_bytes']:.0f} | "
          f"{big['parquet_bytes']:.0f} | |")
    print(f"\n| DPO step, batch {args.batch} pairs ({args.small}-pair cache), median of 95 | cache via DataLoader "
          f"| tensors in memory | cache ÷ memory |")
    print("|---|---|---|---|")
    for n, (cache_s, memory_s) in steps.items():
        print(f"| DataLoader workers: {n} | {cache_s * 1e3:.1f} ms | {memory_s * 1e3:.1f} ms | "
              f"{cache_s / memory_s:.3f} (target ≤ 1.05) |")


if __name__ == "__main__":
    main()
