"""Statistics for comparing models: bootstrap intervals, paired win rates, Bradley–Terry ratings
and inter-annotator agreement. Pure numpy/scipy functions of arrays that return plain floats and
dicts (JSON-ready), shared by the evaluation report and the human-evaluation app.

Bootstrap intervals are percentile intervals. When `groups` is given (one id per value, e.g. the
prompt id), whole groups are resampled: images of one prompt are correlated, so resampling them
one by one would understate the uncertainty.
"""

from __future__ import annotations

import numpy as np
from scipy import optimize, special, stats

ELO = 400 / np.log(10)  # natural-log strength -> Elo points: P(i beats j) = 1/(1 + 10^(-ΔR/400))


def _resamples(n: int, groups, n_boot: int, rng: np.random.Generator):
    """Yield `n_boot` index arrays into n items: items drawn with replacement, or whole groups
    drawn with replacement when `groups` (one id per item) is given."""
    if groups is None:
        for _ in range(n_boot):
            yield rng.integers(0, n, n)
        return
    groups = np.asarray(groups)
    if len(groups) != n:
        raise ValueError(f"{len(groups)} group ids for {n} values")
    _, inverse = np.unique(groups, return_inverse=True)
    order = np.argsort(inverse, kind="stable")
    members = np.split(order, np.cumsum(np.bincount(inverse))[:-1])  # item indices per group
    for _ in range(n_boot):
        picks = rng.integers(0, len(members), len(members))
        yield np.concatenate([members[g] for g in picks])


def _interval(samples, level: float) -> np.ndarray:
    """Percentile interval of bootstrap samples along axis 0: [lo, hi] (per column if 2-D)."""
    return np.quantile(np.asarray(samples), [(1 - level) / 2, (1 + level) / 2], axis=0)


def bootstrap_ci(values, groups=None, stat=np.mean, n_boot=2000, level=0.95, seed=0):
    """Percentile bootstrap interval (lo, hi) of `stat(values)`, resampling values, or whole
    groups when `groups` is given (cluster bootstrap over prompts)."""
    values = np.asarray(values, dtype=np.float64)
    if len(values) == 0:
        raise ValueError("bootstrap_ci needs at least one value")
    rng = np.random.default_rng(seed)
    boots = [stat(values[idx]) for idx in _resamples(len(values), groups, n_boot, rng)]
    lo, hi = _interval(boots, level)
    return float(lo), float(hi)


def mean_ci(values, groups=None, **kw) -> dict:
    """Mean with its bootstrap interval: {"mean", "ci95": [lo, hi], "n"}; `kw` go to
    `bootstrap_ci` (the key stays "ci95" whatever `level`)."""
    values = np.asarray(values, dtype=np.float64)
    lo, hi = bootstrap_ci(values, groups, **kw)
    return {"mean": float(values.mean()), "ci95": [lo, hi], "n": len(values)}


def paired_diff(a, b, groups=None, **kw) -> dict:
    """Mean paired difference b − a (e.g. per-image correctness of model B minus model A on the
    same prompt and seed) with its bootstrap interval: {"diff", "ci95", "n"}."""
    d = np.asarray(b, dtype=np.float64) - np.asarray(a, dtype=np.float64)
    out = mean_ci(d, groups, **kw)
    return {"diff": out["mean"], "ci95": out["ci95"], "n": out["n"]}


def group_diversity(features, k: int) -> np.ndarray:
    """Per-prompt diversity: the mean pairwise 1 − cos between the k images of each prompt. `features`
    (P·k, D) are unit vectors, a prompt's k images consecutive; returns (P,). 0 when every image of
    a prompt is the same (mode collapse)."""
    f = np.asarray(features, dtype=np.float64)
    if k < 2 or len(f) % k:
        raise ValueError(f"group_diversity needs k ≥ 2 images per prompt and a multiple of k rows, got {len(f)} rows, k={k}")
    f = f.reshape(-1, k, f.shape[-1])
    cos = f @ f.transpose(0, 2, 1)  # (P, k, k)
    off = ~np.eye(k, dtype=bool)
    return np.clip(1 - cos[:, off], 0.0, 2.0).mean(1)  # float32 unit vectors can give cos a hair above 1


def outcome_win_rate(outcomes, groups=None, **kw) -> dict:
    """Win rate of B over A from outcomes coded 1 (B wins), 0.5 (tie), 0 (A wins), e.g. human
    votes. win_rate = (W + T/2) / N with a bootstrap interval; sign_test_p is the two-sided
    binomial test of W against L with ties dropped (1.0 when there are none)."""
    outcomes = np.asarray(outcomes, dtype=np.float64)
    if not np.isin(outcomes, [0.0, 0.5, 1.0]).all():
        raise ValueError("outcomes must be 1 (B wins), 0.5 (tie) or 0 (A wins)")
    wins, ties = int((outcomes == 1).sum()), int((outcomes == 0.5).sum())
    losses = len(outcomes) - wins - ties
    rate = mean_ci(outcomes, groups, **kw)
    p = stats.binomtest(wins, wins + losses, 0.5).pvalue if wins + losses else 1.0
    return {"wins": wins, "ties": ties, "losses": losses, "n": len(outcomes),
            "win_rate": rate["mean"], "ci95": rate["ci95"], "sign_test_p": float(p)}


def win_rate(a, b, groups=None, tie_tol=0.0, **kw) -> dict:
    """Win rate of model B over model A on paired scores: B wins an item when b > a + tie_tol,
    ties when |b − a| <= tie_tol. Same keys as `outcome_win_rate`."""
    d = np.asarray(b, dtype=np.float64) - np.asarray(a, dtype=np.float64)
    outcomes = np.where(d > tie_tol, 1.0, np.where(d < -tie_tol, 0.0, 0.5))
    return outcome_win_rate(outcomes, groups, **kw)


def _points(comparisons: np.ndarray, n_models: int) -> np.ndarray:
    """(n_models, n_models) matrix W with W[i, j] = points i scored against j (a tie is half)."""
    i, j, y = comparisons[:, 0].astype(int), comparisons[:, 1].astype(int), comparisons[:, 2]
    W = np.zeros((n_models, n_models))
    np.add.at(W, (i, j), y)
    np.add.at(W, (j, i), 1 - y)
    return W


def _fit_points(W: np.ndarray, iters: int, l2: float) -> np.ndarray:
    """Elo ratings maximising Σ_ij W_ij log σ(θ_i − θ_j) − l2/2 ‖θ‖², mean 0."""

    def loss(theta):
        D = theta[:, None] - theta[None, :]  # (n, n): θ_i − θ_j
        G = W * special.expit(-D)  # W_ij σ(θ_j − θ_i), the gradient of each log σ term
        nll = (W * np.logaddexp(0, -D)).sum() + l2 / 2 * theta @ theta
        return nll, -(G.sum(1) - G.sum(0)) + l2 * theta

    theta0 = np.zeros(len(W))
    res = optimize.minimize(loss, theta0, jac=True, method="L-BFGS-B",
                            options={"maxiter": iters, "gtol": 1e-9, "ftol": 1e-15})
    theta = res.x - res.x.mean()  # the penalty already centres θ at the optimum; exact zero here
    return ELO * theta


def bradley_terry(comparisons, n_models: int, iters: int = 500, l2: float = 1e-3) -> np.ndarray:
    """Maximum-likelihood Bradley–Terry ratings of `n_models` models from (i, j, outcome) rows,
    outcome 1 if i beat j, 0 if j beat i, 0.5 for a tie (scored as half a win each).

    Scale: Elo-like, rating = 400·log10(strength) with mean 0, so P(i beats j) =
    1 / (1 + 10^(−(R_i − R_j)/400)); 100 points ≈ 64% wins. The weak L2 prior `l2` on the
    natural-log strengths keeps ratings finite when a model never wins or never loses.
    """
    comparisons = np.asarray(comparisons, dtype=np.float64).reshape(-1, 3)
    return _fit_points(_points(comparisons, n_models), iters, l2)


def bradley_terry_ci(comparisons, n_models: int, groups=None, n_boot: int = 500,
                     level: float = 0.95, seed: int = 0, **kw) -> dict:
    """Bradley–Terry ratings with percentile bootstrap intervals over comparisons (or over whole
    groups of them): {"ratings": [...], "ci95": [[lo, hi], ...]}; `kw` go to `bradley_terry`."""
    comparisons = np.asarray(comparisons, dtype=np.float64).reshape(-1, 3)
    rng = np.random.default_rng(seed)
    boots = [bradley_terry(comparisons[idx], n_models, **kw)
             for idx in _resamples(len(comparisons), groups, n_boot, rng)]
    lo, hi = _interval(boots, level)
    ratings = bradley_terry(comparisons, n_models, **kw)
    return {"ratings": ratings.tolist(), "ci95": np.stack([lo, hi], 1).tolist()}


def fleiss_kappa(table) -> float:
    """Fleiss' kappa from `table[i, k]` = raters putting item i in category k, the same number
    of raters per item. 1 is perfect agreement, 0 chance level; nan when every rating falls in
    one category (chance agreement is then 1 and kappa undefined)."""
    table = np.asarray(table, dtype=np.float64)
    n = table.sum(1)
    if not np.all(n == n[0]) or n[0] < 2:
        raise ValueError("fleiss_kappa needs the same number (>= 2) of raters per item")
    n = n[0]
    p_item = ((table**2).sum(1) - n) / (n * (n - 1))  # agreeing rater pairs per item
    p_cat = table.sum(0) / table.sum()
    p_bar, p_e = p_item.mean(), (p_cat**2).sum()
    return float((p_bar - p_e) / (1 - p_e)) if p_e < 1 else float("nan")


def krippendorff_alpha_nominal(ratings) -> float:
    """Krippendorff's alpha, nominal distance, from an (n_raters, n_items) array with np.nan for
    missing ratings. alpha = 1 − D_o / D_e from the coincidence matrix (Krippendorff 2011);
    items with fewer than two ratings are dropped. nan when only one value is ever used."""
    ratings = np.asarray(ratings, dtype=np.float64)
    values = np.unique(ratings[~np.isnan(ratings)])
    counts = (ratings[:, :, None] == values).sum(0)  # (items, values): n_uc
    m = counts.sum(1)
    counts, m = counts[m >= 2], m[m >= 2]
    n_c = counts.sum(0)
    n = n_c.sum()
    # ordered pairs of ratings within an item that disagree, each item weighted 1 / (m_u − 1)
    observed = ((m**2 - (counts**2).sum(1)) / (m - 1)).sum()
    expected = (n**2 - (n_c**2).sum()) / (n - 1)  # the same count for pairs drawn from all values
    return float(1 - observed / expected) if expected > 0 else float("nan")


# ---------------------------------------------------------------------------------------------
# The paper's studies (arXiv 2403.03206, section 5): ranking by non-dominated sorting, scaling fits
# ---------------------------------------------------------------------------------------------


def pareto_ranks(points, maximize) -> np.ndarray:
    """Non-dominated sorting: rank 1 for the points no other point dominates, rank 2 once those are
    removed, and so on. `points` (n, m); `maximize[j]` says whether metric j is better larger.
    A dominates B when it is at least as good on every metric and better on one."""
    p = np.asarray(points, dtype=np.float64) * np.where(maximize, 1.0, -1.0)  # every metric: larger is better
    ge = (p[:, None, :] >= p[None, :, :]).all(-1)
    gt = (p[:, None, :] > p[None, :, :]).any(-1)
    dominates = ge & gt  # [i, j]: i dominates j
    ranks, left, front = np.zeros(len(p), dtype=int), np.ones(len(p), dtype=bool), 1
    while left.any():
        top = left & ~dominates[left].any(0)  # not dominated by any point still left
        ranks[top] = front
        left &= ~top
        front += 1
    return ranks


def mean_pareto_rank(score, fd) -> np.ndarray:
    """The paper's ranking of variants: per setting (sampling steps, CFG scale) rank them by
    non-dominated sorting over (score ↑, FD ↓), then average each variant's rank over the settings.
    score, fd: (variants, settings) → (variants,)."""
    score, fd = np.asarray(score, dtype=np.float64), np.asarray(fd, dtype=np.float64)
    ranks = [pareto_ranks(np.stack([score[:, s], fd[:, s]], 1), [True, False]) for s in range(score.shape[1])]
    return np.mean(ranks, axis=0)


def mean_rank_ci(score, fd, n_boot: int = 1000, level: float = 0.95, seed: int = 0) -> dict:
    """`mean_pareto_rank` of the seed means, with bootstrap intervals that resample each variant's
    seeds. score, fd: (variants, seeds, settings) → {"mean_rank": [...], "ci95": [[lo, hi], ...]}."""
    score, fd = np.asarray(score, dtype=np.float64), np.asarray(fd, dtype=np.float64)
    rng = np.random.default_rng(seed)
    n_var, n_seed = score.shape[:2]
    boots = []
    for _ in range(n_boot):
        idx = rng.integers(0, n_seed, (n_var, n_seed))  # seeds drawn per variant
        pick = lambda a: np.take_along_axis(a, idx[:, :, None], 1).mean(1)  # noqa: E731
        boots.append(mean_pareto_rank(pick(score), pick(fd)))
    lo, hi = _interval(boots, level)
    return {"mean_rank": mean_pareto_rank(score.mean(1), fd.mean(1)).tolist(), "ci95": np.stack([lo, hi], 1).tolist()}


def power_law_fit(x, y, n_boot: int = 2000, level: float = 0.95, seed: int = 0) -> dict:
    """y = c·x^b by least squares on log y against log x: {"c", "exponent": b, "r2"} (R² of the
    log-log fit), e.g. validation loss against training FLOPs, and "exponent_ci95", a percentile
    bootstrap interval of b over the (x, y) points (resamples with a single x value are skipped)."""
    lx, ly = np.log(np.asarray(x, dtype=np.float64)), np.log(np.asarray(y, dtype=np.float64))
    b, log_c = np.polyfit(lx, ly, 1)
    residual = ly - (log_c + b * lx)
    r2 = 1 - (residual ** 2).sum() / ((ly - ly.mean()) ** 2).sum()
    rng = np.random.default_rng(seed)
    boots = [np.polyfit(lx[idx], ly[idx], 1)[0] for idx in _resamples(len(lx), None, n_boot, rng)
             if np.ptp(lx[idx]) > 0]
    lo, hi = _interval(boots, level)
    return {"c": float(np.exp(log_c)), "exponent": float(b), "r2": float(r2), "exponent_ci95": [float(lo), float(hi)]}


def pearson_ci(x, y, n_boot: int = 2000, level: float = 0.95, seed: int = 0) -> dict:
    """Pearson's r with a percentile bootstrap interval over the (x, y) pairs: {"r", "ci95", "n"}."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    r = lambda idx: np.corrcoef(x[idx], y[idx])[0, 1]  # noqa: E731
    rng = np.random.default_rng(seed)
    with np.errstate(invalid="ignore", divide="ignore"):
        boots = [r(idx) for idx in _resamples(len(x), None, n_boot, rng)]
    boots = [b for b in boots if np.isfinite(b)]  # a resample of one repeated pair has no r
    lo, hi = _interval(boots, level) if boots else (np.nan, np.nan)  # constant x or y: r undefined
    return {"r": float(r(np.arange(len(x)))), "ci95": [float(lo), float(hi)], "n": len(x)}
