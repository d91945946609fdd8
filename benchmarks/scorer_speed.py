"""The compositional checker's `detect` on each model's samples: the per-component loop that fills the holes of every
connected component (the reference, kept here) vs `reward.compositional.detect`, which first drops components whose
bounding box is under the noise threshold (their area, holes filled, can only be smaller: the same detections).

    python benchmarks/scorer_speed.py --models base=runs/demo/pretrain/final raft=runs/demo/pretrain/final+runs/demo/raft/final

A collapsed policy (the demo's RAFT control) draws speckled images with hundreds of tiny components, and an online
round scores its 128 samples twice (the reward and the checker's verdict). Rows: a model's 128 samples (16 train
prompts × 8, the shared sampler); columns: seconds to sample them (for scale), seconds for each `detect`, and whether
the two give the same detections.
"""

import argparse
import time

import torch
from scipy import ndimage

from base_model.adapters import load
from base_model.data import shapes_data
from base_model.sampling import GUIDANCE, SOLVER, STEPS
from reward import compositional as C


def detect_reference(image, world=C.WorldConfig()):
    image = C.to_uint8(image)
    labels = C.classify_pixels(image, world)
    side = world.object_size * image.shape[0] / world.grid
    detections = []
    for k, (color, _) in enumerate(world.colors):
        components, _ = ndimage.label(labels == k)
        for i, (ys, xs) in enumerate(ndimage.find_objects(components), start=1):
            mask = ndimage.binary_fill_holes(components[ys, xs] == i)
            area = int(mask.sum())
            if area < C.MIN_AREA_FRAC * side**2:
                continue
            fill = area / mask.size
            box = (xs.start, ys.start, xs.stop, ys.stop)
            detections.append(C.Detection(C.shape_from_fill(fill), color, box, area, fill))
    return sorted(detections, key=lambda d: -d.area)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", required=True, help="NAME=SPEC (a checkpoint, or BASE+ADAPTER)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    _, scenes = shapes_data("train", 16)
    rep = torch.arange(len(scenes)).repeat_interleave(8)
    print("| model | sample 128 s | detect, reference s | detect s | speed-up | same detections |\n|---|---|---|---|---|---|")
    for name, spec in (m.split("=", 1) for m in args.models):
        gen = load(spec)
        context, pooled = gen.text.encode([s.caption for s in scenes])
        t = time.perf_counter()
        images = gen.generate(None, list(range(len(rep))), STEPS, GUIDANCE, batch_size=256,
                              context=(context[rep], pooled[rep]), solver=SOLVER, progress=False)
        t_sample = time.perf_counter() - t
        t = time.perf_counter()
        ref = [detect_reference(im) for im in images]
        t_ref = time.perf_counter() - t
        t = time.perf_counter()
        new = [C.detect(im) for im in images]
        t_new = time.perf_counter() - t
        print(f"| {name} | {t_sample:.2f} | {t_ref:.2f} | {t_new:.2f} | {t_ref / t_new:.1f}× | {ref == new} |")


if __name__ == "__main__":
    main()
