"""Turning discrepancy scores into a per-class budget, a selection and DPO preference pairs."""
from __future__ import annotations

import numpy as np


def client_budget(num_samples: int, supplement_ratio: float) -> int:
    """B_k = round(supplement_ratio * |D_k|); |D_k| is the sample count FedAvg already receives."""
    if supplement_ratio < 0:
        raise ValueError(f"feddpd.supplement_ratio: expected a number >= 0, got {supplement_ratio}")
    return int(round(supplement_ratio * num_samples))


def largest_remainder(weights: np.ndarray, total: int) -> np.ndarray:
    """Integers proportional to `weights` that sum exactly to `total` (Hamilton's method)."""
    weights = np.asarray(weights, float)
    if total <= 0 or weights.sum() <= 0:
        return np.zeros(len(weights), dtype=int)
    exact = weights / weights.sum() * total
    counts = np.floor(exact).astype(int)
    short = total - counts.sum()
    order = np.argsort(-(exact - counts), kind="stable")
    counts[order[:short]] += 1
    return counts


def allocate_classes(scores: np.ndarray, labels: np.ndarray, gate: np.ndarray, budget: int,
                     num_classes: int) -> np.ndarray:
    """Split a client's budget over classes in proportion to the positive discrepancy mass of each
    class among gated candidates. A class the global model does not recognise (nothing passes the
    gate) or where the client is not lacking (no positive discrepancy) gets nothing."""
    positive = np.where(np.asarray(gate, bool), np.clip(np.asarray(scores, float), 0.0, None), 0.0)
    mass = np.bincount(np.asarray(labels, int), weights=positive, minlength=num_classes)
    return largest_remainder(mass, budget)


def select_top(scores: np.ndarray, labels: np.ndarray, gate: np.ndarray, class_counts: np.ndarray) -> np.ndarray:
    """Indices of the `class_counts[c]` highest-scoring gated candidates of each class c."""
    scores, labels, gate = np.asarray(scores, float), np.asarray(labels, int), np.asarray(gate, bool)
    chosen = []
    for c, count in enumerate(np.asarray(class_counts, int)):
        if count <= 0:
            continue
        idx = np.flatnonzero((labels == c) & gate)
        chosen.append(idx[np.argsort(-scores[idx], kind="stable")[:count]])
    return np.concatenate(chosen) if chosen else np.zeros(0, dtype=int)


def build_pairs(scores: np.ndarray, labels: np.ndarray, gate: np.ndarray, classes, pair_quantile: float,
                rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """DPO preference pairs within a class: chosen from the top `pair_quantile` of d_k among gated
    candidates (recognisable and lacking), rejected from the bottom `pair_quantile` of all the
    class's candidates. Returns equal-length index arrays (chosen, rejected)."""
    if not 0.0 < pair_quantile <= 0.5:
        raise ValueError(f"feddpd.pair_quantile: expected a number in (0, 0.5], got {pair_quantile}")
    scores, labels, gate = np.asarray(scores, float), np.asarray(labels, int), np.asarray(gate, bool)
    chosen, rejected = [], []
    for c in classes:
        idx = np.flatnonzero(labels == c)
        k = int(np.floor(pair_quantile * len(idx)))
        if k == 0:
            continue
        order = idx[np.argsort(scores[idx], kind="stable")]
        low = order[:k]
        high = [i for i in order[::-1][:k] if gate[i]]
        n = min(len(high), len(low))
        if n == 0:
            continue
        chosen.append(rng.permutation(np.asarray(high))[:n])
        rejected.append(rng.permutation(low)[:n])
    if not chosen:
        return np.zeros(0, dtype=int), np.zeros(0, dtype=int)
    return np.concatenate(chosen), np.concatenate(rejected)
