"""FedDPD's pure functions (fedml_feddpd/feddpd/) on hand-made inputs: no FedML, no diffusers."""
import numpy as np
import pytest
import torch

from fedml_feddpd.feddpd import (FedDPDSettings, allocate_classes, client_budget, cross_entropy, discrepancy,
                                 dpo_reward, due, largest_remainder, loss_gap, median_pairs, quality_gate,
                                 quantile_pairs, resolve_tau, select_top, supplement_index, supply_ratio,
                                 take_per_class)
from fedml_feddpd.feddpd.bank import BASE, CandidateBank


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
    chosen, rejected = quantile_pairs(scores, labels, gate, classes=[0], pair_quantile=0.3, rng=rng)
    assert len(chosen) == len(rejected) == 3
    assert (labels[chosen] == 0).all() and (labels[rejected] == 0).all()
    assert scores[chosen].min() > scores[rejected].max()
    # gated-out high scorers are never chosen
    gate[9] = False
    chosen, _ = quantile_pairs(scores, labels, gate, classes=[0], pair_quantile=0.3, rng=rng)
    assert 9 not in chosen.tolist() and len(chosen) == 2
    with pytest.raises(ValueError, match="pair_quantile"):
        quantile_pairs(scores, labels, gate, [0], 0.8, rng)


# -- the schedule ------------------------------------------------------------------------------------------


def test_exponential_schedule_supplies_every_round_with_a_decaying_floored_ratio():
    assert [due(r, 10, "exponential", 2, 99) for r in range(11)] == [False, False] + [True] * 8 + [False]
    ratios = [supply_ratio(r, "exponential", 2, 0.8, 0.5, 0.15) for r in (2, 3, 4, 5)]
    assert ratios == pytest.approx([0.8, 0.4, 0.2, 0.15])  # 0.1 would be below the floor
    assert [supplement_index(r, "exponential", 2, 99) for r in (2, 3, 7)] == [0, 1, 5]


def test_periodic_schedule_supplies_every_n_rounds_at_a_fixed_ratio():
    assert [r for r in range(150) if due(r, 149, "periodic", 20, 40)] == [20, 60, 100, 140]
    assert supply_ratio(100, "periodic", 20, 0.5, 0.1, 0.0) == 0.5
    assert [supplement_index(r, "periodic", 20, 40) for r in (20, 60, 140)] == [0, 1, 3]
    with pytest.raises(ValueError, match="feddpd.schedule: expected one of exponential, periodic"):
        due(30, 100, "weekly", 0, 1)


def test_settings_run_dpo_only_in_the_first_dpo_rounds_supplement_rounds():
    def dpo_rounds(**kw):
        s = FedDPDSettings(**kw)
        return [r for r in range(100) if s.due(r, 99) and s.dpo_due(r)]

    assert dpo_rounds(schedule="exponential", warmup_rounds=3, dpo_rounds=2) == [3, 4]
    assert dpo_rounds(dpo_rounds=0) == dpo_rounds(dpo=False) == dpo_rounds(selection="random") == []
    assert dpo_rounds(schedule="periodic", warmup_rounds=5, supplement_every=10, dpo_rounds=2) == [5, 15]


# -- the loss gap, the gate, the reward ---------------------------------------------------------------------


def test_loss_gap_is_positive_where_the_client_does_worse_than_the_global_model():
    labels = np.array([0, 1, 2])
    p_global = onehotish(labels, [0.9, 0.5, 0.25])
    p_local = onehotish(labels, [0.1, 0.5, 0.9])
    gap = loss_gap(p_local, p_global, labels)
    assert gap == pytest.approx([np.log(9.0), 0.0, np.log(0.25 / 0.9)])
    assert cross_entropy(p_local, labels) == pytest.approx(-np.log([0.1, 0.5, 0.9]))
    assert resolve_tau("auto", 10) == pytest.approx(0.1) and resolve_tau(0.3, 10) == 0.3


def test_reward_prefers_samples_hard_for_the_client_and_easy_for_the_global_model():
    """The sign the paper intends: high local loss, low global loss, and disagreement all raise the reward."""
    labels = np.zeros(4, int)
    p_global = onehotish(labels, [0.9, 0.9, 0.3, 0.9])
    p_local = onehotish(labels, [0.1, 0.8, 0.3, 0.3])  # sample 0: the client fails where the global model is sure
    r = dpo_reward(p_local, p_global, labels, disagreement_weight=0.0)
    assert r[0] > r[1] and r[0] > r[2]
    assert r[2] == pytest.approx(0.0)  # both equally unsure: no preference
    # disagreement on the argmax adds lambda: sample 3 is predicted as class 0 by the global model only
    p_local[3] = [0.3, 0.5, 0.1, 0.1]
    with_lambda = dpo_reward(p_local, p_global, labels, disagreement_weight=2.0)
    assert with_lambda[3] - dpo_reward(p_local, p_global, labels, 0.0)[3] == pytest.approx(2.0)
    assert with_lambda[1] == pytest.approx(r[1])  # they agree on sample 1


def test_median_pairs_split_each_class_at_its_median_and_keep_chosen_gated():
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1], 6)
    reward = np.concatenate([np.arange(6.0), np.arange(6.0) * 10])
    gate = np.ones(12, bool)
    chosen, rejected = median_pairs(reward, labels, gate, classes=[0, 1], rng=rng)
    assert len(chosen) == len(rejected) == 6
    for c in (0, 1):
        mine = labels[chosen] == c
        assert (labels[rejected][mine] == c).all()
        median = np.median(reward[labels == c])
        assert (reward[chosen][mine] > median).all() and (reward[rejected][labels[rejected] == c] <= median).all()
    gate[5] = False  # the best class-0 sample is not recognised: never chosen, so class 0 has 2 pairs
    chosen, rejected = median_pairs(reward, labels, gate, classes=[0], rng=rng)
    assert 5 not in chosen.tolist() and len(chosen) == len(rejected) == 2
    assert median_pairs(reward, labels, gate, classes=[], rng=rng)[0].size == 0


def test_take_per_class_cuts_a_supplement_in_its_order():
    labels = np.array([2, 0, 0, 1, 2, 0])
    assert take_per_class(labels, np.array([2, 0, 1])).tolist() == [0, 1, 2]
    assert take_per_class(labels, np.array([9, 1, 0])).tolist() == [1, 2, 3, 5]  # fewer where fewer exist
    assert take_per_class(labels, np.zeros(3, int)).size == 0


# -- the bank -------------------------------------------------------------------------------------------------


def test_bank_holds_base_samples_and_each_clients_newest_adapter_samples():
    bank = CandidateBank()
    assert bank.stale(0, 0) and len(bank) == 0
    with pytest.raises(ValueError, match="empty"):
        bank.candidates()
    bank.set_base(torch.zeros(4, 1, 2, 2), torch.tensor([0, 0, 1, 1]), round_idx=3)
    assert not bank.stale(50, 0)  # refresh 0: drawn once
    assert not bank.stale(5, 3) and bank.stale(6, 3)
    bank.set_adapted(7, torch.ones(2, 1, 2, 2), torch.tensor([1, 1]))
    bank.set_adapted(2, torch.ones(1, 1, 2, 2), torch.tensor([0]))
    bank.set_adapted(7, torch.ones(3, 1, 2, 2), torch.tensor([0, 1, 1]))  # replaces client 7's samples
    x, y, source = bank.candidates()
    assert len(bank) == len(y) == 8 and x.shape == (8, 1, 2, 2)
    assert source.tolist() == [BASE] * 4 + [2] + [7] * 3  # base first, then by client id
    restored = CandidateBank()
    restored.load_state_dict(bank.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(restored.candidates(), bank.candidates()))
    assert restored.refreshed_at == 3
