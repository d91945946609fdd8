"""Deduplication search throughput: faiss (k-means clusters, then a range search in each query's
cluster; and faiss's exact range search) against a plain torch matmul search, on N unit embeddings.

    .venv/bin/python benchmarks/dedup.py                      # 100k embeddings of SSCD's width (512), 2 threads

The embeddings are synthetic: N·(1 − dup) random unit vectors plus N·dup noisy copies of some of
them (cosine ≈ 0.8 to their source), searched at the paper's threshold 0.5. The clustered search
runs on all N (k = N // 40 clusters, base_model.dedup's rule, nprobe 1); the exact searches are
timed on the first --exact_queries queries against all N and their rate is reported (their time for
all N scales linearly). Recall is measured on those queries against the exact pairs.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from base_model.dedup import cluster_count, near_pairs


def synthetic(n: int, d: int, dup: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    n_dup = int(n * dup)
    x = rng.standard_normal((n, d), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    src = rng.integers(0, n - n_dup, n_dup)
    noise = rng.standard_normal((n_dup, d), dtype=np.float32)
    noise /= np.linalg.norm(noise, axis=1, keepdims=True)
    x[n - n_dup:] = x[src] + 0.75 * noise  # cos ≈ 1 / sqrt(1 + 0.75²) = 0.8 to the source
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x[rng.permutation(n)]


def torch_pairs(emb: np.ndarray, queries: int, threshold: float, block: int = 2048) -> set:
    """All (i, j), i < j, i among the first `queries`, with cos ≥ threshold: blocked q @ Xᵀ."""
    x = torch.from_numpy(emb)
    found = set()
    for s in range(0, queries, block):
        sims = x[s:min(s + block, queries)] @ x.T  # (b, N)
        i, j = torch.nonzero(sims >= threshold, as_tuple=True)
        i = i + s
        keep = j > i
        found.update(zip(i[keep].tolist(), j[keep].tolist()))
    return found


def faiss_exact_pairs(emb: np.ndarray, queries: int, threshold: float) -> set:
    import faiss

    index = faiss.IndexFlatIP(emb.shape[1])
    index.add(emb)
    lims, sims, ids = index.range_search(emb[:queries], threshold - 1e-6)
    q = np.repeat(np.arange(queries), np.diff(lims.astype(np.int64)))
    keep = (ids > q) & (sims >= threshold)
    return set(zip(q[keep].tolist(), ids[keep].tolist()))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--dup", type=float, default=0.1)
    ap.add_argument("--threshold", type=float, default=0.5)
    ap.add_argument("--exact_queries", type=int, default=10_000)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    import faiss

    faiss.omp_set_num_threads(args.threads)
    torch.set_num_threads(args.threads)
    emb = synthetic(args.n, args.dim, args.dup)
    q = args.exact_queries

    t = time.perf_counter()
    truth = faiss_exact_pairs(emb, q, args.threshold)
    exact_s = time.perf_counter() - t
    t = time.perf_counter()
    by_torch = torch_pairs(emb, q, args.threshold)
    torch_s = time.perf_counter() - t
    k = cluster_count(args.n)
    t = time.perf_counter()
    i, j, _ = near_pairs(emb, args.threshold, clusters=k, nprobe=1)
    clustered_s = time.perf_counter() - t
    clustered = {(a, b) for a, b in zip(i.tolist(), j.tolist()) if a < q}

    print(f"{args.n} embeddings of dim {args.dim}, {args.dup:.0%} planted copies, cosine ≥ {args.threshold}, "
          f"{args.threads} threads; exact searches timed on {q} queries against all {args.n}")
    print("| search | queries | seconds | embeddings/s | est. s for all | recall on the timed queries |")
    print("|---|---|---|---|---|---|")
    for name, n, s, pairs in ((f"faiss k-means ({k} clusters) + range search in the cluster", args.n, clustered_s,
                               clustered),
                              ("faiss exact range search (IndexFlatIP)", q, exact_s, truth),
                              ("torch matmul, blocks of 2048", q, torch_s, by_torch)):
        rate = n / s
        print(f"| {name} | {n} | {s:.2f} | {rate:,.0f} | {args.n / rate:.1f} | "
              f"{len(pairs & truth) / max(1, len(truth)):.3f} ({len(pairs & truth)}/{len(truth)}) |")


if __name__ == "__main__":
    main()
