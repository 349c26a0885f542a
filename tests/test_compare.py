"""`compare` on a tiny suite: report, PNG and JSON well formed; a second call skips finished runs."""
import json
import os

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
