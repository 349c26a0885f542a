"""A run killed with SIGKILL mid-run resumes from its checkpoint to the same metrics as an uninterrupted
run, for every supplement method; unusable checkpoints stop `--resume` with one line and exit 2, leaving
the folder as it was."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml

from conftest import ROOT, shrink
from test_determinism import _strip

ROUNDS = 4


def _tiny_feddpd(tmp_path):
    raw = shrink(yaml.safe_load(open(os.path.join(ROOT, "configs", "digits_feddpd.yaml"))))
    raw["train_args"]["comm_round"] = ROUNDS
    # supplements after rounds 0 and 2; the kill lands between them, so DPO adapters, supplements and
    # loader states all have to come back from the checkpoint
    raw["feddpd"].update(dpo_rounds=1, schedule="periodic", warmup_rounds=0, supplement_every=2, tau=0.0, bank_per_class=6)
    raw["generator"].update(pretrain_steps=10, sample_steps=4, cache_dir=str(tmp_path / "gen"))
    raw["dpo_args"].update(max_steps=3, batch_size=4)
    raw["run_args"].update(baseline="none", output_dir=str(tmp_path / "runs"))
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(raw))
    return raw, path


def _checkpoint_round(path):
    try:
        return torch.load(path, map_location="cpu", weights_only=False)["round"]
    except Exception:  # not there yet
        return -1


def test_sigkill_mid_run_resumes_to_identical_metrics(tmp_path):
    from fedml_feddpd.checkpoint import unpack_weights
    from fedml_feddpd.cli import main
    from fedml_feddpd.config import validate
    from fedml_feddpd.runner import run

    raw, path = _tiny_feddpd(tmp_path)
    reference = run(validate(raw, str(path)), tmp_path / "ref", show_progress=False)
    assert reference["resumed_from_round"] is None
    assert not (tmp_path / "ref" / "checkpoint.pt").exists()  # the finished folder holds results only

    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "fedml_feddpd", "run", "--cf", str(path), "--out", str(out),
                             "--no-progress"], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while _checkpoint_round(out / "checkpoint.pt") < 1 and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    killed_at = _checkpoint_round(out / "checkpoint.pt")
    assert 1 <= killed_at < ROUNDS - 1
    assert not (out / "metrics.json").exists() and (out / "INCOMPLETE").is_file()
    # the same checkpoint with the adapters as written before they were packed: {parameter name: tensor}
    legacy = tmp_path / "legacy"
    shutil.copytree(out, legacy)
    state = torch.load(legacy / "checkpoint.pt", map_location="cpu", weights_only=False)
    adapters = state["server_step"]["adapters"]
    assert adapters and all(set(packed) == {"names", "shapes", "flat"} for packed in adapters.values())
    state["server_step"]["adapters"] = {name: {k: t.clone() for k, t in unpack_weights(packed).items()}
                                        for name, packed in adapters.items()}
    torch.save(state, legacy / "checkpoint.pt")

    assert main(["run", "--cf", str(path), "--out", str(out), "--resume", "--no-progress"]) == 0
    resumed = run(validate(raw, str(path)), out, show_progress=False, resume=True)  # finished: read back
    assert resumed["resumed_from_round"] == killed_at
    assert _strip(resumed["rounds"]) == _strip(reference["rounds"])
    assert resumed["final"] == reference["final"]
    assert sorted(os.listdir(out)) == ["config.yaml", "metrics.json"]
    assert main(["run", "--cf", str(path), "--out", str(legacy), "--resume", "--no-progress"]) == 0
    again = run(validate(raw, str(path)), legacy, show_progress=False, resume=True)
    assert _strip(again["rounds"]) == _strip(reference["rounds"])
    # supplements were delivered both before and after the kill
    supplied = [r["round"] for r in resumed["rounds"] if r.get("server_step", {}).get("supplements")]
    assert supplied == [0, 2] and killed_at in (1, 2)


# The other supplement methods: supplements after rounds 0 and 1 of 3, and the run is killed right after
# round 0's checkpoint, so a supplement is made before the kill and another after the resume. A tiny
# generator (shared by the methods, pretrained once) keeps Balance's flattening budgets cheap.
SUPPLEMENT_ROUNDS, KILL_AFTER = 3, 0
# The child is SIGKILLed by itself right after the checkpoint of round KILL_AFTER is on disk: the same kill
# as above, but at a known round, so a supplement is certain to come after it.
KILLED_RUN = """
import os, signal, sys
from fedml_feddpd import checkpoint, cli
save = checkpoint.Checkpointer.save
def save_then_die(self, round_idx):
    save(self, round_idx)
    if round_idx == int(os.environ["FEDDPD_TEST_KILL_AFTER"]):
        os.kill(os.getpid(), signal.SIGKILL)
checkpoint.Checkpointer.save = save_then_die
sys.exit(cli.main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def tiny_generator_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("gen")


@pytest.mark.parametrize("method", ["FedDiff", "Balance", "Balance@B", "Oracle"])
def test_every_supplement_method_resumes_to_identical_metrics(method, tmp_path, tiny_generator_cache, capsys):
    from fedml_feddpd.cli import main
    from fedml_feddpd.config import validate
    from fedml_feddpd.runner import run

    raw = shrink(yaml.safe_load(open(os.path.join(ROOT, "configs", "digits_feddpd.yaml"))))
    raw["train_args"].update(comm_round=SUPPLEMENT_ROUNDS, federated_optimizer=method)
    raw["data_args"]["oracle_fraction"] = 0.1  # Oracle's held-out real data (the same split for every method)
    raw["feddpd"].update(warmup_rounds=0, supplement_every=1)
    if method == "Balance@B":  # the kept share of the previous supplement is drawn the same after a resume
        raw["feddpd"]["keep_previous"] = 0.5
    raw["generator"].update(pretrain_steps=10, sample_steps=2, guidance_scale=1.0, block_out_channels=[8, 16],
                            norm_num_groups=4, attention_head_dim=8, cache_dir=str(tiny_generator_cache))
    raw["run_args"].update(baseline="none", generator_threads=1)
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(raw))
    reference = run(validate(raw, str(path)), tmp_path / "ref", show_progress=False)

    out = tmp_path / "killed"
    proc = subprocess.run([sys.executable, "-c", KILLED_RUN, "run", "--cf", str(path), "--out", str(out),
                           "--no-progress"], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                          env={**os.environ, "FEDDPD_TEST_KILL_AFTER": str(KILL_AFTER)}, timeout=300)
    assert proc.returncode == -signal.SIGKILL, f"the run ended before it could be killed: {proc.stderr[-2000:]}"
    assert _checkpoint_round(out / "checkpoint.pt") == KILL_AFTER
    assert sorted(os.listdir(out)) == ["INCOMPLETE", "checkpoint.pt"]
    # the same checkpoint as written before policies saved their state (FORMAT 1 without the key)
    legacy = tmp_path / "legacy"
    shutil.copytree(out, legacy)
    state = torch.load(legacy / "checkpoint.pt", map_location="cpu", weights_only=False)
    policy_state = state["server_step"].pop("policy")
    if method == "FedDiff":  # its shared set: what every client holds
        images, labels, _ = policy_state["shared"]
        assert all(torch.equal(images, x) and torch.equal(labels, y)
                   for x, y, _ in state["server_step"]["delivered"].values())
    elif method in ("Balance", "Balance@B"):  # each client's first draw, which later rounds cut from
        assert set(policy_state) == {"drawn"} and policy_state["drawn"]
    else:
        assert policy_state == {}
    torch.save(state, legacy / "checkpoint.pt")

    assert main(["run", "--cf", str(path), "--out", str(out), "--resume", "--no-progress"]) == 0
    resumed = run(validate(raw, str(path)), out, show_progress=False, resume=True)  # finished: read back
    assert resumed["resumed_from_round"] == KILL_AFTER
    assert _strip(resumed["rounds"]) == _strip(reference["rounds"])
    assert resumed["final"] == reference["final"]
    supplied = [r["round"] for r in resumed["rounds"] if r.get("server_step", {}).get("supplements")]
    assert supplied == [0, 1]  # one supplement before the kill, one after the resume
    if method == "Balance@B":
        assert all(s["kept"] > 0 for s in resumed["rounds"][1]["server_step"]["supplements"].values())

    capsys.readouterr()
    if method != "Oracle":  # their saved draws cannot be rebuilt: refused in one line, the folder as it was
        what = "FedDiff's saved shared set" if method == "FedDiff" else "Balance's saved draws"
        assert main(["run", "--cf", str(path), "--out", str(legacy), "--resume", "--no-progress"]) == 2
        assert capsys.readouterr().err.strip().splitlines()[-1] == (
            f"feddpd: error: checkpoint {legacy / 'checkpoint.pt'} predates {what}; delete it to start over")
        assert sorted(os.listdir(legacy)) == ["INCOMPLETE", "checkpoint.pt"]
    elif method == "Oracle":  # a stateless policy resumes an older checkpoint bit for bit
        assert main(["run", "--cf", str(path), "--out", str(legacy), "--resume", "--no-progress"]) == 0
        again = run(validate(raw, str(path)), legacy, show_progress=False, resume=True)
        assert _strip(again["rounds"]) == _strip(reference["rounds"])


def test_adapter_weights_pack_into_one_tensor_and_back():
    from fedml_feddpd.checkpoint import pack_weights, unpack_weights

    weights = {"up.conv1.lora_A.client_1.weight": torch.randn(4, 8, 3, 3),
               "up.conv1.lora_B.client_1.weight": torch.randn(16, 4, 1, 1), "to_q.lora_A.client_1.weight": torch.randn(4, 16)}
    packed = pack_weights(weights)
    assert [k for k, v in packed.items() if torch.is_tensor(v)] == ["flat"]
    back = unpack_weights(packed)
    assert list(back) == list(weights) and all(torch.equal(back[k], weights[k]) for k in weights)
    assert unpack_weights(weights) is weights  # written before packing: as it is
    assert unpack_weights(pack_weights({})) == {}


@pytest.fixture
def half_run(tmp_path):
    """The folder of an interrupted run: a checkpoint of round 0 and no results."""
    from fedml_feddpd.checkpoint import CHECKPOINT, FORMAT, _run_identity
    from fedml_feddpd.config import validate

    raw, path = _tiny_feddpd(tmp_path)
    out = tmp_path / "half"
    out.mkdir()
    torch.save({"format": FORMAT, "config": _run_identity(validate(raw, str(path)).sections), "round": 0},
               out / CHECKPOINT)
    return raw, path, out


def test_truncated_checkpoint_is_one_line_exit_2(half_run, capsys):
    from fedml_feddpd.cli import main

    raw, path, out = half_run
    ckpt = out / "checkpoint.pt"
    data = ckpt.read_bytes()
    ckpt.write_bytes(data[: len(data) // 2])
    assert main(["run", "--cf", str(path), "--out", str(out), "--resume", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"feddpd: error: checkpoint {ckpt}: unreadable (truncated or corrupt: ")
    assert err.endswith("delete it to start over")
    assert sorted(os.listdir(out)) == ["checkpoint.pt"]  # nothing written, nothing removed


def test_checkpoint_of_another_config_is_refused(half_run, capsys):
    from fedml_feddpd.cli import main

    raw, path, out = half_run
    raw["train_args"]["learning_rate"] = 0.05
    path.write_text(yaml.safe_dump(raw))
    assert main(["run", "--cf", str(path), "--out", str(out), "--resume", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == (f"feddpd: error: checkpoint {out / 'checkpoint.pt'} was written by another config "
                   "(train_args.learning_rate: checkpoint has 0.1, config has 0.05); expected the same config to resume")


@pytest.mark.parametrize("method, key, value, matters", [
    ("FedAvg", "feddpd", ("tau", 0.7), False),            # FedAvg never reads feddpd:
    ("FedProx", "dpo_args", ("beta", 10.0), False),
    ("FedDPD", "feddpd", ("tau", 0.7), True),
    ("FedDiff", "feddpd", ("supplement_ratio", 2.0), True),  # its budget is FedDPD's
    ("FedDiff", "feddpd", ("tau", 0.7), False),
    ("FedDiff", "feddpd", ("decay", 0.5), True),             # the schedule is every supplement method's
    ("FedDiff", "feddpd", ("supplement_every", 7), False),    # ... but the exponential one has no period
    ("FedDPD", "feddpd", ("discrepancy", "kl"), False),       # read by selection: discrepancy only
    ("Oracle", "generator", ("sample_steps", 10), False),   # real held-out data, no generator
    ("Balance", "feddpd", ("supplement_ratio", 2.0), False),  # its budget is what flattening takes
    ("Balance", "feddpd", ("warmup_rounds", 40), True),
    ("FedAvg", "train_args", ("learning_rate", 0.05), True),
    ("FedDPD", "feddpd", ("keep_previous", 0.5), True),
    ("FedAvg", "feddpd", ("keep_previous", 0.5), False),
])
def test_a_finished_run_is_reused_only_while_what_its_method_reads_is_unchanged(method, key, value, matters):
    from fedml_feddpd.checkpoint import _run_identity
    from fedml_feddpd.config import load_config

    sections = load_config(os.path.join(ROOT, "configs", "digits_feddpd.yaml")).sections
    sections["train_args"]["federated_optimizer"] = method
    changed = {s: dict(body) for s, body in sections.items()}
    assert changed[key][value[0]] != value[1]  # a real change
    changed[key][value[0]] = value[1]
    assert (_run_identity(sections) != _run_identity(changed)) == matters


def test_feddpd_without_dpo_does_not_depend_on_the_dpo_keys():
    from fedml_feddpd.checkpoint import _run_identity
    from fedml_feddpd.config import load_config

    sections = load_config(os.path.join(ROOT, "configs", "digits_feddpd.yaml")).sections
    for off in ({"dpo": False}, {"selection": "random"}, {"dpo_rounds": 0}):
        base = {s: dict(body) for s, body in sections.items()}
        base["feddpd"].update(off)
        changed = {s: dict(body) for s, body in base.items()}
        changed["dpo_args"].update(max_steps=30, warm_start=False)
        changed["feddpd"].update(pairs="quantile", adapter_samples=5, disagreement_weight=2.0, pair_quantile=0.1)
        assert _run_identity(base) == _run_identity(changed)
        changed["feddpd"]["supplement_ratio"] = 0.9   # still read
        assert _run_identity(base) != _run_identity(changed)
    sections["feddpd"]["dpo_rounds"] = 1
    changed = {s: dict(body) for s, body in sections.items()}   # with DPO they matter
    changed["dpo_args"]["max_steps"] = 30
    assert _run_identity(sections) != _run_identity(changed)


def test_runs_recorded_before_a_key_existed_stay_valid_at_its_neutral_value():
    """checkpoint.ADDED_LATER: a finished run without feddpd.keep_previous is the run with keep_previous 0."""
    from fedml_feddpd.checkpoint import _run_identity
    from fedml_feddpd.config import load_config

    sections = json.loads(json.dumps(load_config(os.path.join(ROOT, "configs", "digits_feddpd.yaml")).sections))
    assert sections["feddpd"]["keep_previous"] == 0.0
    old = json.loads(json.dumps(sections))
    del old["feddpd"]["keep_previous"]
    assert _run_identity(sections) == _run_identity(old)
    sections["feddpd"]["keep_previous"] = 0.5
    assert _run_identity(sections) != _run_identity(old)
