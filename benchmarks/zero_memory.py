"""Per-rank memory of model states under DeepSpeed ZeRO-0/1/2/3, 2 CPU processes, next to DeepSpeed's estimator.

    python benchmarks/zero_memory.py [--preset d8] [--steps 3] [--stages 0 1 2 3] [--precision fp32|bf16]

For each stage this launches `accelerate launch --num_processes 2 --use_deepspeed` on itself with
configs/deepspeed/zeroN.json (ZeRO-0: the same config with stage 0, written to a temp file), AdamW
as base_model.pretrain uses it, in fp32 or with `--precision bf16` (DeepSpeed's bf16 mode: bf16
params and gradients, fp32 master weights and Adam states: ZeRO-0 wraps AdamW in its unfused
mixed-precision optimizer, whose master copy is `fp32_groups`), and measures what each rank holds
by summing the bytes of distinct tensor storages (views of one flat buffer count once):
  params   after the step: ZeRO-3 the local partitions `p.ds_tensor` (+ the small persistent
           params every rank keeps whole), otherwise the full `p.data`;
  master   after the step: the optimizer's fp32 partitions (ZeRO-1/2 `single_partition_of_fp32_groups`,
           ZeRO-3 `fp32_partitioned_groups_flat`, bf16 ZeRO-0 `fp32_groups`); fp32 ZeRO-0 updates `p.data`;
  grads    after backward and its reduction, into the step: `p.grad`, ZeRO-1/2 `averaged_gradients` +
           `grads_in_partition`, ZeRO-3 `grad_partitions_flat_buffer`;
  Adam     after the step: exp_avg and exp_avg_sq in the base optimizer's `state`.
Beside the model states: the gradients held at the end of backward, just before DeepSpeed reduces
them (p.grad plus the filled part of the reduce buckets `ipg_buckets`), and the bytes allocated for
those buckets (reduce_bucket_size elements, whatever the model size; untouched pages of a CPU
allocation are not resident, so RSS grows only by the filled part).
The step is accelerate's `accelerator.backward` unrolled (engine.backward, then engine.step) so that
gradients can be read between the two. Step time is the median over --steps steps after one warm-up.
"""

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MiB = 2**20


def model_config(name: str, side: int = 16):
    from base_model.mmdit import preset

    return preset(name, sample_size=side)  # side×side latents, p = 2: (side/2)² image tokens


def storage_bytes(tensors, seen: set) -> int:
    """Bytes of the storages behind `tensors` not already in `seen` (a view counts its whole storage once)."""
    total = 0
    for t in tensors:
        if t is None or t.numel() == 0:
            continue
        s = t.untyped_storage()
        if s.data_ptr() not in seen:
            seen.add(s.data_ptr())
            total += s.nbytes()
    return total


def flat(*objs):
    """Tensors inside (nested) lists, tuples and dict values."""
    for o in objs:
        if isinstance(o, torch.Tensor):
            yield o
        elif isinstance(o, (list, tuple)):
            yield from flat(*o)
        elif isinstance(o, dict):
            yield from flat(*o.values())


def worker(args):
    import psutil
    from accelerate import Accelerator

    from base_model.flow import flow_loss
    from base_model.mmdit import MMDiT
    from base_model.training import cpu_process_group

    torch.manual_seed(0)
    accelerator = Accelerator(kwargs_handlers=cpu_process_group())
    cfg = model_config(args.preset, args.side)
    model = MMDiT(cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ds = accelerator.state.deepspeed_plugin.deepspeed_config  # needed before prepare, as in pretrain.py
    ds["train_micro_batch_size_per_gpu"] = args.batch
    ds["gradient_clipping"] = 1.0
    engine, _ = accelerator.prepare(model, optimizer)
    zero_opt = engine.optimizer  # ZeRO-1/2/3: DeepSpeed's wrapper; ZeRO-0: the AdamW itself
    base_opt = getattr(zero_opt, "optimizer", zero_opt)
    stage = accelerator.state.deepspeed_plugin.zero_stage
    params = list(engine.module.parameters())

    buckets = getattr(zero_opt, "ipg_buckets", {})  # dtype -> bucket; .buffer a list (ZeRO-1/2) or a tensor (ZeRO-3)
    mem, times = {}, []

    def grad_bytes():
        """Gradient storages held now; a reduce bucket counts by the part filled with unreduced grads."""
        in_buckets = {t.untyped_storage().data_ptr() for t in flat([b.buffer for b in buckets.values()])}
        filled = sum(b.elements * dtype.itemsize for dtype, b in buckets.items())
        return filled + storage_bytes(flat([p.grad for p in params], getattr(zero_opt, "averaged_gradients", None),
                                           getattr(zero_opt, "grads_in_partition", None),
                                           getattr(zero_opt, "grad_partitions_flat_buffer", None)), in_buckets)

    reduce = engine.allreduce_gradients  # runs once backward is done: the reduce(-scatter) of the gradients

    def measured_reduce(*a, **k):
        mem.setdefault("grads_unreduced", grad_bytes())
        mem.setdefault("buckets", storage_bytes(flat([b.buffer for b in buckets.values()]), set()))
        return reduce(*a, **k)

    engine.allreduce_gradients = measured_reduce
    g = torch.Generator().manual_seed(accelerator.process_index)
    B, side = args.batch, cfg.sample_size
    x0, noise = (torch.randn(B, cfg.in_channels, side, side, generator=g) for _ in range(2))
    batch = (x0, noise, torch.rand(B, generator=g), torch.randn(B, args.context, cfg.context_dim, generator=g),
             torch.randn(B, cfg.pooled_dim, generator=g))
    if args.precision == "bf16":  # the engine's module is bf16 now, so are its inputs
        batch = tuple(x.bfloat16() for x in batch)
    for i in range(1 + args.steps):
        t0 = time.perf_counter()
        loss = flow_loss(engine, *batch).mean()
        engine.backward(loss)
        if i == 0:
            mem["grads"] = grad_bytes()
        engine.step()
        times.append(time.perf_counter() - t0)
        if i == 0:
            gc.collect()
            seen = set()
            mem["params"] = storage_bytes([p.ds_tensor if stage == 3 else p.data for p in params], seen)
            mem["params"] += storage_bytes([p.data for p in params], seen)  # ZeRO-3 persistent params; else none new
            mem["master"] = storage_bytes(flat(getattr(zero_opt, "single_partition_of_fp32_groups", None),
                                               getattr(zero_opt, "fp32_partitioned_groups_flat", None),
                                               getattr(zero_opt, "fp32_groups", None)), seen)
            mem["adam"] = storage_bytes(flat([base_opt.state[p] for p in base_opt.state]), seen)
            mem["rss"] = psutil.Process().memory_info().rss
    out = dict(stage=stage, rank=accelerator.process_index, world=accelerator.num_processes,
               step_s=statistics.median(times[1:]), loss=loss.item(), **mem)
    with open(os.path.join(args.out, f"rank{accelerator.process_index}.json"), "w") as f:
        json.dump(out, f)
    accelerator.wait_for_everyone()


def launch(stage: int, args, tmp: str) -> list[dict]:
    config = os.path.join(ROOT, f"configs/deepspeed/zero{stage}.json")
    if stage == 0:  # ZeRO-0 = plain data parallelism: zero1.json with the stage set to 0
        with open(os.path.join(ROOT, "configs/deepspeed/zero1.json")) as f:
            ds = json.load(f)
        ds["zero_optimization"] = {"stage": 0}
        config = os.path.join(tmp, "zero0.json")
        with open(config, "w") as f:
            json.dump(ds, f)
    out = os.path.join(tmp, f"zero{stage}")
    os.makedirs(out)
    cmd = [os.path.join(os.path.dirname(sys.executable), "accelerate"), "launch", "--num_processes", "2",
           "--num_machines", "1", "--use_deepspeed", "--deepspeed_config_file", config, "--mixed_precision",
           "no" if args.precision == "fp32" else "bf16",
           "--dynamo_backend", "no", os.path.abspath(__file__), "--worker", "--out", out,
           "--preset", args.preset, "--batch", str(args.batch), "--steps", str(args.steps),
           "--precision", args.precision, "--side", str(args.side), "--context", str(args.context)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    p = subprocess.run(cmd, check=False, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"ZeRO-{stage} run failed:\n{p.stdout[-4000:]}")
    return [json.load(open(os.path.join(out, f))) for f in sorted(os.listdir(out))]


def estimates(preset_name: str, n: int) -> dict:
    """DeepSpeed's estimators on the same model, `offload = none` rows, the per-device column."""
    from deepspeed.runtime.zero import stage3, stage_1_and_2

    from base_model.mmdit import MMDiT

    model = MMDiT(model_config(preset_name))
    stage_1_and_2.estimate_zero2_model_states_mem_needs_all_live(model, num_gpus_per_node=n)
    stage3.estimate_zero3_model_states_mem_needs_all_live(model, num_gpus_per_node=n)
    total, largest = stage3.model_to_params(model)
    _, z2 = stage_1_and_2.estimate_zero2_model_states_mem_needs(total, n, cpu_offload=False)
    _, z3, _ = stage3.estimate_zero3_model_states_mem_needs(total, largest, n, cpu_offload=False,
                                                            cpu_offload_params=False, zero_init=False)
    return {"total": total, "largest": largest, "est": {2: z2, 3: z3}}


def max_over(ranks: list[dict], key: str):
    return max(r[key] for r in ranks)  # the ranks differ only by partition padding and boundary views


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="d8", help="MMDiT preset (d8: 76.6M parameters)")
    ap.add_argument("--batch", type=int, default=2, help="micro-batch per process")
    ap.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step")
    ap.add_argument("--stages", type=int, nargs="+", default=[0, 1, 2, 3])
    ap.add_argument("--threads", type=int, default=1, help="OMP threads per process")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--side", type=int, default=16, help="latent side (image tokens = (side/2)²); memory of "
                    "the model states does not depend on it, bf16 runs on CPUs without bf16 units want it small")
    ap.add_argument("--context", type=int, default=32, help="text tokens")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)

    import deepspeed

    n = 2
    e = estimates(args.preset, n)
    P = e["total"]
    print(f"\ntorch {torch.__version__}, deepspeed {deepspeed.__version__}; MMDiT {args.preset} "
          f"{P / 1e6:.1f}M parameters ({P * 4 / MiB:.0f} MiB fp32), largest layer {e['largest'] / 1e6:.1f}M; "
          f"{n} processes (gloo), micro-batch {args.batch} of {(args.side // 2) ** 2}+{args.context} tokens, "
          f"{args.precision} AdamW, {args.threads} thread(s) each")
    print("| ZeRO | params MiB | fp32 master MiB | grads MiB | Adam MiB | **total MiB** | × ZeRO-0 "
          "| DeepSpeed estimate MiB | grads at end of backward MiB | reduce buckets allocated MiB | RSS MiB | step s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    base = None
    with tempfile.TemporaryDirectory() as tmp:
        for stage in args.stages:
            ranks = launch(stage, args, tmp)
            worst = partial(max_over, ranks)
            total = sum(worst(k) for k in ("params", "master", "grads", "adam"))
            base = base or (total if stage == 0 else None)
            est = f"{e['est'][stage] / MiB:.0f}" if stage in e["est"] else "–"
            ratio = f"{total / base:.2f}×" if base else "–"
            mib = {k: f"{worst(k) / MiB:.0f}" for k in ("params", "master", "grads", "adam", "grads_unreduced",
                                                         "buckets", "rss")}
            print(f"| {stage} | {mib['params']} | {mib['master']} | {mib['grads']} | {mib['adam']} "
                  f"| **{total / MiB:.0f}** | {ratio} | {est} | {mib['grads_unreduced']} | {mib['buckets']} "
                  f"| {mib['rss']} | {statistics.median(r['step_s'] for r in ranks):.2f} |", flush=True)
    # Bytes per parameter. fp32: params 4 whole below ZeRO-3; fp32 master 4, Adam 8 and grads 4 partitioned
    # from ZeRO-1 on (DeepSpeed's ZeRO-1 also keeps only its gradient partition after the post-backward
    # reduce); ZeRO-0 has no master. bf16 (the estimator's and the ZeRO paper's 16 bytes): params 2 and
    # grads 2, master 4 and Adam 8, partitioned as above; ZeRO-0 keeps a whole master copy.
    rule = {"fp32": {0: 16, 1: 4 + 16 / n, 2: 4 + 16 / n, 3: 20 / n},
            "bf16": {0: 16, 1: 2 + 14 / n, 2: 2 + 14 / n, 3: 16 / n}}[args.precision]
    print(f"{args.precision} rule (bytes/param × params): " + ", ".join(
        f"ZeRO-{s} {rule[s] * P / MiB:.0f} MiB" for s in args.stages))


if __name__ == "__main__":
    main()
