"""Which candidates a client lacks: scores from the class probabilities of the global and the client's model.

Pure functions over (N, C) probability arrays: no FedML, no diffusers.

* `loss_gap` (the paper's rule): l_k(x, y) - l_g(x, y), the client's cross-entropy minus the global model's.
  Positive where the client's model does worse than the global one on a sample of class y: client k lacks it.
* `discrepancy` (the older rule): how much more the global model believes the class than the client,
  as a probability gap, a log-probability gap or a KL divergence.
* `quality_gate`: keep candidates that a model (the global one, or the server's classifier trained on its
  balanced public split) recognises as their class, p(y|x) >= tau; the paper's tau is 1/C.
"""
from __future__ import annotations

import numpy as np

DISCREPANCIES = ("prob_gap", "ce_gap", "kl")
SELECTIONS = ("loss_gap", "discrepancy", "random")
GATES = ("public", "global")
_EPS = 1e-12


def _check(p_a: np.ndarray, p_b: np.ndarray, labels: np.ndarray, what: str) -> tuple:
    p_a, p_b, labels = np.asarray(p_a, float), np.asarray(p_b, float), np.asarray(labels, int)
    if p_a.shape != p_b.shape or p_a.ndim != 2 or len(labels) != len(p_a):
        raise ValueError(f"{what}: expected (N, C) probabilities of equal shape and N labels, got "
                         f"{p_a.shape}, {p_b.shape}, {labels.shape}")
    return p_a, p_b, labels


def cross_entropy(p: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """-log p(y|x) per row."""
    p = np.asarray(p, float)
    return -np.log(p[np.arange(len(p)), np.asarray(labels, int)] + _EPS)


def loss_gap(p_local: np.ndarray, p_global: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """l_k - l_g per candidate: > 0 where the client's model is worse on it than the global model."""
    p_local, p_global, labels = _check(p_local, p_global, labels, "loss_gap")
    return cross_entropy(p_local, labels) - cross_entropy(p_global, labels)


def discrepancy(p_global: np.ndarray, p_local: np.ndarray, labels: np.ndarray, kind: str = "prob_gap") -> np.ndarray:
    """d_k(x) per candidate (x, c), from (N, C) probabilities of the global and the local model.

    prob_gap: p_g(c|x) - p_l(c|x); ce_gap: log p_g(c|x) - log p_l(c|x); kl: KL(p_g(.|x) || p_l(.|x)).
    """
    p_global, p_local, labels = _check(p_global, p_local, labels, "discrepancy")
    rows = np.arange(len(labels))
    if kind == "prob_gap":
        return p_global[rows, labels] - p_local[rows, labels]
    if kind == "ce_gap":
        return np.log(p_global[rows, labels] + _EPS) - np.log(p_local[rows, labels] + _EPS)
    if kind == "kl":
        return np.sum(p_global * (np.log(p_global + _EPS) - np.log(p_local + _EPS)), axis=1)
    raise ValueError(f"feddpd.discrepancy: expected one of {', '.join(DISCREPANCIES)}, got {kind!r}")


def quality_gate(p_gate: np.ndarray, labels: np.ndarray, tau: float) -> np.ndarray:
    """Keep candidates the gate's model recognises as their conditioning class: p(c|x) >= tau."""
    if not 0.0 <= tau <= 1.0:
        raise ValueError(f"feddpd.tau: expected a number in [0, 1], got {tau}")
    p_gate = np.asarray(p_gate, float)
    return p_gate[np.arange(len(labels)), np.asarray(labels, int)] >= tau


def resolve_tau(tau, num_classes: int) -> float:
    """feddpd.tau: a number, or "auto" for the paper's 1/C."""
    return 1.0 / num_classes if tau == "auto" else float(tau)
