"""The studies' statistics against values computed by hand."""

import numpy as np
import pytest

from reward.stats import mean_pareto_rank, mean_rank_ci, pareto_ranks, pearson_ci, power_law_fit


def test_pareto_ranks_by_hand():
    # (score ↑, FD ↓): A beats C and D, B beats D, C beats D; A and B trade off → fronts {A, B}, {C}, {D}
    points = [(0.5, 1.0), (0.6, 2.0), (0.4, 1.5), (0.3, 3.0)]
    assert pareto_ranks(points, [True, False]).tolist() == [1, 1, 2, 3]
    assert pareto_ranks([(1, 1), (1, 1)], [True, True]).tolist() == [1, 1]  # equal points dominate neither


def test_mean_rank_over_settings_by_hand():
    score = [[0.5, 0.2], [0.6, 0.3], [0.4, 0.1]]  # (variants, settings)
    fd = [[1.0, 1.0], [2.0, 0.5], [1.5, 2.0]]
    # setting 0: ranks [1, 1, 2]; setting 1: variant 1 dominates both → [2, 1, 3] (0 dominates 2)
    assert mean_pareto_rank(score, fd).tolist() == [1.5, 1.0, 2.5]
    seeds = np.stack([np.array(score)] * 3, 1)  # identical seeds: the interval collapses on the rank
    out = mean_rank_ci(seeds, np.stack([np.array(fd)] * 3, 1), n_boot=50)
    assert out["mean_rank"] == [1.5, 1.0, 2.5] and [lo for lo, _ in out["ci95"]] == [1.5, 1.0, 2.5]


def test_power_law_and_pearson_by_hand():
    fit = power_law_fit([1, 10, 100, 1000], [2.0, 2.0 * 10 ** -0.5, 0.2, 2.0 * 10 ** -1.5])
    assert fit["exponent"] == pytest.approx(-0.5) and fit["c"] == pytest.approx(2.0) and fit["r2"] == pytest.approx(1.0)
    assert fit["exponent_ci95"] == pytest.approx([-0.5, -0.5])  # every resample lies on the same line
    noisy = power_law_fit([1, 10, 100, 1000], [2.0, 0.5, 0.3, 0.05], n_boot=500)
    assert noisy["exponent_ci95"][0] < noisy["exponent"] < noisy["exponent_ci95"][1]
    # r = Σdxdy / sqrt(Σdx²·Σdy²) = 3.5 / sqrt(5 · 4.75)
    out = pearson_ci([1, 2, 3, 4], [2, 4, 5, 4], n_boot=500)
    assert out["r"] == pytest.approx(3.5 / np.sqrt(5 * 4.75)) and out["n"] == 4
    assert -1 <= out["ci95"][0] <= out["r"] <= out["ci95"][1] <= 1
