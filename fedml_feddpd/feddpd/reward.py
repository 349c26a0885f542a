"""Diffusion-DPO's preferences: which generated samples a client's adapter should make more of.

The reward (the paper's discrepancy reward, with the sign its stated intent asks for):

    r_k(x, y) = (l_k(x, y) - l_g(x, y)) + lambda * 1[argmax p_k(x) != argmax p_g(x)]

is high for a sample that is hard for client k (high local loss), easy for the global model (low global
loss), and on which the two disagree. Preferred samples are those above their class's median reward,
rejected ones those at or below it (`median_pairs`). `quantile_pairs` is the older rule: the top and the
bottom `pair_quantile` of a score within a class.

Pure functions over arrays: no FedML, no diffusers.
"""
from __future__ import annotations

import numpy as np

from .selection import loss_gap

PAIRINGS = ("median", "quantile")


def dpo_reward(p_local: np.ndarray, p_global: np.ndarray, labels: np.ndarray, disagreement_weight: float) -> np.ndarray:
    """r = (l_k - l_g) + lambda * [argmax p_k != argmax p_g]; higher is preferred."""
    gap = loss_gap(p_local, p_global, labels)
    disagree = np.argmax(np.asarray(p_local), axis=1) != np.argmax(np.asarray(p_global), axis=1)
    return gap + float(disagreement_weight) * disagree


def _pair_up(chosen: list, rejected: list, rng: np.random.Generator, out: tuple) -> None:
    n = min(len(chosen), len(rejected))
    if n:
        out[0].append(rng.permutation(np.asarray(chosen, int))[:n])
        out[1].append(rng.permutation(np.asarray(rejected, int))[:n])


def _concat(out: tuple) -> tuple[np.ndarray, np.ndarray]:
    if not out[0]:
        return np.zeros(0, dtype=int), np.zeros(0, dtype=int)
    return np.concatenate(out[0]), np.concatenate(out[1])


def median_pairs(reward: np.ndarray, labels: np.ndarray, gate: np.ndarray, classes,
                 rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Within each class: chosen from the candidates above the class's median reward that pass the gate,
    rejected from those at or below it, paired at random. Returns equal-length index arrays."""
    reward, labels, gate = np.asarray(reward, float), np.asarray(labels, int), np.asarray(gate, bool)
    out = ([], [])
    for c in classes:
        idx = np.flatnonzero(labels == c)
        if len(idx) < 2:
            continue
        median = np.median(reward[idx])
        _pair_up(idx[(reward[idx] > median) & gate[idx]], idx[reward[idx] <= median], rng, out)
    return _concat(out)


def quantile_pairs(scores: np.ndarray, labels: np.ndarray, gate: np.ndarray, classes, pair_quantile: float,
                   rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Within a class: chosen from the top `pair_quantile` of the score among gated candidates, rejected from the
    bottom `pair_quantile` of all the class's candidates. Returns equal-length index arrays (chosen, rejected)."""
    if not 0.0 < pair_quantile <= 0.5:
        raise ValueError(f"feddpd.pair_quantile: expected a number in (0, 0.5], got {pair_quantile}")
    scores, labels, gate = np.asarray(scores, float), np.asarray(labels, int), np.asarray(gate, bool)
    out = ([], [])
    for c in classes:
        idx = np.flatnonzero(labels == c)
        k = int(np.floor(pair_quantile * len(idx)))
        if k == 0:
            continue
        order = idx[np.argsort(scores[idx], kind="stable")]
        _pair_up([i for i in order[::-1][:k] if gate[i]], order[:k], rng, out)
    return _concat(out)
