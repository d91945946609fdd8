"""The precomputed data cache (written by `base_model.precompute`) and how training reads it.

A cache is a folder:

    manifest.json      what was encoded and how: kind ("images" or "pairs"), dtype, the image space
                       (spec, channels, downsampling, scale/shift), the text encoders and their layout,
                       the buckets (pixel sizes), a fingerprint of the inputs, the shards with their
                       counts, and the rows dropped or skipped (named). "complete": true once all is written.
    plan.npz           the planned source row, text row and (pairs) winner swap of every entry, shard by shard
    shard-NNNNN/       one bucket's images, written atomically: x.npy (n, C, h, w) float16, or chosen.npy
                       and rejected.npy for pairs; text.npy (n,) int64 rows of the text table; rows.npy
                       (n,) the source rows; info.json (count, rows skipped with their names)
    text-NNNNN/        the text table, one row per distinct caption sorted by its key (sha256[:16]):
                       context.npy (n, L, D) float16, pooled.npy (n, P) float16, keys.npy (n,) S16

Every .npy is raw bytes behind a small header, memory-mapped on read: a process holds only the
batches it reads, whatever the size of the data set.

Training draws global batches with `GlobalBatches`: per (seed, epoch), a permutation within each
bucket, cut into global batches of one bucket each, the batches shuffled; process r takes slice r
of each. Batch k is found from k alone, so a resume is O(1) and the order does not depend on the
number of processes. `loader` serves one process's slices through a torch DataLoader with workers.
"""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import torch

from .errors import InputError, MissingInput

FORMAT = "flowalign-cache/1"
MANIFEST = "manifest.json"


def caption_key(caption: str) -> bytes:
    """The text table's key of a caption: the first 16 hex digits of its SHA-256."""
    return hashlib.sha256(caption.encode("utf-8")).hexdigest()[:16].encode()


def is_cache(path: str) -> bool:
    return os.path.isfile(os.path.join(path, MANIFEST))


def read_manifest(path: str) -> dict:
    file = os.path.join(path, MANIFEST)
    if not os.path.isfile(file):
        raise MissingInput(f"cache {path!r} has no {MANIFEST}: make one with python -m base_model.precompute")
    try:
        with open(file) as f:
            manifest = json.load(f)
    except (OSError, ValueError) as e:
        raise InputError(f"cache manifest {file!r} is unreadable ({e})") from e
    if manifest.get("format") != FORMAT:
        raise InputError(f"cache {path!r}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    return manifest


def check_conditioning(path: str, manifest: dict, text_encoders, image_space: str) -> None:
    """The cache was made by these encoders, or an InputError names the mismatch."""
    made = (manifest["text"]["encoders"], manifest["image_space"]["spec"])
    if list(made[0]) != list(text_encoders) or made[1] != image_space:
        raise InputError(f"cache {path!r} was made with text encoders {made[0]} and image space {made[1]!r}; "
                         f"this model uses {list(text_encoders)} and {image_space!r}: precompute it again "
                         f"with the model's encoders, or give another cache")


class Cache:
    """A complete cache, memory-mapped. Sample ids run over the shards in order."""

    def __init__(self, path: str):
        self.path, self.manifest = path, read_manifest(path)
        m = self.manifest
        if not m.get("complete"):
            raise InputError(f"cache {path!r} is unfinished: run python -m base_model.precompute again "
                             f"with the same flags to finish it")
        self.kind = m["kind"]
        self.fields = ("chosen", "rejected") if self.kind == "pairs" else ("x",)
        self.shards = m["shards"]
        self.offsets = np.cumsum([0] + [s["count"] for s in self.shards])
        space = m["image_space"]
        self.channels, self.downsample = space["channels"], space["downsample"]
        self.text_shard_size = m["text"]["shard_size"]
        self._arrays: dict = {}  # opened lazily, so DataLoader workers open their own maps

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def layout(self) -> list:
        """The text encoders' `text.Part`s: which slices of context and pooled each one fills."""
        from .text import Part

        return [Part(p["name"], tuple(p["seq"]), tuple(p["pooled"]), p["width"]) for p in self.manifest["text"]["layout"]]

    def shape(self, bucket: int) -> tuple[int, int, int]:
        """(C, h, w) of a sample in `bucket`: the bucket's pixel size over the space's downsampling."""
        h, w = self.manifest["buckets"][bucket]
        return self.channels, h // self.downsample, w // self.downsample

    def buckets(self) -> dict[int, np.ndarray]:
        """Bucket → its sample ids (ascending)."""
        out: dict[int, list] = {}
        for i, s in enumerate(self.shards):
            out.setdefault(s["bucket"], []).append(np.arange(self.offsets[i], self.offsets[i + 1]))
        return {b: np.concatenate(v) for b, v in sorted(out.items()) if sum(map(len, v))}

    def _array(self, folder: str, name: str, shape: tuple, dtype: str) -> np.ndarray:
        key = (folder, name)
        if key not in self._arrays:
            file = os.path.join(self.path, folder, f"{name}.npy")
            try:
                arr = np.load(file, mmap_mode="r")
            except (OSError, ValueError) as e:
                raise InputError(f"cache shard {file!r} is corrupt or missing ({type(e).__name__}: {e}); "
                                 f"delete the shard's folder and run python -m base_model.precompute again") from e
            if arr.shape != shape or str(arr.dtype) != dtype:
                raise InputError(f"cache shard {file!r} holds {arr.dtype} {arr.shape}, the manifest says "
                                 f"{dtype} {shape}")
            self._arrays[key] = arr
        return self._arrays[key]

    def _gather(self, ids: np.ndarray, offsets: np.ndarray, array_of) -> np.ndarray:
        """Rows `ids` of a table split into files at `offsets`, each file read through its map."""
        part = np.searchsorted(offsets, ids, side="right") - 1
        first = array_of(int(part[0]))
        out = np.empty((len(ids), *first.shape[1:]), first.dtype)
        for p in np.unique(part):
            sel = part == p
            out[sel] = array_of(int(p))[ids[sel] - offsets[p]]
        return out

    def _shard(self, i: int, name: str) -> np.ndarray:
        s, dtype = self.shards[i], self.manifest["dtype"]
        if name in ("text", "rows"):
            return self._array(s["name"], name, (s["count"],), "int64")
        return self._array(s["name"], name, (s["count"], *self.shape(s["bucket"])), dtype)

    def text(self, text_ids: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """(context, pooled) float32 of text-table rows."""
        t = self.manifest["text"]
        S, n = self.text_shard_size, t["count"]
        offsets = np.arange(0, n + S, S)[: (n + S - 1) // S + 1]
        count = lambda j: min(S, n - j * S)  # noqa: E731
        ctx = self._gather(np.asarray(text_ids), offsets, lambda j: self._array(
            f"text-{j:05d}", "context", (count(j), t["context_len"], t["context_dim"]), self.manifest["dtype"]))
        pooled = self._gather(np.asarray(text_ids), offsets, lambda j: self._array(
            f"text-{j:05d}", "pooled", (count(j), t["pooled_dim"]), self.manifest["dtype"]))
        return torch.from_numpy(ctx).float(), torch.from_numpy(pooled).float()

    def text_ids(self, captions: list[str]) -> np.ndarray:
        """Text-table rows of captions (each must be in the table)."""
        t = self.manifest["text"]
        S, n = self.text_shard_size, t["count"]
        keys = np.concatenate([self._array(f"text-{j:05d}", "keys", (min(S, n - j * S),), "|S16")
                               for j in range(0, (n + S - 1) // S)])
        wanted = np.array([caption_key(c) for c in captions], dtype="S16")
        ids = np.searchsorted(keys, wanted)
        found = (ids < n) & (keys[np.minimum(ids, n - 1)] == wanted)
        if not found.all():
            raise InputError(f"cache {self.path!r} has no text embedding of {captions[int(np.argmin(found))]!r}")
        return ids

    def text_rows(self, ids) -> np.ndarray:
        """The text-table rows of samples `ids`."""
        return self._gather(np.asarray(ids, dtype=np.int64), self.offsets, lambda i: self._shard(i, "text"))

    def source_rows(self, ids) -> np.ndarray:
        """The rows of the source data set that samples `ids` were made from."""
        return self._gather(np.asarray(ids, dtype=np.int64), self.offsets, lambda i: self._shard(i, "rows"))

    def read(self, ids, text: bool = True) -> dict[str, torch.Tensor]:
        """Samples `ids` (one bucket): float32 image tensors, and (`text`) their context and pooled embeddings."""
        ids = np.asarray(ids, dtype=np.int64)
        out = {f: torch.from_numpy(self._gather(ids, self.offsets, lambda i, f=f: self._shard(i, f))).float()
               for f in self.fields}
        if text:
            out["context"], out["pooled"] = self.text(self.text_rows(ids))
        return out

    def bucket_of(self, ids) -> np.ndarray:
        """The bucket of each sample."""
        shard = np.searchsorted(self.offsets, np.asarray(ids, dtype=np.int64), side="right") - 1
        return np.array([s["bucket"] for s in self.shards], dtype=np.int64)[shard]


class GlobalBatches:
    """Global batch k (of G sample ids, one bucket) of a run: a function of (seed, k) alone.

    Epoch e = k // per_epoch. Within each bucket a permutation drawn from (seed, e, bucket) is cut
    into ⌊n_b / G⌋ batches (the rest of the bucket waits for another epoch's permutation); the
    epoch's batches are shuffled by (seed, e). Process r of W takes ids[r·G/W : (r+1)·G/W]."""

    def __init__(self, buckets: dict[int, np.ndarray], global_batch: int, seed: int, where: str = "the data"):
        small = {b: len(v) for b, v in buckets.items() if len(v) < global_batch}
        if small:
            raise InputError(f"{where}: bucket(s) {small} hold fewer samples than the global batch {global_batch}; "
                             f"precompute with --min_bucket {global_batch} (or more) so small buckets are merged")
        self.buckets, self.G, self.seed = buckets, global_batch, seed
        self.per_epoch = sum(len(v) // global_batch for v in buckets.values())
        self._epoch: tuple[int, list] | None = None

    def epoch(self, e: int) -> list[tuple[int, np.ndarray]]:
        if self._epoch is None or self._epoch[0] != e:
            batches = []
            for b, ids in self.buckets.items():
                perm = ids[np.random.default_rng([self.seed, e, b]).permutation(len(ids))]
                batches += [(b, perm[i * self.G:(i + 1) * self.G]) for i in range(len(ids) // self.G)]
            order = np.random.default_rng([self.seed, e]).permutation(len(batches))
            self._epoch = (e, [batches[i] for i in order])
        return self._epoch[1]

    def __call__(self, k: int) -> tuple[int, np.ndarray]:
        return self.epoch(k // self.per_epoch)[k % self.per_epoch]


def rank_slice(ids: np.ndarray, rank: int, world: int) -> np.ndarray:
    per = len(ids) // world
    return ids[rank * per:(rank + 1) * per]


class RankBatches(torch.utils.data.Dataset):
    """Item k: this process's slice of global batch k, read from the cache."""

    def __init__(self, cache: Cache, batches: GlobalBatches, rank: int, world: int):
        self.cache, self.batches, self.rank, self.world = cache, batches, rank, world

    def __getitem__(self, k: int) -> dict:
        bucket, ids = self.batches(k)
        mine = rank_slice(ids, self.rank, self.world)
        return {"bucket": bucket, "ids": torch.from_numpy(mine.copy()), **self.cache.read(mine)}


def loader(cache: Cache, batches: GlobalBatches, rank: int, world: int, start: int, stop: int,
           num_workers: int = 2, prefetch_factor: int = 4):
    """Batches start … stop-1 of this process, in order. Not passed to `accelerator.prepare`: the
    slicing per process is done here, once."""
    return torch.utils.data.DataLoader(RankBatches(cache, batches, rank, world), sampler=range(start, stop),
                                       batch_size=None, num_workers=num_workers,
                                       prefetch_factor=prefetch_factor if num_workers else None)
