"""FedDPD's pure functions on hand-made inputs."""
import numpy as np
import pytest

from fedml_feddpd.algorithm import (allocate_classes, build_pairs, client_budget, discrepancy, largest_remainder,
                                    quality_gate, select_top)


def onehotish(labels, conf, num_classes=4):
    """Probabilities putting `conf[i]` on labels[i] and spreading the rest evenly."""
    labels, conf = np.asarray(labels), np.asarray(conf, float)
    p = np.tile(((1 - conf) / (num_classes - 1))[:, None], (1, num_classes))
    p[np.arange(len(labels)), labels] = conf
    return p


def test_discrepancy_kinds_on_known_values():
    labels = np.array([0, 1])
    pg = np.array([[0.9, 0.1], [0.5, 0.5]])
    pl = np.array([[0.3, 0.7], [0.5, 0.5]])
    assert discrepancy(pg, pl, labels, "prob_gap") == pytest.approx([0.6, 0.0])
    assert discrepancy(pg, pl, labels, "ce_gap") == pytest.approx([np.log(3.0), 0.0])
    kl0 = 0.9 * np.log(0.9 / 0.3) + 0.1 * np.log(0.1 / 0.7)
    assert discrepancy(pg, pl, labels, "kl") == pytest.approx([kl0, 0.0])
    with pytest.raises(ValueError, match="feddpd.discrepancy: expected one of prob_gap, ce_gap, kl"):
        discrepancy(pg, pl, labels, "l2")


def test_gate_keeps_only_recognised_candidates():
    pg = onehotish([0, 1, 2], [0.95, 0.4, 0.8])
    assert quality_gate(pg, [0, 1, 2], 0.5).tolist() == [True, False, True]
    assert quality_gate(pg, [0, 1, 2], 0.0).all()
    with pytest.raises(ValueError, match=r"feddpd.tau: expected a number in \[0, 1\]"):
        quality_gate(pg, [0, 1, 2], 1.5)


def test_budget_and_largest_remainder():
    assert client_budget(41, 0.5) == 20 and client_budget(0, 1.0) == 0
    assert largest_remainder(np.array([1, 1, 1]), 10).tolist() in ([4, 3, 3], [3, 4, 3], [3, 3, 4])
    assert largest_remainder(np.array([0.0, 0.0]), 5).tolist() == [0, 0]
    assert largest_remainder(np.array([3.0, 1.0]), 8).tolist() == [6, 2]
    with pytest.raises(ValueError, match="supplement_ratio"):
        client_budget(10, -0.1)


def test_client_lacking_class_3_gets_class_3_and_unknown_class_gets_nothing():
    # Pool: 5 candidates of each of classes 0..3. The global model knows classes 0, 1 and 3 well and
    # does not recognise class 2. The client's local model never saw class 3.
    labels = np.repeat(np.arange(4), 5)
    conf_global = np.where(labels == 2, 0.2, 0.9)
    conf_local = np.where(labels == 3, 0.05, 0.85)
    conf_local = np.where(labels == 2, 0.1, conf_local)
    pg, pl = onehotish(labels, conf_global), onehotish(labels, conf_local)
    d = discrepancy(pg, pl, labels)
    gate = quality_gate(pg, labels, 0.5)
    counts = allocate_classes(d, labels, gate, budget=12, num_classes=4)
    assert counts.sum() == 12
    assert counts[3] == counts.max() and counts[3] >= 9
    assert counts[2] == 0  # the global model does not know class 2: nothing, however lacking
    picked = select_top(d, labels, gate, counts)
    per_class = np.bincount(labels[picked], minlength=4)
    available = np.bincount(labels[gate], minlength=4)
    assert per_class.tolist() == np.minimum(counts, available).tolist()  # all 5 class-3 candidates
    assert per_class[3] == 5 and per_class[2] == 0


def test_allocation_follows_discrepancy_mass_without_assuming_balance():
    labels = np.array([0, 0, 1, 1])
    scores = np.array([0.3, 0.3, 0.1, 0.1])  # class 0 mass 0.6, class 1 mass 0.2
    counts = allocate_classes(scores, labels, np.ones(4, bool), budget=8, num_classes=2)
    assert counts.tolist() == [6, 2]
    assert allocate_classes(-scores, labels, np.ones(4, bool), 8, 2).tolist() == [0, 0]


def test_select_top_takes_highest_gated_per_class():
    labels = np.array([0, 0, 0, 1, 1])
    scores = np.array([0.1, 0.9, 0.5, 0.7, 0.2])
    gate = np.array([True, False, True, True, True])
    assert sorted(select_top(scores, labels, gate, np.array([1, 2])).tolist()) == [2, 3, 4]


def test_pairs_chosen_high_rejected_low_within_class():
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1], 10)
    scores = np.concatenate([np.linspace(0, 1, 10), np.linspace(-1, 0, 10)])
    gate = np.ones(20, bool)
    chosen, rejected = build_pairs(scores, labels, gate, classes=[0], pair_quantile=0.3, rng=rng)
    assert len(chosen) == len(rejected) == 3
    assert (labels[chosen] == 0).all() and (labels[rejected] == 0).all()
    assert scores[chosen].min() > scores[rejected].max()
    # gated-out high scorers are never chosen
    gate[9] = False
    chosen, _ = build_pairs(scores, labels, gate, classes=[0], pair_quantile=0.3, rng=rng)
    assert 9 not in chosen.tolist() and len(chosen) == 2
    with pytest.raises(ValueError, match="pair_quantile"):
        build_pairs(scores, labels, gate, [0], 0.8, rng)
