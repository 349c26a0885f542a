"""Splits and partitions as pure functions over label arrays (no FedML state, seeded RNGs only)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np


def imbalanced_class_sizes(n_max: int, num_classes: int, imbalance_factor: float) -> np.ndarray:
    """n_c = n_max * IF^(-c/(C-1)), floored, at least 1 per class (IF = 1 gives n_max everywhere)."""
    if imbalance_factor < 1:
        raise ValueError(f"imbalance_factor: expected >= 1, got {imbalance_factor}")
    c = np.arange(num_classes)
    exponent = c / max(num_classes - 1, 1)
    return np.maximum(1, np.floor(n_max * imbalance_factor ** (-exponent) + 1e-9)).astype(int)


@dataclass(frozen=True)
class Splits:
    """Disjoint index arrays into one labelled pool."""

    public: np.ndarray   # the server's generator data: balanced, belongs to no client, not tested on
    train: np.ndarray    # the clients' pool, globally imbalanced
    test: np.ndarray     # global test set, same imbalance profile as train
    validation: np.ndarray  # held out of the pool (same profile), for tuning; empty by default
    oracle: np.ndarray      # held out of the pool (same profile), real data for the Oracle baseline


def split_public_train_test(labels: np.ndarray, num_classes: int, public_fraction: float,
                            test_fraction: float, imbalance_factor: float, seed: int,
                            validation_fraction: float = 0.0, oracle_fraction: float = 0.0,
                            public_seed: Optional[int] = None, max_per_class: int = 0) -> Splits:
    """Balanced public split first, then train/test cut to the same long-tailed profile.

    Per class, `public_fraction` of its samples go to the server. The rest would give every class
    about the same size; class c then keeps n_c = n_max * IF^(-c/(C-1)) for training and the same
    profile, scaled by test_fraction, for testing. Samples cut by the imbalance are unused.
    `validation_fraction` (for tuning) and `oracle_fraction` (the Oracle baseline's real data) of each
    class's training share are held out; clients never hold them.

    `public_seed` draws the public split (and the `max_per_class` subsample of each class) on its own, so
    the server's data, and the generator cached for it, stay the same across run seeds; `seed` then
    draws the rest. `public_seed=None` draws everything from `seed`.
    """
    per_class, _ = class_subsample(labels, num_classes, seed if public_seed is None else public_seed, max_per_class)
    n_public = [int(round(public_fraction * len(idx))) for idx in per_class]
    public = [idx[:n] for idx, n in zip(per_class, n_public)]
    rest = [idx[n:] for idx, n in zip(per_class, n_public)]
    if public_seed is not None:
        rng = np.random.default_rng(seed)
        rest = [rng.permutation(idx) for idx in rest]
    return _long_tail_cut(public, rest, test_fraction, imbalance_factor, validation_fraction, oracle_fraction)


def class_subsample(labels: np.ndarray, num_classes: int, seed: int, max_per_class: int = 0):
    """Each class's indices in a seeded order, cut to `max_per_class` (0 = all): (kept, left out), per class.
    split_public_train_test draws the public split from the kept ones, in this order."""
    rng = np.random.default_rng(seed)
    order = [rng.permutation(np.flatnonzero(labels == c)) for c in range(num_classes)]
    cut = max_per_class or None
    return [idx[:cut] for idx in order], [idx[cut:] if cut else idx[:0] for idx in order]


def _long_tail_cut(public: list, rest: list, test_fraction: float, imbalance_factor: float,
                   validation_fraction: float, oracle_fraction: float) -> Splits:
    """Per class (each `rest` list already shuffled): test first, then the training pool, both cut to
    the long-tailed profile, then the validation and oracle hold-outs out of the training pool."""
    num_classes = len(rest)
    remaining = min(len(idx) for idx in rest)
    if remaining == 0:
        empty = [c for c, idx in enumerate(rest) if not len(idx)]
        raise ValueError(f"data_args.dataset: classes {empty} have no samples left after the public split; "
                         f"expected every one of the {num_classes} classes in the data")
    n_test_max = int(np.floor(test_fraction * remaining))
    train_sizes = imbalanced_class_sizes(remaining - n_test_max, num_classes, imbalance_factor)
    test_sizes = imbalanced_class_sizes(n_test_max, num_classes, imbalance_factor)
    train, test, val, oracle = [], [], [], []
    for idx, n_tr, n_te in zip(rest, train_sizes, test_sizes):
        n_val, n_orc = int(round(validation_fraction * n_tr)), int(round(oracle_fraction * n_tr))
        test.append(idx[:n_te])
        pool = idx[n_te:n_te + n_tr]
        val.append(pool[:n_val])
        oracle.append(pool[n_val:n_val + n_orc])
        train.append(pool[n_val + n_orc:])
    return Splits(*(np.sort(np.concatenate(p)).astype(int) if len(p) else np.zeros(0, int)
                    for p in (public, train, test, val, oracle)))


def split_by_writers(labels: np.ndarray, writers: np.ndarray, num_classes: int, public_fraction: float,
                     test_fraction: float, imbalance_factor: float, seed: int, validation_fraction: float = 0.0,
                     oracle_fraction: float = 0.0, public_seed: Optional[int] = None) -> Splits:
    """The split for FedML's natural (per-writer) partition: the server's public split is every sample of
    `public_fraction` of the writers (drawn by public_seed), cut to the same count per class; the other
    writers' samples are cut into test, training pool and hold-outs as in split_public_train_test."""
    ids = np.unique(writers)
    n_pub = int(round(public_fraction * len(ids)))
    if not 1 <= n_pub < len(ids):
        raise ValueError(f"data_args.public_fraction: {public_fraction} of {len(ids)} writers leaves "
                         f"{n_pub} for the server; expected at least 1 and fewer than all")
    prng = np.random.default_rng(seed if public_seed is None else public_seed)
    held = np.isin(writers, prng.choice(ids, n_pub, replace=False))
    rng = np.random.default_rng(seed)
    public_all = [prng.permutation(np.flatnonzero(held & (labels == c))) for c in range(num_classes)]
    n_balanced = min(len(idx) for idx in public_all)
    if n_balanced == 0:
        missing = [c for c, idx in enumerate(public_all) if not len(idx)]
        raise ValueError(f"data_args.public_fraction: the server's {n_pub} writers hold no sample of classes "
                         f"{missing}; expected a larger public_fraction")
    public = [idx[:n_balanced] for idx in public_all]
    rest = [rng.permutation(np.flatnonzero(~held & (labels == c))) for c in range(num_classes)]
    return _long_tail_cut(public, rest, test_fraction, imbalance_factor, validation_fraction, oracle_fraction)


def natural_partition(writers: np.ndarray, client_num: int, min_size: int, seed: int) -> dict[int, np.ndarray]:
    """FedML's natural partition: each client is one writer's training samples. `client_num` writers with at
    least `min_size` samples are drawn by `seed`; the others' samples go unused."""
    ids, counts = np.unique(writers, return_counts=True)
    eligible = ids[counts >= min_size]
    if client_num > len(eligible):
        raise ValueError(f"train_args.client_num_in_total: {len(eligible)} writers hold >= {min_size} training "
                         f"samples (data_args.min_client_size); expected at most {len(eligible)}, got {client_num}")
    chosen = np.sort(np.random.default_rng(seed).choice(eligible, client_num, replace=False))
    return {cid: np.flatnonzero(writers == w) for cid, w in enumerate(chosen)}


def dirichlet_partition(labels: np.ndarray, client_num: int, num_classes: int, alpha: float,
                        min_size: int, seed: int, max_draws: int = 20000) -> dict[int, np.ndarray]:
    """FedML's Dirichlet(alpha) label partition ('hetero'), seeded, redrawn until every client has
    at least `min_size` samples.

    FedML's non_iid_partition_with_dirichlet_distribution (core/data/noniid_partition.py:6, its loop :42-84) redraws
    until every client has 10 samples, with no limit: an improbable size (30 clients on digits IF 10) hung
    for good. Its loop is repeated here with FedML's own per-class draw
    (partition_class_samples_with_dirichlet_distribution) and a limit, drawing numbers in the same order,
    so a partition FedML finds is the one found here."""
    from fedml.core.data.noniid_partition import partition_class_samples_with_dirichlet_distribution as draw_class

    need = max(min_size, 10)
    if client_num * need > len(labels):
        raise ValueError(f"train_args.client_num_in_total: {client_num} clients x {need} samples each "
                         f"exceeds the {len(labels)} training samples; use fewer clients or more data")
    # FedML draws from numpy's global RNG; seed it for this call and restore it afterwards.
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        for _ in range(max_draws):
            idx_batch, smallest = [[] for _ in range(client_num)], 0
            for k in range(num_classes):
                idx_batch, smallest = draw_class(len(labels), alpha, client_num, idx_batch,
                                                 np.where(labels == k)[0])
            if smallest < 10:  # FedML's own minimum: it redraws without shuffling
                continue
            for batch in idx_batch:
                np.random.shuffle(batch)
            if smallest >= min_size:
                return {cid: np.sort(np.asarray(p, dtype=int)) for cid, p in enumerate(idx_batch)}
    finally:
        np.random.set_state(state)
    smaller = ", or a min_client_size nearer FedML's 10" if need > 10 else ""
    raise ValueError(f"data_args.min_client_size: no Dirichlet({alpha}) partition of {len(labels)} samples over "
                     f"{client_num} clients in {max_draws} draws gave every client >= {need} samples; expected "
                     f"fewer clients or a larger partition_alpha{smaller}")


def homogeneous_partition(n: int, client_num: int, seed: int) -> dict[int, np.ndarray]:
    """IID split ('homo'): a seeded shuffle cut into near-equal parts."""
    order = np.random.default_rng(seed).permutation(n)
    return {cid: np.sort(part) for cid, part in enumerate(np.array_split(order, client_num))}


def label_histograms(labels: np.ndarray, parts: dict[int, np.ndarray], num_classes: int) -> np.ndarray:
    """Per-client class counts, shape (clients, classes). For reporting, never for the server step."""
    return np.stack([np.bincount(labels[parts[cid]], minlength=num_classes) for cid in sorted(parts)])
