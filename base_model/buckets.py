"""Aspect-ratio buckets (SD3, section 5.3.2; PixArt and SimpleTuner do the same): train at a fixed
pixel budget with a table of aspect ratios, every side a multiple of `multiple` pixels.

    table = bucket_table(256 * 256, multiple=32)      # [(h, w), ...] in pixels, square first
    b = assign(width, height, table)                  # the bucket of nearest log aspect ratio
    merged = merge_small(counts, table, min_size)     # bucket → bucket it is folded into

A bucket is assigned from the image's size before anything is decoded or encoded; a bucket holding
fewer images than a global batch is folded into its nearest neighbour (by log aspect ratio), never
dropped, so every global batch is drawn from one bucket and has one shape.
"""

from __future__ import annotations

import math

# Height : width ratios of the table (SD3 and SDXL use a similar set), square first.
RATIOS = ((1, 1), (4, 5), (5, 4), (3, 4), (4, 3), (2, 3), (3, 2), (9, 16), (16, 9), (1, 2), (2, 1))


def bucket_table(pixels: int, multiple: int, ratios=RATIOS) -> list[tuple[int, int]]:
    """(height, width) per ratio with h·w ≈ pixels and both sides multiples of `multiple` (at least
    one multiple); ratios that round to the same size appear once."""
    table = []
    for rh, rw in ratios:
        h = max(multiple, round(math.sqrt(pixels * rh / rw) / multiple) * multiple)
        w = max(multiple, round(math.sqrt(pixels * rw / rh) / multiple) * multiple)
        if (h, w) not in table:
            table.append((h, w))
    return table


def log_ratio(h: float, w: float) -> float:
    return math.log(h / w)


def assign(width: int, height: int, table: list[tuple[int, int]]) -> int:
    """Index of the bucket whose aspect ratio is nearest the image's (in log ratio; ties → first)."""
    r = log_ratio(height, width)
    return min(range(len(table)), key=lambda i: abs(log_ratio(*table[i]) - r))


def merge_small(counts: list[int], table: list[tuple[int, int]], min_size: int) -> list[int]:
    """Fold every non-empty bucket with fewer than `min_size` images into its nearest non-empty
    neighbour, smallest first, until all hold at least `min_size` or one bucket is left.
    Returns `target[i]`: the bucket whose size images of bucket i take."""
    target, counts = list(range(len(table))), list(counts)
    while True:
        live = [i for i in range(len(table)) if counts[i] > 0]
        small = [i for i in live if counts[i] < min_size]
        if not small or len(live) == 1:
            return [_follow(target, i) for i in range(len(table))]
        i = min(small, key=lambda j: (counts[j], j))
        j = min((k for k in live if k != i),
                key=lambda k: (abs(log_ratio(*table[k]) - log_ratio(*table[i])), -counts[k], k))
        counts[j] += counts[i]
        counts[i] = 0
        target[i] = j


def _follow(target: list[int], i: int) -> int:
    while target[i] != i:
        i = target[i]
    return i
