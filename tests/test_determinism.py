"""Same config and seed -> bit-identical metrics on sp (timings aside), FedDPD's DPO and sampling included."""
import os

import yaml

from conftest import ROOT, shrink

TIMING = ("client_seconds", "server_seconds", "wall_seconds", "server_stage_seconds", "seconds",
          "steps_per_second")


def _strip(obj):
    if isinstance(obj, dict):
        return {k: _strip(v) for k, v in obj.items() if k not in TIMING}
    if isinstance(obj, list):
        return [_strip(v) for v in obj]
    return obj


def test_same_seed_gives_identical_metrics(tmp_path):
    from fedml_feddpd.config import validate
    from fedml_feddpd.runner import run

    raw = shrink(yaml.safe_load(open(os.path.join(ROOT, "configs", "digits_feddpd.yaml"))))
    raw["train_args"]["comm_round"] = 3
    raw["feddpd"].update(dpo_rounds=1, warmup_rounds=0, supplement_every=1, tau=0.0, bank_per_class=6)
    raw["generator"].update(pretrain_steps=10, sample_steps=4, cache_dir=str(tmp_path / "gen"))
    raw["dpo_args"].update(max_steps=3, batch_size=4)
    raw["run_args"]["baseline"] = "none"
    first = run(validate(raw, "a.yaml"), tmp_path / "a", show_progress=False)
    second = run(validate(raw, "a.yaml"), tmp_path / "b", show_progress=False)
    assert first["generator"]["source"] == "pretrained" and second["generator"]["source"] == "cache"
    assert _strip(first["rounds"]) == _strip(second["rounds"])
    assert first["final"] == second["final"]
    assert any(r.get("server_step", {}).get("supplements") for r in first["rounds"])
    raw["common_args"]["random_seed"] = 1
    third = run(validate(raw, "a.yaml"), tmp_path / "c", show_progress=False)
    assert _strip(third["rounds"]) != _strip(first["rounds"])
