"""`compare` on a tiny suite: report, PNG and JSON well formed; a second call skips finished runs."""
import json
import os
import re

import pytest
import yaml

from conftest import ROOT


@pytest.fixture
def tiny_suite(tmp_path):
    suite = {
        "base": os.path.join(ROOT, "configs", "digits_fedavg.yaml"),
        "output_dir": str(tmp_path / "cmp"),
        "seeds": [0],
        "common": {"train_args": {"comm_round": 2, "epochs": 5, "client_num_in_total": 4,
                                  "client_num_per_round": 4},
                   "data_args": {"partition_alpha": 1.0, "oracle_fraction": 0.1}},
        "settings": {"IF=10": {"data_args": {"imbalance_factor": 10}}},
        "methods": {"FedAvg": {}, "Oracle": {"train_args": {"federated_optimizer": "Oracle"},
                                             "feddpd": {"warmup_rounds": 0, "supplement_every": 1}}},
    }
    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump(suite))
    return path, tmp_path / "cmp"


def test_compare_writes_report_and_resumes(tiny_suite, capsys):
    from fedml_feddpd.cli import main

    path, out = tiny_suite
    # two runs at once, each in a spawned process (the path the real suite takes with --workers 2)
    assert main(["compare", "--cf", str(path), "--no-progress", "--workers", "2"]) == 0
    assert re.search(r"^compare: ran 2 run\(s\) in (\d+ h )?\d+ min \d\d s with 2 worker\(s\); 0 had finished before$",
                     capsys.readouterr().err, re.M)
    results = json.loads((out / "results.json").read_text())
    entry = results["settings"]["IF=10"]
    assert set(entry) == {"FedAvg", "Oracle"}
    assert 0 < entry["FedAvg"]["top1"]["mean"] <= 1 and len(entry["Oracle"]["curve_mean"]) == 2
    assert entry["FedAvg"]["supplement_per_client"] == 0 and entry["Oracle"]["supplement_per_client"] > 0
    report = (out / "report.md").read_text()
    assert "| FedAvg |" in report and "| Oracle † |" in report and "**" in report
    png = (out / "curves_IF=10.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    metrics = out / "runs" / "IF=10" / "FedAvg" / "seed0" / "metrics.json"
    stamp = metrics.stat().st_mtime_ns
    assert main(["compare", "--cf", str(path), "--no-progress"]) == 0
    assert metrics.stat().st_mtime_ns == stamp  # finished runs are skipped
    assert "compare: ran" not in capsys.readouterr().err  # nothing ran, so no suite time
    (out / "report.md").unlink()
    assert main(["report", str(out)]) == 0 and (out / "report.md").read_text() == report
    # a suite still running: --collect-only reports what has finished and says which cells are partial
    os.remove(out / "runs" / "IF=10" / "Oracle" / "seed0" / "metrics.json")
    assert main(["compare", "--cf", str(path), "--no-progress", "--collect-only"]) == 0
    partial = (out / "report.md").read_text()
    assert "| Oracle | not run | not run |" in partial and "| FedAvg | **" in partial
    assert not (out / "runs" / "IF=10" / "Oracle" / "seed0" / "metrics.json").exists()  # nothing was run
    # a changed setting never hides behind an old finished run: one line naming the folder and the key
    suite = yaml.safe_load(path.read_text())
    suite["common"]["train_args"]["learning_rate"] = 0.05
    path.write_text(yaml.safe_dump(suite))
    assert main(["compare", "--cf", str(path), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "FedAvg/seed0/metrics.json was made by another config" in err[0]
    assert "train_args.learning_rate: that run has 0.1, config has 0.05" in err[0]
    assert metrics.stat().st_mtime_ns == stamp


def test_compare_rejects_bad_method_before_running(tiny_suite, capsys):
    from fedml_feddpd.cli import main

    path, out = tiny_suite
    suite = yaml.safe_load(path.read_text())
    suite["methods"]["Bad"] = {"train_args": {"federated_optimizer": "FedFoo"}}
    path.write_text(yaml.safe_dump(suite))
    assert main(["compare", "--cf", str(path), "--no-progress"]) == 2
    assert "methods.Bad / settings.IF=10: train_args.federated_optimizer: expected one of" in capsys.readouterr().err
    assert not out.exists()


# --- report statistics on a hand-written compare folder (no training) ---------------------------------

WITHIN = "within FedAvg's boundary: model parameters and sample counts only"
BREAKS = "breaks the boundary: the server uses each client's label counts"
ORACLE = "not deployable: uses held-out real data drawn from the global distribution"
# 10 classes, long-tailed: class c has 100 - 10 c training samples over two clients (head: 0-3)
HISTOGRAMS = [[60 - 5 * c for c in range(10)], [40 - 5 * c for c in range(10)]]


def _fake_run(method, privacy, finals, seed):
    """A metrics.json as runner.run writes it, 12 evaluated rounds with top1 climbing to the final value;
    per-class accuracies: head classes (0-3) 0.05 above the round's top-1, tail classes (7-9) 0.05 below."""
    final = finals[seed]
    rounds = []
    for r in range(12):
        top1 = final - 0.01 * (11 - r)
        per_class = [top1 + 0.05 if c < 4 else top1 if c < 7 else top1 - 0.05 for c in range(10)]
        rounds.append({"round": r, "top1": top1, "balanced_accuracy": top1 - 0.05, "per_class_accuracy": per_class,
                       "client_seconds": 1.0, "server_seconds": 0.5})
    return {"method": method, "privacy": privacy, "seed": seed,
            "final": {k: rounds[-1][k] for k in ("top1", "balanced_accuracy", "per_class_accuracy")},
            "rounds": rounds, "wall_seconds": 20.0 + seed, "client_seconds_total": 12.0, "server_seconds_total": 6.0,
            "data": {"client_label_histograms": HISTOGRAMS, "test_class_counts": [10] * 10}}


FAKE = {  # name -> (optimizer, privacy, final top-1 per seed 0, 1, 2)
    "FedAvg": ("FedAvg", WITHIN, [0.80, 0.70, 0.75]),
    "FedProx": ("FedProx", WITHIN, [0.81, 0.69, 0.75]),       # -> FedAvg: +0.01, -0.01, 0: cannot tell apart
    "Balance": ("Balance", BREAKS, [0.94, 0.93, 0.92]),       # the highest, but crosses the boundary
    "Oracle": ("Oracle", ORACLE, [0.91, 0.90, 0.92]),
    "FedDPD": ("FedDPD", WITHIN, [0.90, 0.82, 0.86]),         # -> FedAvg: +0.10, +0.12, +0.11
}


def _table_rows(report, heading):
    """The rows of the first table after `heading`, by method name (with its † when it has one)."""
    lines = report.splitlines()
    i = next(k for k, line in enumerate(lines) if line.startswith(heading))
    while not lines[i].startswith("| method |"):
        i += 1
    rows = {}
    for line in lines[i + 2:]:
        if not line.startswith("| "):
            break
        rows[line[2:].split(" | ")[0]] = line
    return rows


@pytest.fixture
def fake_compare(tmp_path):
    from fedml_feddpd.compare import _run_dir

    out = tmp_path / "cmp"
    suite = {"seeds": [0, 1, 2], "settings": {"IF=10": {}}, "methods": {m: {} for m in FAKE}}
    for name, (method, privacy, finals) in FAKE.items():
        for seed in suite["seeds"]:
            d = _run_dir(out, "IF=10", name, seed)
            d.mkdir(parents=True)
            (d / "metrics.json").write_text(json.dumps(_fake_run(method, privacy, finals, seed)))
    return out, suite


def test_report_statistics_on_fake_runs(fake_compare):
    from fedml_feddpd.compare import rebuild_report, write_results

    out, suite = fake_compare
    write_results(out, suite)
    report = (out / "report.md").read_text()
    # the headline table: final top-1 ± sample std and the paired top-1 difference to FedAvg (d = 0.10, 0.12,
    # 0.11: +11.0, half-width t_{0.975,2} * 0.01 / sqrt 3 = 2.5 points), * as its CI excludes 0
    summary = _table_rows(report, "## IF=10")
    assert summary["FedDPD"].startswith("| FedDPD | 86.0 ± 4.0 | ") and "+11.0 [+8.5, +13.5] *" in summary["FedDPD"]
    assert summary["FedAvg"].split(" | ")[4] == "—"  # no self-comparison
    rows = _table_rows(report, "All metrics:")
    # bold: the best method within the boundary (FedDPD), never Balance † or Oracle †, which score higher
    assert "**" not in rows["Balance †"] and "**" not in rows["Oracle †"] and "**" not in rows["FedAvg"]
    # every column's best deployable is FedDPD; 86.0 ± 4.0: the sample std (ddof 1) of 0.90, 0.82, 0.86
    assert rows["FedDPD"].startswith("| FedDPD | **86.0 ± 4.0 [76.1, 95.9]** |")
    assert rows["FedDPD"].count("**") == 2 * 7
    assert ("Best deployable method (within FedAvg's privacy boundary) on IF=10, top-1 (LT test), final: "
            "**FedDPD** (86.0%); +11.0 points over FedAvg") in report
    assert "Higher but crossing the boundary (†): Balance, Oracle" in report
    # the paired section, with a verdict in words both ways
    assert "### IF=10: paired difference to FedAvg (method − FedAvg, percentage points)" in report
    assert "### IF=10: paired difference to FedDPD" in report
    prox = _table_rows(report, "### IF=10: paired difference to FedAvg")["FedProx"]
    assert prox.startswith("| FedProx | +0.0 [") and "cannot tell apart" in prox.split(" | ")[1]
    assert "Distinguishable from FedAvg (95% CI excludes 0): Balance †" in report
    assert "top-1 (LT test)" in report and "balanced (class-balanced view)" in report

    results = json.loads((out / "results.json").read_text())
    per = results["settings"]["IF=10"]
    dpd, avg = per["FedDPD"], per["FedAvg"]
    assert dpd["seeds"] == [0, 1, 2] and dpd["top1"]["values"] == pytest.approx([0.90, 0.82, 0.86])
    assert dpd["top1"]["std"] == pytest.approx(0.04)  # sqrt((0.04^2 + 0.04^2 + 0) / 2)
    # last 10 evaluated rounds: final - 0.01 * (9 + ... + 0) / 10 = final - 0.045
    assert dpd["top1_last10"]["values"] == pytest.approx([0.855, 0.775, 0.815])
    assert dpd["balanced_accuracy"]["values"] == pytest.approx([0.85, 0.77, 0.81])
    # head = classes 0-3 (most training samples), tail = 7-9
    assert dpd["class_groups"][0] == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]] and dpd["class_counts_source"] == ["train"] * 3
    assert dpd["head"]["values"] == pytest.approx([0.95, 0.87, 0.91])
    assert dpd["medium"]["values"] == pytest.approx([0.90, 0.82, 0.86])
    assert dpd["tail"]["values"] == pytest.approx([0.85, 0.77, 0.81])
    assert len(dpd["curves"]) == 3 and len(dpd["curve_ci95_low"]) == 12
    assert dpd["per_seed"]["wall_seconds"] == [20.0, 21.0, 22.0]
    vs_avg = dpd["paired"]["FedAvg"]
    assert vs_avg["reference"] == "FedAvg" and vs_avg["seeds"] == [0, 1, 2]
    top1 = vs_avg["metrics"]["top1"]
    # d = [0.10, 0.12, 0.11]: mean 0.11, s 0.01, t = 0.11 / (0.01 / sqrt 3) = 19.052559
    assert top1["diffs"] == pytest.approx([0.10, 0.12, 0.11]) and top1["t_stat"] == pytest.approx(19.052559, abs=1e-4)
    assert top1["distinguishable"] is True and top1["wilcoxon_p"] == pytest.approx(0.25)
    assert per["FedProx"]["paired"]["FedAvg"]["metrics"]["top1"]["distinguishable"] is False
    assert "FedDPD" not in dpd["paired"] and "FedAvg" not in avg["paired"]  # no self-comparison
    assert results["references"]["IF=10"] == {"FedAvg": "FedAvg", "FedDPD": "FedDPD"}

    # `report` rebuilds the same report from results.json alone
    (out / "report.md").unlink()
    rebuild_report(str(out))
    assert (out / "report.md").read_text() == report


def test_report_partial_suite_and_reference_by_optimizer(fake_compare):
    from fedml_feddpd.compare import _run_dir, write_results

    out, suite = fake_compare
    # no method named FedDPD: the first method that ran federated_optimizer FedDPD is the reference
    suite["methods"] = {("FedDPD (tau 2)" if m == "FedDPD" else m): {} for m in FAKE}
    _run_dir(out, "IF=10", "FedDPD", 0).parent.rename(_run_dir(out, "IF=10", "FedDPD (tau 2)", 0).parent)
    os.remove(out / "runs" / "IF=10" / "FedAvg" / "seed2" / "metrics.json")  # FedAvg: seeds 0, 1 only
    results = write_results(out, suite)
    assert results["references"]["IF=10"] == {"FedAvg": "FedAvg", "FedDPD": "FedDPD (tau 2)"}
    per = results["settings"]["IF=10"]
    assert per["FedAvg"]["seeds"] == [0, 1] and per["FedProx"]["paired"]["FedAvg"]["seeds"] == [0, 1]
    report = (out / "report.md").read_text()
    assert "(seeds 0, 1)" in report and "paired difference to FedDPD (tau 2)" in report


def test_report_refuses_a_results_json_it_cannot_read_in_one_line(tmp_path, capsys):
    from fedml_feddpd.cli import main

    (tmp_path / "results.json").write_text(json.dumps({"seeds": [0], "settings": {}}))  # an older format
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"feddpd: error: report: {tmp_path / 'results.json'} is of format None, expected 2: rebuild it "
                   "where its runs are with `compare --cf SUITE --collect-only`"]
    (tmp_path / "results.json").write_text("{not json")
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not JSON" in err[0] and "Traceback" not in err[0]


def test_settings_and_methods_flags_keep_part_of_the_suite(tmp_path):
    from fedml_feddpd.compare import load_suite
    from fedml_feddpd.errors import ConfigError

    suite, runs = load_suite(os.path.join(ROOT, "configs", "compare_digits.yaml"), ["IF=10"], ["FedAvg", "FedLC"])
    assert set(suite["settings"]) == {"IF=10"} and list(suite["methods"]) == ["FedAvg", "FedLC"]
    assert {k[:2] for k in runs} == {("IF=10", "FedAvg"), ("IF=10", "FedLC")} and len(runs) == 10
    with pytest.raises(ConfigError, match=r"^--methods FedFoo: not in the suite; expected one of FedAvg"):
        load_suite(os.path.join(ROOT, "configs", "compare_digits.yaml"), None, ["FedFoo"])


def test_longest_runs_start_first():
    from fedml_feddpd.compare import load_suite, longest_first

    _, runs = load_suite(os.path.join(ROOT, "configs", "compare_digits.yaml"), ["IF=10"],
                         ["FedAvg", "FedDPD", "FedDPD (dpo_rounds 1)", "Balance@B", "Balance"])
    order = [m for _, m, _ in longest_first(runs)]
    # Balance draws per client, DPO trains adapters; FedDPD without DPO costs about what FedAvg does (stable order)
    assert order == (["Balance"] * 5 + ["Balance@B"] * 5 + ["FedDPD (dpo_rounds 1)"] * 5 + ["FedAvg"] * 5
                     + ["FedDPD"] * 5)


def test_overview_of_every_setting(fake_compare):
    from fedml_feddpd.compare import _run_dir, write_results

    out, suite = fake_compare
    # a second setting where FedProx is best and FedDPD has seeds 0, 1 only
    suite["settings"]["IF=100"] = {}
    other = dict(FAKE, FedProx=("FedProx", WITHIN, [0.95, 0.96, 0.94]))
    for name, (method, privacy, finals) in other.items():
        for seed in suite["seeds"][:2] if name == "FedDPD" else suite["seeds"]:
            d = _run_dir(out, "IF=100", name, seed)
            d.mkdir(parents=True)
            (d / "metrics.json").write_text(json.dumps(_fake_run(method, privacy, finals, seed)))
    write_results(out, suite)
    report = (out / "report.md").read_text()
    assert report.index("## Overview: every setting") < report.index("## IF=10")
    top1 = _table_rows(report, "**top-1 (LT test), final**")
    assert top1["FedDPD"] == "| FedDPD | **86.0 ± 4.0 (+11.0*)** | 86.0 ± 5.7 (+11.0) (seeds 0, 1) |"  # 2 seeds: t_{0.975,1} CI contains 0
    assert top1["FedProx"] == "| FedProx | 75.0 ± 6.0 (+0.0) | **95.0 ± 1.0 (+20.0*)** |"
    assert top1["FedAvg"] == "| FedAvg | 75.0 ± 5.0 | 75.0 ± 5.0 |" and "**" not in top1["Balance †"]
    cost = [line for line in report.split("## Cost")[1].splitlines() if line.startswith("| FedDPD |")]
    assert cost == ["| FedDPD | IF=10 | 0 | 21 | 12 | 6 |", "| FedDPD | IF=100 | 0 | 20 | 12 | 6 |"]  # seeds 0, 1
    balanced = _table_rows(report, "**balanced, final**")
    assert balanced["FedDPD"].startswith("| FedDPD | **81.0 ± 4.0 (+11.0*)** |")
    # one setting: no overview (its own headline table says it all)
    suite["settings"].pop("IF=100")
    write_results(out, suite)
    assert "## Overview" not in (out / "report.md").read_text()
