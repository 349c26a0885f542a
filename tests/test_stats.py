"""fedml_feddpd.stats against numbers computed by hand (the arithmetic is in the comments)."""
import math

import pytest

from fedml_feddpd import stats

T2 = 4.302653  # t_{0.975, 2} (tables); t_{0.975, 1} = 12.706205, t_{0.975, 4} = 2.776445


def test_t_crit():
    assert stats.t_crit(3) == pytest.approx(T2, abs=1e-6)
    assert stats.t_crit(2) == pytest.approx(12.706205, abs=1e-6)
    assert stats.t_crit(5) == pytest.approx(2.776445, abs=1e-6)
    assert stats.t_crit(1) is None and stats.t_crit(0) is None


def test_summary_sample_std_and_t_interval():
    s = stats.summary([0.9, 0.92, 0.95])
    # mean = 2.77 / 3 = 0.923333
    # deviations -0.023333, -0.003333, +0.026667; squares sum 0.00126667; / (n-1) = 0.000633333
    # sample std = sqrt(0.000633333) = 0.025166 (the population std would be 0.020548)
    # half width = t_{0.975,2} * s / sqrt(3) = 4.302653 * 0.025166 / 1.732051 = 0.062516
    assert s["n"] == 3
    assert s["mean"] == pytest.approx(0.923333, abs=1e-6)
    assert s["std"] == pytest.approx(0.025166, abs=1e-6)
    assert s["half_width"] == pytest.approx(0.062516, abs=1e-6)
    assert s["ci95_low"] == pytest.approx(0.860817, abs=1e-6)
    assert s["ci95_high"] == pytest.approx(0.985850, abs=1e-6)


def test_summary_small_n_and_missing_values():
    one = stats.summary([0.8])
    assert one["n"] == 1 and one["mean"] == 0.8
    assert one["std"] is None and one["half_width"] is None and one["ci95_low"] is None and one["ci95_high"] is None
    empty = stats.summary([])
    assert empty["n"] == 0 and all(empty[k] is None for k in ("mean", "std", "ci95_low", "ci95_high"))
    # None and nan are "no value": [0.5, None, 0.7, nan] -> [0.5, 0.7], mean 0.6, s = sqrt(0.02) = 0.141421
    s = stats.summary([0.5, None, 0.7, float("nan")])
    assert s["n"] == 2 and s["mean"] == pytest.approx(0.6) and s["std"] == pytest.approx(0.141421, abs=1e-6)
    # half width = 12.706205 * 0.141421 / sqrt(2) = 1.270621
    assert s["half_width"] == pytest.approx(1.270621, abs=1e-6)


def test_paired_distinguishable():
    # d = a - b = [0.02, 0.04, 0.03]: mean 0.03, s = 0.01, se = 0.01 / sqrt(3) = 0.0057735
    # t = 0.03 / 0.0057735 = 5.196152 (= 3 sqrt 3); df 2 has a closed form: p = 1 - t / sqrt(2 + t^2)
    #   = 1 - 5.196152 / sqrt(29) = 1 - 5.196152 / 5.385165 = 0.035099
    # CI = 0.03 ± 4.302653 * 0.0057735 = 0.03 ± 0.024841 = [0.005159, 0.054841]: excludes 0
    # Wilcoxon, exact: 3 distinct positive differences, W- = 0: p = 2 * (1 / 2^3) = 0.25
    p = stats.paired([0.92, 0.90, 0.95], [0.90, 0.86, 0.92])
    assert p["n"] == 3 and p["diffs"] == pytest.approx([0.02, 0.04, 0.03])
    assert p["mean_diff"] == pytest.approx(0.03) and p["std"] == pytest.approx(0.01)
    assert p["t_stat"] == pytest.approx(5.196152, abs=1e-5)
    assert p["t_p"] == pytest.approx(0.035099, abs=1e-6)
    assert p["ci95_low"] == pytest.approx(0.005159, abs=1e-6) and p["ci95_high"] == pytest.approx(0.054841, abs=1e-6)
    assert p["wilcoxon_p"] == pytest.approx(0.25)
    assert p["distinguishable"] is True
    # the other way round: same p, mirrored interval
    q = stats.paired([0.90, 0.86, 0.92], [0.92, 0.90, 0.95])
    assert q["mean_diff"] == pytest.approx(-0.03) and q["t_p"] == pytest.approx(0.035099, abs=1e-6)
    assert q["ci95_high"] == pytest.approx(-0.005159, abs=1e-6) and q["distinguishable"] is True


def test_paired_cannot_tell_apart():
    # d = [0.02, -0.01, 0.02]: mean 0.01, deviations 0.01, -0.02, 0.01 -> s = sqrt(0.0006 / 2) = 0.017321
    # se = 0.017321 / sqrt(3) = 0.01, t = 1.0, p = 1 - 1 / sqrt(3) = 0.422650
    # CI = 0.01 ± 4.302653 * 0.01 = [-0.033027, 0.053027]: contains 0
    p = stats.paired([0.80, 0.70, 0.60], [0.78, 0.71, 0.58])
    assert p["t_stat"] == pytest.approx(1.0, abs=1e-6) and p["t_p"] == pytest.approx(0.422650, abs=1e-6)
    assert p["ci95_low"] == pytest.approx(-0.033027, abs=1e-6) and p["ci95_high"] == pytest.approx(0.053027, abs=1e-6)
    assert p["distinguishable"] is False
    assert 0 < p["wilcoxon_p"] <= 1


def test_paired_edge_cases_never_crash():
    same = stats.paired([0.9, 0.8, 0.7], [0.9, 0.8, 0.7])  # every difference 0
    assert same["mean_diff"] == 0 and same["t_p"] == 1.0 and same["wilcoxon_p"] == 1.0
    assert same["distinguishable"] is False and same["t_stat"] is None
    one = stats.paired([0.9], [0.8])  # n = 1: a difference, no spread, no test
    assert one["n"] == 1 and one["mean_diff"] == pytest.approx(0.1)
    assert one["std"] is None and one["ci95_low"] is None and one["t_p"] is None
    assert one["distinguishable"] is False and one["wilcoxon_p"] in (None, 1.0)
    none = stats.paired([], [])
    assert none["n"] == 0 and none["mean_diff"] is None and none["distinguishable"] is False
    # a constant shift (0.5 - 0.25 = 0.75 - 0.5 = 0.25, exact in binary): s = 0, t infinite -> t_p None,
    # zero-width interval [0.25, 0.25], which excludes 0
    shift = stats.paired([0.5, 0.75], [0.25, 0.5])
    assert shift["std"] == 0 and shift["t_p"] is None and shift["ci95_low"] == shift["ci95_high"] == 0.25
    assert shift["distinguishable"] is True
    # a seed missing on one side is left out: pairs (0.92, 0.90), (0.95, 0.92) -> d = [0.02, 0.03]
    gap = stats.paired([0.92, None, 0.95], [0.90, 0.86, 0.92])
    assert gap["n"] == 2 and gap["mean_diff"] == pytest.approx(0.025)
    with pytest.raises(ValueError):
        stats.paired([0.1, 0.2], [0.1])


def test_wilcoxon_helpers():
    assert stats.wilcoxon_p([0.0, 0.0]) == 1.0 and stats.wilcoxon_p([]) == 1.0
    # 5 positive distinct differences: exact two-sided p = 2 / 2^5 = 0.0625
    assert stats.wilcoxon_p([0.01, 0.02, 0.03, 0.04, 0.05]) == pytest.approx(0.0625)
    assert stats.wilcoxon_min_p(5) == 0.0625 and stats.wilcoxon_min_p(3) == 0.25 and stats.wilcoxon_min_p(1) == 1.0


def test_last_k_mean_uses_evaluated_records_only():
    # rounds 0..13, top1 = round / 100, rounds 5 and 9 not evaluated (no top1)
    records = [{"round": r} if r in (5, 9) else {"round": r, "top1": r / 100, "balanced_accuracy": r / 200}
               for r in range(14)]
    # last 10 evaluated: rounds 2, 3, 4, 6, 7, 8, 10, 11, 12, 13 -> sum 76 -> 0.76 / 10 = 0.076
    # (the last 10 records, rounds 4..13, would give 71 / 8 / 100 = 0.08875)
    assert stats.last_k_mean(records, "top1", 10) == pytest.approx(0.076)
    assert stats.last_k_mean(records, "balanced_accuracy", 10) == pytest.approx(0.038)
    # fewer evaluated records than k: all of them; last 3: rounds 11, 12, 13 -> 0.12
    assert stats.last_k_mean(records[:3], "top1", 10) == pytest.approx(0.01)
    assert stats.last_k_mean(records, "top1", 3) == pytest.approx(0.12)
    assert stats.last_k_mean([{"round": 0}], "top1") is None
    # a key every round carries (validation accuracy): the last k rounds
    records = [dict(r, val_top1=r["round"] / 100) for r in records]
    assert stats.last_k_mean(records, "val_top1", 10) == pytest.approx(0.085)  # rounds 4..13


def test_global_class_counts_prefers_training_histograms():
    data = {"client_label_histograms": [[1, 0, 2], [3, 4, 0]], "test_class_counts": [9, 9, 9]}
    assert stats.global_class_counts(data) == ([4, 4, 2], "train")  # column sums 1+3, 0+4, 2+0
    assert stats.global_class_counts({"client_label_histograms": None, "test_class_counts": [9, 5, 1]}) == ([9, 5, 1], "test")
    assert stats.global_class_counts({}) == (None, None)


def test_class_thirds_and_group_accuracy():
    counts = [5, 50, 20, 20, 100, 1, 7, 3, 30, 9]
    # descending count, ties by class index (2 before 3): 4, 1, 8, 2, 3, 9, 6, 0, 7, 5 -> 4 / 3 / 3
    head, medium, tail = stats.class_thirds(counts)
    assert (head, medium, tail) == ([4, 1, 8, 2], [3, 9, 6], [0, 7, 5])
    assert [len(g) for g in stats.class_thirds(list(range(11)))] == [4, 4, 3]
    assert stats.class_thirds([3, 1]) == [[0], [1], []]
    per_class = [0.5, 0.9, 0.8, 0.7, 1.0, 0.0, 0.6, None, 0.95, 0.4]
    # head (1.0 + 0.9 + 0.95 + 0.8) / 4 = 0.9125; medium (0.7 + 0.4 + 0.6) / 3 = 0.566667;
    # tail: class 7 has no accuracy (None), so (0.5 + 0.0) / 2 = 0.25
    acc = stats.group_accuracy(per_class, [head, medium, tail])
    assert acc == pytest.approx([0.9125, 0.566667, 0.25], abs=1e-6)
    assert stats.group_accuracy([None, 0.5], [[0], [1], []]) == [None, 0.5, None]


def test_curve_band():
    band = stats.curve_band([[0.5, None, 0.7], [0.6, None, 0.9], [0.7, 0.8]])
    # round 0: 0.5, 0.6, 0.7: mean 0.6, s 0.1, half 4.302653 * 0.1 / sqrt(3) = 0.248414
    # round 1: 0.8 only: mean, no band; round 2: 0.7, 0.9 (third seed padded): mean 0.8,
    #   s = 0.141421, half 12.706205 * 0.141421 / sqrt(2) = 1.270621
    assert band["mean"] == pytest.approx([0.6, 0.8, 0.8])
    assert band["ci95_low"][0] == pytest.approx(0.6 - 0.248414, abs=1e-6)
    assert band["ci95_high"][0] == pytest.approx(0.6 + 0.248414, abs=1e-6)
    assert band["ci95_low"][1] is None and band["ci95_high"][1] is None
    assert band["ci95_high"][2] == pytest.approx(0.8 + 1.270621, abs=1e-6)


def test_ci_from_population_std():
    # n 3, population std 0.01: s = 0.01 * sqrt(3 / 2) = 0.012247; half 4.302653 * 0.012247 / sqrt(3) = 0.030425
    low, high = stats.ci_from_population_std(0.5, 0.01, 3)
    assert low == pytest.approx(0.5 - 0.030425, abs=1e-6) and high == pytest.approx(0.5 + 0.030425, abs=1e-6)
    assert stats.ci_from_population_std(0.5, 0.01, 1) == (None, None)
    assert stats.ci_from_population_std(float("nan"), 0.01, 3) == (None, None)
    assert not math.isnan(high)


def test_pairs_pairs_common_seeds_and_skips_a_setting_a_method_has_not_run():
    from benchmarks.pairs import pairs

    done = lambda seeds, vals: {"seeds": seeds, "top1": {"values": vals}}  # noqa: E731
    results = {"settings": {
        "A": {"x": done([0, 1, 2], [0.80, 0.82, 0.84]), "y": done([0, 1, 2, 3], [0.79, 0.80, 0.81, 0.5])},
        "B": {"x": {"seeds": []}, "y": done([0], [0.7])},  # x has no finished run in B
    }}
    out = pairs(results, "x", "y", "top1")
    assert list(out) == ["A"]
    assert out["A"]["n"] == 3 and abs(out["A"]["mean_diff"] - 2.0) < 1e-9  # seed 3 of y is unpaired
