"""How much more the global model believes a candidate's class than a client's local model does.

Pure functions over class-probability arrays: no FedML, no diffusers.
"""
from __future__ import annotations

import numpy as np

DISCREPANCIES = ("prob_gap", "ce_gap", "kl")
_EPS = 1e-12


def discrepancy(p_global: np.ndarray, p_local: np.ndarray, labels: np.ndarray, kind: str = "prob_gap") -> np.ndarray:
    """d_k(x) per candidate (x, c), from (N, C) probabilities of the global and the local model.

    prob_gap: p_g(c|x) - p_l(c|x); ce_gap: log p_g(c|x) - log p_l(c|x); kl: KL(p_g(.|x) || p_l(.|x)).
    """
    p_global, p_local = np.asarray(p_global, float), np.asarray(p_local, float)
    labels = np.asarray(labels, int)
    if p_global.shape != p_local.shape or p_global.ndim != 2 or len(labels) != len(p_global):
        raise ValueError(f"discrepancy: expected (N, C) probabilities of equal shape and N labels, got "
                         f"{p_global.shape}, {p_local.shape}, {labels.shape}")
    rows = np.arange(len(labels))
    if kind == "prob_gap":
        return p_global[rows, labels] - p_local[rows, labels]
    if kind == "ce_gap":
        return np.log(p_global[rows, labels] + _EPS) - np.log(p_local[rows, labels] + _EPS)
    if kind == "kl":
        return np.sum(p_global * (np.log(p_global + _EPS) - np.log(p_local + _EPS)), axis=1)
    raise ValueError(f"feddpd.discrepancy: expected one of {', '.join(DISCREPANCIES)}, got {kind!r}")


def quality_gate(p_global: np.ndarray, labels: np.ndarray, tau: float) -> np.ndarray:
    """Keep candidates the global model recognises as their conditioning class: p_g(c|x) >= tau."""
    if not 0.0 <= tau <= 1.0:
        raise ValueError(f"feddpd.tau: expected a number in [0, 1], got {tau}")
    p_global = np.asarray(p_global, float)
    return p_global[np.arange(len(labels)), np.asarray(labels, int)] >= tau
