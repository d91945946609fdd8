"""An online round's rollout with the LoRA adapter run by peft vs folded into the weights (`align.lora.merged`).

    python benchmarks/lora_sampling.py [--base runs/toy/final] [--ranks 4 16] [--repeats 3] [--threads 2]

One rollout = what `align.online` samples per round with configs/online/toy.yaml: 32 prompts × 8 images,
5 midpoint steps (9 model calls), CFG 2 (both branches in one batch), batches of 64. Rows: peft's
unmerged adapter (each targeted Linear runs the base matmul, then A and B), the same adapter merged
for the rollout (`merged`: one matmul a layer), and the bare base (the floor: no adapter at all). The
adapter's B is random (a trained adapter's cost is the same). Columns: median (min) seconds of
alternating runs, the speed-up over peft's, and max |Δ x0| against peft's samples (float rounding,
grown through 9 model calls with CFG). --base defaults to the toy preset with random weights.
"""

import argparse
import statistics
import time

import torch

from align.lora import add_lora, merged
from align.online import OnlineConfig
from base_model.mmdit import MMDiT, preset
from base_model.sampling import sample


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", default="", help="a checkpoint folder (default: the toy preset, random weights)")
    ap.add_argument("--ranks", type=int, nargs="+", default=[4, 16])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = OnlineConfig()
    print("| rank | rollout | median s (min) | speed-up | max abs Δ x0 |\n|---|---|---|---|---|")
    for rank in args.ranks:
        torch.manual_seed(0)
        base = MMDiT.from_pretrained(args.base) if args.base else MMDiT(preset("toy"))
        model = add_lora(base.eval().requires_grad_(False), rank, rank, cfg.lora_target_modules + ["adaLN"])
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.01)
        c = base.config
        n = 32 * 8
        context, pooled = torch.randn(n, 16, c.context_dim), torch.randn(n, c.pooled_dim)

        def rollout(net):
            return sample(net, context, pooled, list(range(n)), (c.in_channels, c.sample_size, c.sample_size),
                          steps=5, shift=3.0, guidance=2.0, batch_size=64, progress=False, solver="midpoint")

        def peft_rollout():
            return rollout(model)

        def merged_rollout():
            with merged(model, "default"):
                return rollout(model)

        def base_rollout():
            with model.disable_adapter():
                return rollout(model)

        runs = {"peft adapter": peft_rollout, "merged (ours)": merged_rollout, "bare base (floor)": base_rollout}
        outputs = {k: r() for k, r in runs.items()}  # warm-up, and the samples compared
        times = {k: [] for k in runs}
        for _ in range(args.repeats):
            for k, r in runs.items():
                t0 = time.perf_counter()
                r()
                times[k].append(time.perf_counter() - t0)
        ref = statistics.median(times["peft adapter"])
        for k in runs:
            med = statistics.median(times[k])
            delta = (outputs[k] - outputs["peft adapter"]).abs().max().item() if k != "bare base (floor)" else float("nan")
            print(f"| {rank} | {k} | {med:.2f} ({min(times[k]):.2f}) | {ref / med:.2f}× | {delta:.1e} |")


if __name__ == "__main__":
    main()
