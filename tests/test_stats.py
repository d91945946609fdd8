"""reward.stats: closed-form cases, bootstrap behaviour, Bradley–Terry recovery, agreement."""

import numpy as np
import pytest

from reward.stats import (
    bootstrap_ci,
    bradley_terry,
    bradley_terry_ci,
    fleiss_kappa,
    group_diversity,
    krippendorff_alpha_nominal,
    mean_ci,
    outcome_win_rate,
    paired_diff,
    win_rate,
)

nan = np.nan


# --- diversity ---------------------------------------------------------------------------------


def test_group_diversity_by_hand():
    e1, e2, d = [1.0, 0.0], [0.0, 1.0], [0.6, 0.8]
    # prompt 0: three copies of one image (collapse); prompt 1: two orthogonal images and one at cos 0.6
    # and 0.8 to them: pairwise 1 − cos = 1, 0.4, 0.2 → mean 1.6/3
    div = group_diversity(np.array([e1, e1, e1, e1, e2, d]), k=3)
    assert div == pytest.approx([0.0, 1.6 / 3])
    with pytest.raises(ValueError, match="k ≥ 2"):
        group_diversity(np.eye(3), k=1)
    with pytest.raises(ValueError, match="multiple of k"):
        group_diversity(np.eye(3), k=2)


def test_copies_of_float32_unit_vectors_have_diversity_zero_not_below():
    """A collapsed prompt's copies, normalised in float32 as the thumbnails are: their cos can round a hair above 1,
    which printed as "diversity -0.000" on an AVX2 machine. A distance is never negative."""
    f = np.random.default_rng(0).standard_normal((500, 64)).astype(np.float32)
    f /= np.linalg.norm(f, axis=1, keepdims=True)
    div = group_diversity(np.repeat(f, 3, axis=0), k=3)
    assert (div >= 0).all() and div.max() < 1e-6


# --- bootstrap ---------------------------------------------------------------------------------


def test_ci_of_a_constant_is_a_point():
    assert bootstrap_ci(np.full(50, 0.5)) == (0.5, 0.5)
    lo, hi = bootstrap_ci(np.full(50, 0.3), groups=np.arange(50) % 7)
    assert lo == pytest.approx(0.3, abs=1e-15) and hi == pytest.approx(0.3, abs=1e-15)


def test_ci_covers_the_true_mean_with_the_normal_width():
    x = np.random.default_rng(1).normal(3.0, 1.0, 10_000)
    out = mean_ci(x)
    lo, hi = out["ci95"]
    assert out["n"] == 10_000 and lo < 3.0 < hi and lo < out["mean"] < hi
    assert hi - lo == pytest.approx(2 * 1.96 / 100, rel=0.15)  # 2 · z · σ/√n


def test_cluster_bootstrap_widens_when_values_are_duplicated_within_groups():
    # 50 prompts, each prompt's value repeated 10 times: really 50 observations, not 500
    per_group = np.random.default_rng(2).normal(0.0, 1.0, 50)
    values, groups = np.repeat(per_group, 10), np.repeat(np.arange(50), 10)
    iid_lo, iid_hi = bootstrap_ci(values)
    lo, hi = bootstrap_ci(values, groups=groups)
    assert hi - lo > 2.5 * (iid_hi - iid_lo)  # √10 ≈ 3.2 in expectation
    one_lo, one_hi = bootstrap_ci(per_group)  # the cluster CI is that of the 50 group values
    assert hi - lo == pytest.approx(one_hi - one_lo, rel=0.2)


def test_bootstrap_is_seeded_and_checks_group_length():
    x = np.random.default_rng(3).normal(size=40)
    assert bootstrap_ci(x, seed=5) == bootstrap_ci(x, seed=5) != bootstrap_ci(x, seed=6)
    with pytest.raises(ValueError):
        bootstrap_ci(x, groups=np.arange(39))


def test_paired_diff_is_mean_of_b_minus_a_and_pairing_removes_shared_noise():
    a = np.random.default_rng(4).normal(0.0, 10.0, 200)  # large per-item noise shared by both
    b = a + 0.1
    out = paired_diff(a, b, groups=np.arange(200) // 4)
    assert out["n"] == 200 and out["diff"] == pytest.approx(np.mean(b - a))
    assert out["ci95"] == pytest.approx([0.1, 0.1])


# --- win rates ---------------------------------------------------------------------------------


def test_win_rate_counts_with_tie_tolerance():
    a = np.zeros(5)
    b = np.array([1.0, -1.0, 0.05, -0.05, 0.2])  # win, loss, tie, tie, win at tie_tol 0.1
    out = win_rate(a, b, tie_tol=0.1)
    assert (out["wins"], out["ties"], out["losses"], out["n"]) == (2, 2, 1, 5)
    assert out["win_rate"] == pytest.approx((2 + 2 / 2) / 5)
    assert win_rate(a, b)["ties"] == 0  # tie_tol=0: only exact equality ties


def test_all_ties_is_exactly_one_half():
    out = win_rate(np.ones(30), np.ones(30), groups=np.arange(30) // 3)
    assert out["win_rate"] == 0.5 and out["ci95"] == [0.5, 0.5] and out["sign_test_p"] == 1.0


def test_sign_test_drops_ties():
    # 9 wins, 1 loss: two-sided p = 2 · (C(10,0) + C(10,1)) / 2^10 = 22/1024 = 0.021484375
    a, b = np.zeros(15), np.array([1.0] * 9 + [-1.0] + [0.0] * 5)
    out = win_rate(a, b)
    assert out["sign_test_p"] == pytest.approx(0.021484375, rel=1e-12)
    assert out["win_rate"] == pytest.approx((9 + 5 / 2) / 15)
    assert out["wins"] + out["losses"] == 10
    assert win_rate(a[:10], b[:10])["sign_test_p"] == pytest.approx(0.021484375, rel=1e-12)


def test_outcome_win_rate_matches_score_win_rate_and_rejects_other_codes():
    rng = np.random.default_rng(5)
    a, b = rng.integers(0, 3, 100).astype(float), rng.integers(0, 3, 100).astype(float)
    outcomes = np.where(b > a, 1.0, np.where(b < a, 0.0, 0.5))
    assert outcome_win_rate(outcomes, seed=3) == win_rate(a, b, seed=3)
    with pytest.raises(ValueError):
        outcome_win_rate([1, 0, 2])


# --- Bradley–Terry -----------------------------------------------------------------------------


def simulate(true, m, rng):
    """m comparisons between random distinct pairs, i beating j with the Elo probability."""
    k = len(true)
    i = rng.integers(0, k, m)
    j = (i + rng.integers(1, k, m)) % k
    p = 1 / (1 + 10 ** (-(true[i] - true[j]) / 400))
    return np.stack([i, j, (rng.random(m) < p).astype(float)], 1)


def test_bradley_terry_recovers_simulated_ratings_and_cis_cover_them():
    true = np.array([-200.0, 0.0, 50.0, 150.0])  # mean 0, like the fit
    comparisons = simulate(true, 4000, np.random.default_rng(0))
    out = bradley_terry_ci(comparisons, 4, n_boot=200)
    ratings, ci = np.array(out["ratings"]), np.array(out["ci95"])
    assert ratings.mean() == pytest.approx(0.0, abs=1e-9)
    assert np.abs(ratings - true).max() < 30  # SE of each rating ≈ 10 Elo here
    assert list(np.argsort(ratings)) == [0, 1, 2, 3]
    assert np.all((ci[:, 0] <= true) & (true <= ci[:, 1]))
    assert np.all((ci[:, 0] <= ratings) & (ratings <= ci[:, 1]))


def test_bradley_terry_two_models_closed_form():
    # i wins 75%: MLE odds 3, so the gap is 400·log10(3) ≈ 190.85 split ±95.4 around 0
    r = bradley_terry([(0, 1, 1)] * 75 + [(0, 1, 0)] * 25, 2)
    assert r[0] - r[1] == pytest.approx(400 * np.log10(3), abs=0.5)
    assert r.sum() == pytest.approx(0.0, abs=1e-9)


def test_ties_count_as_half_wins():
    assert bradley_terry([(0, 1, 0.5)] * 100, 2) == pytest.approx([0.0, 0.0], abs=1e-6)
    rest = [(0, 2, 1), (1, 2, 1), (2, 0, 1), (0, 2, 1), (1, 2, 0)]
    tied = bradley_terry([(0, 1, 0.5)] * 2 + rest, 3)
    split = bradley_terry([(0, 1, 1), (0, 1, 0)] + rest, 3)
    assert tied == pytest.approx(split, abs=1e-6)


def test_a_model_that_never_wins_gets_a_finite_lowest_rating():
    r = bradley_terry([(0, 1, 1)] * 10 + [(1, 2, 1)] * 10, 3)
    assert np.all(np.isfinite(r)) and r[0] > r[1] > r[2]


def test_group_bootstrap_of_duplicated_comparisons_is_wider():
    base = simulate(np.array([-50.0, 50.0]), 100, np.random.default_rng(6))
    comparisons, groups = np.repeat(base, 5, axis=0), np.repeat(np.arange(100), 5)
    iid = np.array(bradley_terry_ci(comparisons, 2, n_boot=200)["ci95"])
    grouped = np.array(bradley_terry_ci(comparisons, 2, groups=groups, n_boot=200)["ci95"])
    assert np.all(np.diff(grouped, axis=1) > 1.8 * np.diff(iid, axis=1))  # √5 ≈ 2.2


# --- agreement ---------------------------------------------------------------------------------

WIKIPEDIA_FLEISS = [  # 10 items, 14 raters, 5 categories (Wikipedia, "Fleiss' kappa", worked example)
    [0, 0, 0, 0, 14], [0, 2, 6, 4, 2], [0, 0, 3, 5, 6], [0, 3, 9, 2, 0], [2, 2, 8, 1, 1],
    [7, 7, 0, 0, 0], [3, 2, 6, 3, 0], [2, 5, 3, 2, 2], [6, 5, 2, 1, 0], [0, 2, 2, 3, 7],
]


def test_fleiss_kappa_textbook_cases():
    assert fleiss_kappa([[3, 0], [0, 3], [3, 0]]) == 1.0  # perfect agreement
    assert fleiss_kappa(WIKIPEDIA_FLEISS) == pytest.approx(0.210, abs=5e-4)  # P̄=.378, Pe=.213
    # 2 raters, items (0,0) (0,1) (1,1) (1,1): P_i = 1,0,1,1 so P̄ = 3/4; p = (3/8, 5/8) so
    # Pe = 34/64; κ = (3/4 − 34/64) / (1 − 34/64) = 14/30 = 7/15
    assert fleiss_kappa([[2, 0], [1, 1], [0, 2], [0, 2]]) == pytest.approx(7 / 15)
    assert np.isnan(fleiss_kappa([[3, 0], [3, 0]]))  # one category only: undefined
    with pytest.raises(ValueError):
        fleiss_kappa([[2, 0], [1, 2]])


def test_krippendorff_alpha_nominal_hand_cases():
    assert krippendorff_alpha_nominal([[0, 1, 2, nan], [0, 1, 2, 1], [nan, 1, 2, 1]]) == 1.0
    # Same 4 items as the Fleiss case above: ratings 0,0 | 0,1 | 1,1 | 1,1, each m_u = 2.
    # Disagreeing ordered pairs: 2 (item 2), weighted 1/(m_u − 1) = 1, so D_o ∝ 2.
    # n = 8 values, n_0 = 3, n_1 = 5: expected disagreeing pairs (n² − Σ n_c²)/(n − 1) = 30/7.
    # alpha = 1 − 2 / (30/7) = 1 − 14/30 = 8/15
    assert krippendorff_alpha_nominal([[0, 0, 1, 1], [0, 1, 1, 1]]) == pytest.approx(8 / 15)
    # an item rated once pairs with nothing and must not change alpha
    assert krippendorff_alpha_nominal([[0, 0, 1, 1, 1], [0, 1, 1, 1, nan]]) == pytest.approx(8 / 15)
    assert np.isnan(krippendorff_alpha_nominal([[1, 1], [1, 1]]))


def test_krippendorff_alpha_reference_example():
    # Krippendorff (2011), "Computing Krippendorff's Alpha-Reliability", 4 observers × 12 units
    # with missing data: nominal alpha = 0.743
    ratings = [
        [1, 2, 3, 3, 2, 1, 4, 1, 2, nan, nan, nan],
        [1, 2, 3, 3, 2, 2, 4, 1, 2, 5, nan, 3],
        [nan, 3, 3, 3, 2, 3, 4, 2, 2, 5, 1, nan],
        [1, 2, 3, 3, 2, 4, 4, 1, 2, 5, 1, nan],
    ]
    assert krippendorff_alpha_nominal(ratings) == pytest.approx(0.743, abs=5e-4)
