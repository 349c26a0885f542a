"""A client's budget, its split over classes by score mass, and the top candidates of each class."""
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
    """Split a client's budget over classes in proportion to the positive score mass (loss gap or discrepancy)
    of each class among gated candidates. A class where nothing passes the gate, or where the client is not
    lacking (no positive score), gets nothing."""
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


def take_per_class(labels: np.ndarray, class_counts: np.ndarray) -> np.ndarray:
    """Indices of the first `class_counts[c]` samples of each class c, in their order in `labels` (fewer where a
    class has fewer): a smaller supplement cut from a larger one with the same class proportions."""
    labels = np.asarray(labels, int)
    picked = [np.flatnonzero(labels == c)[:int(n)] for c, n in enumerate(class_counts) if n > 0]
    return np.sort(np.concatenate(picked)) if picked else np.zeros(0, dtype=int)
