"""Precompute latents and text embeddings into a cache folder (format: `base_model/cache.py`).

    python -m base_model.precompute --dataset data/laion.parquet --image_space vae:/models/sd3/vae \
        --text_encoders clip:/m/clip_l clip:/m/clip_g t5:/m/t5 --resolution 512 --min_bucket 256 --output cache/laion
    python -m base_model.precompute --pairs data/pickapic --base runs/toy/final --output cache/pairs
    accelerate launch --num_processes 8 -m base_model.precompute …      # each process takes disjoint shards

Input (`base_model.sources`): image–caption data (a local parquet / arrow / save_to_disk / imagefolder
dataset, read through `datasets`' memory-mapped Arrow files), Pick-a-Pic-schema pairs (`--pairs`), or
the built-in shapes world (`--dataset shapes`). Three passes:

1. scan: captions and image sizes (image headers only). Pairs drop ties, unlabelled and identical
   pairs as `load_pairs` does, and a pair takes the bucket of its jpg_0. Every entry gets an
   aspect-ratio bucket (`base_model.buckets`); buckets smaller than `--min_bucket` are merged into
   their nearest neighbour. Rank 0 writes the plan (manifest.json, plan.npz).
2. text: one row per distinct caption, sorted by its hash, in text shards.
3. images: each shard decoded (resize to cover its bucket, centre crop), encoded in batches through
   the image space (pixels, or a VAE's posterior mean with its scale/shift), written atomically.

A killed run, started again with the same flags, skips the shards already written. An undecodable
image is skipped, counted and named; more than 1% of the rows stops the run.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass, field

import numpy as np
from tqdm.auto import tqdm

from .buckets import assign, bucket_table, merge_small
from .cache import FORMAT, MANIFEST, Cache, caption_key, read_manifest
from .cli import check_types, parse
from .data import to_model_space
from .errors import InputError, MissingInput, entry_point
from .outputs import atomic_folder, write_json
from .sources import check_source, load_rows, scan, source_identity


@dataclass
class PrecomputeConfig:
    dataset: str = "shapes"  # "shapes", or a local image–caption dataset (parquet, arrow, save_to_disk, imagefolder)
    pairs: str = ""  # Pick-a-Pic-schema pairs (parquet / arrow / save_to_disk) instead of --dataset
    image_column: str = "image"
    caption_column: str = "caption"
    split: str = "train"  # shapes world: the split
    num_images: int = 50_000  # shapes world: how many scenes
    prompts: list[str] = field(default_factory=list)  # extra captions to embed (sample-grid prompts)
    base: str = ""  # take text encoders and image space from this checkpoint's conditioning.json
    text_encoders: list[str] = field(default_factory=lambda: ["minilm"])
    image_space: str = "pixels"  # "pixels" or "vae:PATH"
    resolution: int = 32  # pixel budget resolution² per image
    aspect_buckets: bool = True  # False: every image centre-cropped to a resolution² square
    bucket_multiple: int = 0  # sides a multiple of this (px); 0: 16 × the VAE factor, 8 px in pixel space
    max_side: int = 0  # px; buckets with a longer side are left out (a model's position table); 0: no limit
    min_bucket: int = 64  # buckets with fewer images are merged into a neighbour: set ≥ the global batch
    shard_size: int = 1024  # images (or pairs) per shard
    text_shard_size: int = 4096  # captions per text shard
    batch_size: int = 64  # images per encoder call
    max_bad_fraction: float = 0.01
    output: str = ""
    overwrite_output_dir: bool = False  # replace a cache made with other inputs or flags

    def __post_init__(self):
        check_types(self)
        if not self.output:
            raise ValueError("--output is required")
        for name in ("resolution", "min_bucket", "shard_size", "text_shard_size", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be ≥ 1")


# ---------------------------------------------------------------------------------------------
# The plan: buckets, shards, text rows
# ---------------------------------------------------------------------------------------------


def make_plan(scanned: dict, table: list[tuple[int, int]], min_bucket: int, shard_size: int,
              text_shard_size: int, prompts: list[str]) -> tuple[dict, dict]:
    """(manifest fields, plan arrays). Entries are grouped by bucket, source order kept within one."""
    bucket = np.array([assign(w, h, table) for w, h in scanned["sizes"]], dtype=np.int64)
    counts = np.bincount(bucket, minlength=len(table)).tolist()
    target = np.array(merge_small(counts, table, min_bucket))
    bucket = target[bucket] if len(bucket) else bucket
    keys = sorted({caption_key(c) for c in list(scanned["captions"]) + list(prompts)})
    text_row = {k: i for i, k in enumerate(keys)}
    order, shards = [], []
    for b in range(len(table)):
        members = np.flatnonzero(bucket == b)
        for s in range(0, len(members), shard_size):
            shards.append({"name": f"shard-{len(shards):05d}", "bucket": b, "start": len(order),
                           "planned": len(members[s:s + shard_size])})
            order.extend(members[s:s + shard_size].tolist())
    order = np.array(order, dtype=np.int64)
    captions = list(dict.fromkeys(list(scanned["captions"]) + list(prompts)))
    text_captions = sorted(captions, key=caption_key)
    plan = {"rows": np.array(scanned["rows"], dtype=np.int64)[order] if len(order) else order,
            "text": np.array([text_row[caption_key(scanned["captions"][i])] for i in order], dtype=np.int64),
            "swap": np.array(scanned["swap"], dtype=bool)[order] if len(order) else np.zeros(0, bool)}
    fields = {"buckets": [list(hw) for hw in table], "shards": shards,
              "bucket_counts": {f"{table[b][0]}x{table[b][1]}": int((bucket == b).sum()) for b in range(len(table))
                                if (bucket == b).any()},
              "text_shards": [f"text-{j:05d}" for j in range(0, (len(keys) + text_shard_size - 1) // text_shard_size)]}
    return fields, {**plan, "text_captions": text_captions}


# ---------------------------------------------------------------------------------------------
# Encoding
# ---------------------------------------------------------------------------------------------


def conditioning(cfg: PrecomputeConfig, cond: tuple | None = None) -> tuple[list[str], str]:
    """(text encoders, image space): `cond` when a trainer gives it, the flags', or those of --base's
    conditioning.json."""
    if cond is not None:
        return list(cond[0]), cond[1]
    if not cfg.base:
        return list(cfg.text_encoders), cfg.image_space
    file = os.path.join(cfg.base, "conditioning.json")
    if not os.path.isfile(file):
        raise MissingInput(f"--base {cfg.base!r} has no conditioning.json")
    with open(file) as f:
        cond = json.load(f)
    if "sd3" in cond:
        raise InputError(f"--base {cfg.base!r} uses SD3's encoders: precompute for SD3 is not supported yet")
    return list(cond["text_encoders"]), cond["image_space"]


def identity(cfg: PrecomputeConfig, encoders: list[str], space: str) -> dict:
    """What a cache's contents depend on: a resumed run must match it."""
    inputs = source_identity(cfg.pairs or cfg.dataset, cfg.split, cfg.num_images)
    return {"kind": "pairs" if cfg.pairs else "images", "inputs": inputs, "text_encoders": encoders,
            "image_space": space, "resolution": cfg.resolution, "aspect_buckets": cfg.aspect_buckets,
            "bucket_multiple": cfg.bucket_multiple, "max_side": cfg.max_side, "min_bucket": cfg.min_bucket, "shard_size": cfg.shard_size,
            "text_shard_size": cfg.text_shard_size, "prompts": list(cfg.prompts),
            "columns": [cfg.image_column, cfg.caption_column]}


def encode_images(space, images: np.ndarray, batch_size: int) -> np.ndarray:
    """uint8 (N, H, W, 3) → float16 (N, C, h, w) through the image space, in batches."""
    import torch

    out = []
    for i in range(0, len(images), batch_size):
        x = torch.from_numpy(images[i:i + batch_size]).permute(0, 3, 1, 2)
        out.append(space.encode(to_model_space(x)).half().numpy())
    return np.concatenate(out)


def up_to_date(cfg: PrecomputeConfig, cond: tuple | None = None) -> bool:
    """The cache at cfg.output is complete and was made from these inputs and flags."""
    file = os.path.join(cfg.output, MANIFEST)
    if not os.path.isfile(file):
        return False
    m = read_manifest(cfg.output)
    return bool(m.get("complete")) and m["identity"] == identity(cfg, *conditioning(cfg, cond))


def precompute(cfg: PrecomputeConfig, rank: int = 0, world: int = 1, barrier=lambda: None,
               text=None, space=None, cond: tuple | None = None) -> str:
    """Build (or finish) the cache at cfg.output; every process of a launch calls it with its rank.
    `text` / `space`: encoders already loaded (else loaded here, only if there is work left), and
    `cond` their names (text encoders, image space) when they are not the flags'."""
    from .text import TextEmbedder
    from .vae import image_space

    out = os.path.normpath(cfg.output)
    check_source(cfg)
    encoders, space_spec = conditioning(cfg, cond)
    ident = identity(cfg, encoders, space_spec)
    if os.path.isfile(os.path.join(out, MANIFEST)):
        old = read_manifest(out)
        if old["identity"] != ident:
            diff = sorted(k for k in set(ident) | set(old["identity"]) if ident.get(k) != old["identity"].get(k))
            if not cfg.overwrite_output_dir:
                raise InputError(f"cache {out!r} was made from other inputs or flags ({', '.join(diff)} differ): "
                                 f"give another --output, or --overwrite_output_dir to rebuild it")
            barrier()
            if rank == 0:
                shutil.rmtree(out)
            barrier()
        elif old.get("complete"):
            return out
    elif os.path.isdir(out) and set(os.listdir(out)) - {"plan.npz", "plan.tmp.npz", "text_captions.json",
                                                          "text_captions.json.tmp"}:
        raise InputError(f"--output {out!r} is not empty and holds no cache: give a new or empty folder")
    barrier()  # every process has checked before the plan is written

    text = text if text is not None else TextEmbedder(encoders)
    space = space if space is not None else image_space(space_spec)
    if rank == 0 and not os.path.isfile(os.path.join(out, MANIFEST)):
        write_plan(cfg, out, ident, text, space)
    barrier()
    manifest = read_manifest(out)
    plan = np.load(os.path.join(out, "plan.npz"))
    with open(os.path.join(out, "text_captions.json")) as f:
        text_captions = json.load(f)
    S = cfg.text_shard_size
    for j, name in enumerate(manifest["text_shards"]):
        if j % world != rank or os.path.isdir(os.path.join(out, name)):
            continue
        chunk = text_captions[j * S:(j + 1) * S]
        context, pooled = text.run_encoders(chunk)
        with atomic_folder(os.path.join(out, name)) as tmp:
            np.save(os.path.join(tmp, "context.npy"), context.half().numpy())
            np.save(os.path.join(tmp, "pooled.npy"), pooled.half().numpy())
            np.save(os.path.join(tmp, "keys.npy"), np.array([caption_key(c) for c in chunk], dtype="S16"))

    mine = [s for i, s in enumerate(manifest["shards"]) if i % world == rank
            and not os.path.isdir(os.path.join(out, s["name"]))]
    bar = tqdm(total=sum(s["planned"] for s in mine) * (2 if cfg.pairs else 1), unit="img", unit_scale=True,
               desc=f"precompute (rank {rank})" if world > 1 else "precompute", disable=not mine)
    limit = cfg.max_bad_fraction * manifest["rows_total"]
    bad_so_far = len(manifest["bad"])
    for s in mine:
        sl = slice(s["start"], s["start"] + s["planned"])
        rows, swap, text_ids = plan["rows"][sl].tolist(), plan["swap"][sl].tolist(), plan["text"][sl]
        loaded = load_rows(cfg, rows, swap, tuple(manifest["buckets"][s["bucket"]]))
        good = [k for k, v in enumerate(loaded) if not isinstance(v, str)]
        skipped = [v for v in loaded if isinstance(v, str)]
        bad_so_far += len(skipped)
        if bad_so_far > limit:
            raise InputError(f"{cfg.pairs or cfg.dataset}: more than {cfg.max_bad_fraction:.0%} of "
                             f"{manifest['rows_total']} rows are bad: {'; '.join((manifest['bad'] + skipped)[:20])}")
        with atomic_folder(os.path.join(out, s["name"])) as tmp:
            for f, name in enumerate(("chosen", "rejected") if cfg.pairs else ("x",)):
                images = np.stack([loaded[k][f] for k in good]) if good else None
                z = encode_images(space, images, cfg.batch_size) if good else np.zeros((0,), np.float16)
                np.save(os.path.join(tmp, f"{name}.npy"), z)
                bar.update(len(good))
            np.save(os.path.join(tmp, "text.npy"), text_ids[good].astype(np.int64))
            np.save(os.path.join(tmp, "rows.npy"), np.array(rows, dtype=np.int64)[good])
            write_json(os.path.join(tmp, "info.json"), {"count": len(good), "skipped": skipped})
    bar.close()
    barrier()
    if rank == 0:
        finish(cfg, out, manifest)
    barrier()
    return out


def write_plan(cfg: PrecomputeConfig, out: str, ident: dict, text, space) -> None:
    scanned = scan(cfg)
    total = scanned["total"]
    if len(scanned["bad"]) > cfg.max_bad_fraction * total:
        raise InputError(f"{cfg.pairs or cfg.dataset}: {len(scanned['bad'])} of {total} rows are bad "
                         f"(more than {cfg.max_bad_fraction:.0%}): {'; '.join(scanned['bad'][:20])}")
    if not scanned["rows"]:
        raise InputError(f"{cfg.pairs or cfg.dataset}: no usable row (dropped: {scanned['dropped']}, "
                         f"bad: {len(scanned['bad'])})")
    f = space.downsample
    multiple = min(cfg.bucket_multiple or (16 * f if f > 1 else 8), cfg.resolution)
    table = (bucket_table(cfg.resolution ** 2, multiple) if cfg.aspect_buckets
             else [(cfg.resolution, cfg.resolution)])
    table = [hw for hw in table if not cfg.max_side or max(hw) <= cfg.max_side] or table[:1]
    fields, plan = make_plan(scanned, table, cfg.min_bucket, cfg.shard_size, cfg.text_shard_size, cfg.prompts)
    os.makedirs(out, exist_ok=True)
    np.savez(os.path.join(out, "plan.tmp.npz"), rows=plan["rows"], text=plan["text"], swap=plan["swap"])
    os.replace(os.path.join(out, "plan.tmp.npz"), os.path.join(out, "plan.npz"))
    write_json(os.path.join(out, "text_captions.json"), plan["text_captions"])
    text_layout = [asdict(p) for p in text.layout]
    manifest = {
        "format": FORMAT, "complete": False, "identity": ident, "kind": ident["kind"], "dtype": "float16",
        "image_space": {"spec": ident["image_space"], "channels": space.channels, "downsample": f,
                        "scaling_factor": getattr(space, "scaling_factor", 1.0),
                        "shift_factor": getattr(space, "shift_factor", 0.0)},
        "text": {"encoders": ident["text_encoders"], "layout": text_layout, "context_dim": text.context_dim,
                 "context_len": text.context_len, "pooled_dim": text.pooled_dim,
                 "count": len(plan["text_captions"]), "shard_size": cfg.text_shard_size},
        "rows_total": total, "dropped": {**scanned["dropped"], **({"bad": len(scanned["bad"])} if cfg.pairs else {})},
        "bad": scanned["bad"], **fields}
    write_json(os.path.join(out, MANIFEST), manifest)  # written last: the plan is complete


def finish(cfg: PrecomputeConfig, out: str, manifest: dict) -> None:
    """Counts from every shard's info.json; the manifest marked complete."""
    skipped = []
    for s in manifest["shards"]:
        folder = os.path.join(out, s["name"])
        if not os.path.isdir(folder):
            raise InputError(f"cache {out!r}: {s['name']} was not written (a process failed?): run again")
        with open(os.path.join(folder, "info.json")) as f:
            info = json.load(f)
        s["count"] = info["count"]
        skipped += info["skipped"]
    bad = manifest["bad"] + skipped
    if len(bad) > cfg.max_bad_fraction * manifest["rows_total"]:
        raise InputError(f"{cfg.pairs or cfg.dataset}: {len(bad)} of {manifest['rows_total']} rows are bad "
                         f"(more than {cfg.max_bad_fraction:.0%}): {'; '.join(bad[:20])}")
    manifest["bad"] = bad
    if "bad" in manifest["dropped"]:
        manifest["dropped"]["bad"] = len(bad)
    manifest["skipped"] = len(bad)
    manifest["complete"] = True
    write_json(os.path.join(out, MANIFEST), manifest)
    Cache(out)  # opens: a sanity check of what was written


def ranks():
    """(rank, world, barrier) of an `accelerate launch` / torchrun (gloo between CPU processes), or of one process."""
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return 0, 1, lambda: None
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), dist.get_world_size(), dist.barrier


@entry_point
def cli(argv):
    cfg = parse(PrecomputeConfig, argv)
    rank, world, barrier = ranks()
    out = precompute(cfg, rank, world, barrier)
    if rank == 0:
        m = read_manifest(out)
        print(json.dumps({"cache": out, "samples": sum(s["count"] for s in m["shards"]),
                          "buckets": m["bucket_counts"], "captions": m["text"]["count"],
                          "dropped": m["dropped"], "skipped": m["skipped"]}))


if __name__ == "__main__":
    cli()
