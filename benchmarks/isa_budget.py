"""The online run's time on an AVX2-only machine, emulated on this one: the same `align.online` run
with the CPU's full instruction set and with every math library capped at AVX2, side by side.

    .venv/bin/python benchmarks/isa_budget.py                           # configs/online/toy.yaml, 4 rounds
    .venv/bin/python benchmarks/isa_budget.py --flags sample_steps=3 --rounds 4

The cap: `ATEN_CPU_CAPABILITY=avx2` (PyTorch's own kernels), `ONEDNN_MAX_CPU_ISA=AVX2` (oneDNN)
and `MKL_ENABLE_INSTRUCTIONS=AVX2` (MKL's GEMMs). This is an emulation, not an AVX2 machine: the
caches, memory and clock stay this machine's. Both runs use fp32, as the online loop does. The
table gives the seconds per round after the first (start-up and the first round's allocations
excluded) and the projected wall time of the full run (`--full_rounds`, start-up included).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

AVX2 = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}


def cpu_flags() -> str:
    with open("/proc/cpuinfo") as f:
        flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")
    return " ".join(w for w in wanted if w in flags) or "none of " + ", ".join(wanted)


def timed_run(env_extra: dict, args, out: str) -> dict:
    cmd = [sys.executable, "-m", "align.online", "--config", args.config, "--base", args.base, "--rounds",
           str(args.rounds), "--save_rounds", str(args.rounds), "--output_dir", out]
    for kv in args.flags:
        k, v = kv.split("=", 1)
        cmd += [f"--{k}", v]
    # its own inductor cache (--torch_compile): the capped run must not read kernels compiled for the full instruction
    # set (one run that shared a cache had its loss turn NaN at step 8), and each pays a fresh machine's compile
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
           "TORCHINDUCTOR_CACHE_DIR": out + "-inductor-cache", **env_extra}
    t0 = time.time()
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
    wall = time.time() - t0
    with open(os.path.join(out, "log.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    elapsed = [r["round/elapsed_s"] for r in rows]
    per_round = (elapsed[-1] - elapsed[0]) / (len(elapsed) - 1)
    startup = wall - elapsed[-1]
    return {"wall_s": wall, "per_round_s": per_round, "startup_s": startup,
            "projected_s": startup + elapsed[0] + per_round * (args.full_rounds - 1)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/online/toy.yaml")
    ap.add_argument("--base", default="runs/toy/final")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--full_rounds", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--flags", nargs="*", default=[], help="extra align.online flags as KEY=VALUE")
    args = ap.parse_args()
    print(f"CPU flags: {cpu_flags()}; {args.threads} threads; {args.config} {' '.join(args.flags)}")
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, extra in (("native", {}), ("AVX2 cap", AVX2)):
            rows[name] = timed_run(extra, args, os.path.join(tmp, name.replace(" ", "_")))
    print(f"{'ISA':10s} {'s/round':>8s} {'start-up s':>10s} {f'{args.full_rounds} rounds, s':>15s} {'min':>6s}")
    for name, r in rows.items():
        print(f"{name:10s} {r['per_round_s']:8.2f} {r['startup_s']:10.1f} {r['projected_s']:15.0f} "
              f"{r['projected_s'] / 60:6.2f}")
    print(f"ratio AVX2 cap / native, per round: {rows['AVX2 cap']['per_round_s'] / rows['native']['per_round_s']:.2f}")


if __name__ == "__main__":
    main()
