"""The arithmetic behind `compare`'s tables: pure functions of plain numbers (numpy and scipy only).

Conventions, everywhere in this module:

- `None` in an input list means "no value" (a seed that has no such number) and is dropped.
- Undefined outputs are `None`, never nan, so results.json stays valid JSON: a standard deviation
  or confidence interval needs n >= 2 values, a mean n >= 1.
- Standard deviations are sample ones (ddof 1); 95% confidence intervals are Student t intervals,
  mean ± t_{0.975, n-1} · s / sqrt(n).
"""
from __future__ import annotations

import math
import warnings
from typing import Optional, Sequence

import numpy as np
from scipy import stats as _st

# below this, a standard deviation of accuracies (fractions in [0, 1]) is float noise: treat it as 0
_ZERO_STD = 1e-12


def _clean(values: Sequence[Optional[float]]) -> np.ndarray:
    """The values as a float array, None and nan dropped."""
    return np.array([float(v) for v in values if v is not None and not math.isnan(float(v))], dtype=float)


def t_crit(n: int) -> Optional[float]:
    """t_{0.975, n-1}: the two-sided 95% Student t quantile for a mean of n values; None for n < 2."""
    return float(_st.t.ppf(0.975, n - 1)) if n >= 2 else None


def summary(values: Sequence[Optional[float]]) -> dict:
    """n, mean, sample std (ddof 1) and the 95% t confidence interval of the mean.

    Returns dict(n, mean, std, half_width, ci95_low, ci95_high). n = 0: every other field None;
    n = 1: the mean only (std, half_width and the interval None: one value has no spread)."""
    x = _clean(values)
    n = len(x)
    out = {"n": n, "mean": None, "std": None, "half_width": None, "ci95_low": None, "ci95_high": None}
    if n == 0:
        return out
    out["mean"] = float(x.mean())
    if n >= 2:
        std = float(x.std(ddof=1))
        half = t_crit(n) * std / math.sqrt(n)
        out.update(std=std, half_width=half, ci95_low=out["mean"] - half, ci95_high=out["mean"] + half)
    return out


def paired(a: Sequence[Optional[float]], b: Sequence[Optional[float]]) -> dict:
    """Paired comparison of a and b (same length, one entry per seed): differences d = a - b over the
    pairs where both have a value.

    Returns dict(n, diffs, mean_diff, std, half_width, ci95_low, ci95_high, t_stat, t_p, wilcoxon_p,
    distinguishable):
    - mean_diff and its 95% t interval, as `summary(d)`;
    - t_stat, t_p: the paired t-test (scipy.stats.ttest_rel, two-sided);
    - wilcoxon_p: the Wilcoxon signed-rank test (scipy.stats.wilcoxon, two-sided, zero differences
      dropped; exact for small n). With n pairs its smallest possible p is `wilcoxon_min_p(n)`.
    - distinguishable: True when the 95% interval excludes 0; False when it contains 0 or is undefined.
    Edge cases, never an exception: every difference 0 -> t_p = wilcoxon_p = 1.0 (t_stat None);
    differences all equal but not 0 -> t_stat, t_p None (t would be infinite) and a zero-width
    interval, so distinguishable; n < 2 -> t and interval None; a p scipy cannot compute -> None."""
    if len(a) != len(b):
        raise ValueError(f"paired: a has {len(a)} values and b {len(b)}; expected one per seed in both")
    pairs = [(float(x), float(y)) for x, y in zip(a, b) if x is not None and y is not None
             and not math.isnan(float(x)) and not math.isnan(float(y))]
    d = np.array([x - y for x, y in pairs], dtype=float)
    s = summary(d.tolist())
    out = {"n": s["n"], "diffs": d.tolist(), "mean_diff": s["mean"], "std": s["std"], "half_width": s["half_width"],
           "ci95_low": s["ci95_low"], "ci95_high": s["ci95_high"], "t_stat": None, "t_p": None,
           "wilcoxon_p": None, "distinguishable": False}
    if len(d) == 0:
        return out
    if np.all(d == 0):
        out.update(t_p=1.0, wilcoxon_p=1.0)
        return out
    if s["std"] is not None and s["std"] < _ZERO_STD:  # a constant shift: zero-width interval
        out.update(std=0.0, half_width=0.0, ci95_low=s["mean"], ci95_high=s["mean"])
    elif len(d) >= 2:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = _st.ttest_rel([x for x, _ in pairs], [y for _, y in pairs])
        out["t_stat"], out["t_p"] = _finite(res.statistic), _finite(res.pvalue)
    out["wilcoxon_p"] = wilcoxon_p(d)
    out["distinguishable"] = out["ci95_low"] is not None and (out["ci95_low"] > 0 or out["ci95_high"] < 0)
    return out


def wilcoxon_p(diffs: Sequence[float]) -> Optional[float]:
    """Two-sided Wilcoxon signed-rank p of paired differences (zeros dropped): 1.0 when every
    difference is 0 (or there are none), None when scipy cannot compute it."""
    d = _clean(diffs)
    if not np.any(d != 0):
        return 1.0
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return _finite(_st.wilcoxon(d).pvalue)
    except (ValueError, ZeroDivisionError):
        return None


def wilcoxon_min_p(n: int) -> float:
    """The smallest two-sided p the exact Wilcoxon signed-rank test can give with n nonzero
    differences, all of one sign: 2 / 2^n (capped at 1). n = 5 -> 0.0625: never below 0.05."""
    return min(1.0, 2.0 / 2 ** n)


def _finite(x) -> Optional[float]:
    x = float(x)
    return x if math.isfinite(x) else None


def last_k_mean(records: Sequence[dict], key: str = "top1", k: int = 10) -> Optional[float]:
    """Mean of `key` over the last k round records that carry it (test metrics: the evaluated rounds, which with
    eval_every > 1 span more than k rounds; validation metrics: every round; a run with fewer such records uses all
    it has). nan values among them are skipped; None when nothing is left."""
    carrying = [r for r in records if r.get(key) is not None]
    x = _clean([r[key] for r in carrying[-k:]])
    return float(x.mean()) if len(x) else None


def global_class_counts(data: dict) -> tuple[Optional[list[int]], Optional[str]]:
    """Global class counts of a run and where they come from, from metrics.json's `data` section:
    the clients' training label histograms summed over clients ("train") when the run recorded them,
    else the test set's class counts ("test"), which follow the same long-tail profile (the test split
    is drawn with the same imbalance factor). (None, None) when neither is there."""
    hists = (data or {}).get("client_label_histograms")
    if hists:
        return np.asarray(hists, dtype=float).sum(0).astype(int).tolist(), "train"
    counts = (data or {}).get("test_class_counts")
    if counts:
        return [int(c) for c in counts], "test"
    return None, None


def class_thirds(class_counts: Sequence[float]) -> list[list[int]]:
    """Head, medium and tail classes: the classes sorted by descending count (ties: lower class index
    first), cut into three contiguous parts with np.array_split, so when the number of classes is not a
    multiple of 3 the extra classes go to head first, then medium: 10 classes -> 4 / 3 / 3,
    11 -> 4 / 4 / 3. Fewer than 3 classes leave the last parts empty."""
    order = sorted(range(len(class_counts)), key=lambda c: (-class_counts[c], c))
    return [part.tolist() for part in np.array_split(np.array(order, dtype=int), 3)]


def group_accuracy(per_class: Sequence[Optional[float]], groups: Sequence[Sequence[int]]) -> list[Optional[float]]:
    """Per group of classes, the mean of its classes' accuracies (unweighted: every class counts the
    same), skipping classes whose accuracy is None (absent from the test set); None for a group with
    no accuracy left."""
    out = []
    for group in groups:
        x = _clean([per_class[c] for c in group if c < len(per_class)])
        out.append(float(x.mean()) if len(x) else None)
    return out


def curve_band(curves: Sequence[Sequence[Optional[float]]]) -> dict:
    """Per round, the mean over seeds and its 95% t interval: curves is one list per seed (None for a
    round that was not evaluated; shorter lists are padded with None). Returns dict(mean, ci95_low,
    ci95_high), lists over rounds; None where a round has no value (mean) or fewer than 2 (interval)."""
    rounds = max((len(c) for c in curves), default=0)
    out = {"mean": [], "ci95_low": [], "ci95_high": []}
    for i in range(rounds):
        s = summary([c[i] if i < len(c) else None for c in curves])
        out["mean"].append(s["mean"])
        out["ci95_low"].append(s["ci95_low"])
        out["ci95_high"].append(s["ci95_high"])
    return out


def ci_from_population_std(mean: Optional[float], pop_std: Optional[float], n: int) -> tuple[Optional[float], Optional[float]]:
    """The 95% t interval of a mean from a population (ddof 0) std of n values, as old results.json
    files stored it: s = pop_std · sqrt(n / (n - 1)), half width t_{0.975, n-1} · s / sqrt(n).
    (None, None) for n < 2 or a missing input."""
    if mean is None or pop_std is None or n < 2 or math.isnan(mean) or math.isnan(pop_std):
        return None, None
    half = t_crit(n) * pop_std * math.sqrt(n / (n - 1)) / math.sqrt(n)
    return mean - half, mean + half
