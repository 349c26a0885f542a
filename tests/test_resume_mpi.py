"""`--resume` on the MPI backend: an `mpirun` FedDPD job killed right after rank 0's checkpoint of round 1 (the
whole mpirun process group, SIGKILL) is started again with the same command plus --resume and ends with the
uninterrupted MPI run's metrics, bit for bit.

Every rank starts afresh on resume: the clients get the round, the model, the newest supplement (made after
round 0, so the saved shuffle state of its loader applies) and their saved loader/RNG state from rank 0's first
message. The same job is then killed after the last round's checkpoint, before its outputs (resume writes them
without training), and resumed once more when finished (read back). That test is slow (three FedDPD jobs and
two short ones, ~160 s on 2 cores); a 2-round FedAvg job killed after round 0 is the fast variant. Refusals
stay one line from rank 0. Without mpirun and mpi4py these tests skip, unless FEDDPD_REQUIRE_MPI is set.
"""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml

from conftest import hook_env as _env
from conftest import write_kill_hook
from test_distributed import _mpirun, _strip, _tiny_feddpd

ROUNDS = 3  # a supplement after round 0; the kill after round 1 resumes into round 2 with it sent again


def _mpi(cf, out, *extra):
    return [_mpirun(), "--allow-run-as-root", "--oversubscribe", "--mca", "btl", "self,vader",
            "--mca", "btl_vader_single_copy_mechanism", "none", "-np", "3",
            sys.executable, "-m", "fedml_feddpd", "run", "--cf", str(cf), "--out", str(out), "--no-progress", *extra]


def _session(sid: int) -> list:
    """The live (not zombie) processes of session `sid`."""
    found = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[3]) == sid and fields[0] != "Z":
            found.append(int(entry))
    return found


def _run(cmd, cwd, env, timeout=480):
    """Run an mpirun job in a session of its own (the kill hook SIGKILLs mpirun's group); afterwards no rank of it
    may be left, within a few seconds (ranks of a killed mpirun notice it is gone)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd, env=env,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        deadline = time.monotonic() + 20
        while _session(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        left = _session(proc.pid)
        for pid in left:
            os.kill(pid, signal.SIGKILL)
    assert not left, f"ranks left running after mpirun ended: {left}"
    return proc.returncode, stdout, stderr


def _round(path):
    return torch.load(path, map_location="cpu", weights_only=False)["round"]


@pytest.mark.slow
def _reference(tmp_path, raw):
    """Write the config and the kill hook, run the job uninterrupted; (config path, its metrics)."""
    cf = tmp_path / "mpi.yaml"
    cf.write_text(yaml.safe_dump(raw))
    write_kill_hook(tmp_path)
    code, stdout, stderr = _run(_mpi(cf, tmp_path / "ref"), tmp_path, _env())
    assert code == 0, stdout[-3000:] + stderr[-3000:]
    return cf, json.loads((tmp_path / "ref" / "metrics.json").read_text())


def test_mpi_job_killed_after_a_round_resumes_to_identical_metrics(tmp_path):
    _mpirun()
    raw = _tiny_feddpd(tmp_path / "gen")
    raw["comm_args"] = {"backend": "MPI"}
    raw["train_args"].update(comm_round=ROUNDS, epochs=2)
    raw["feddpd"].update(schedule="periodic", supplement_every=2, dpo_rounds=1)
    raw["run_args"].update(checkpoint_every=1, generator_threads=1)
    cf, reference = _reference(tmp_path, raw)
    assert reference["resumed_from_round"] is None
    assert [r["round"] for r in reference["rounds"] if r.get("supplements_produced")] == [0]

    out, kill_after = tmp_path / "killed", 1
    code, stdout, stderr = _run(_mpi(cf, out), tmp_path, _env(tmp_path / "hooks", FEDDPD_TEST_KILL_AFTER=str(kill_after),
                                                              FEDDPD_TEST_KILL_GROUP="session"))
    assert code == -signal.SIGKILL, stdout[-2000:] + stderr[-2000:]
    assert _round(out / "checkpoint.pt") == kill_after
    assert sorted(os.listdir(out)) == ["INCOMPLETE", "checkpoint.pt"]
    assert "mpirun -np 3 python -m fedml_feddpd run --cf CONFIG" in (out / "INCOMPLETE").read_text()

    # resumed, and killed again right after the last round's checkpoint, before the outputs are written
    code, stdout, stderr = _run(_mpi(cf, out, "--resume"), tmp_path,
                                _env(tmp_path / "hooks", FEDDPD_TEST_KILL_AFTER=str(ROUNDS - 1),
                                     FEDDPD_TEST_KILL_GROUP="session"))
    assert code == -signal.SIGKILL, stdout[-2000:] + stderr[-2000:]
    assert _round(out / "checkpoint.pt") == ROUNDS - 1
    assert len(torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=False)["records"]) == ROUNDS

    # nothing left to train: rank 0 writes the outputs, the clients stop at once
    code, stdout, stderr = _run(_mpi(cf, out, "--resume"), tmp_path, _env())
    assert code == 0, stdout[-3000:] + stderr[-3000:]
    assert sorted(os.listdir(out)) == ["config.yaml", "metrics.json"]
    resumed = json.loads((out / "metrics.json").read_text())
    assert resumed["backend"] == "MPI" and resumed["resumed_from_round"] == ROUNDS - 1
    assert resumed["final"] == reference["final"]  # exact
    assert _strip(resumed["rounds"]) == _strip(reference["rounds"])
    for after, ref in zip(resumed["rounds"], reference["rounds"]):
        # each client trained each round on the supplement it held without the kill, and got the same ones
        assert {c: r["supplement"] for c, r in after["clients_trained_on"].items()} == \
               {c: r["supplement"] for c, r in ref["clients_trained_on"].items()}
        assert after.get("supplements_produced") == ref.get("supplements_produced")
    # the resumed round 2 started with round 0's supplement sent again to each client (a fresh rank holds none)
    assert resumed["rounds"][kill_after + 1]["comm"]["down_supplement_bytes"] > 0
    assert reference["rounds"][kill_after + 1]["comm"]["down_supplement_bytes"] == 0

    # a finished run resumed again: read back on rank 0, nothing trained
    code, stdout, stderr = _run(_mpi(cf, out, "--resume"), tmp_path, _env(), timeout=240)
    assert code == 0 and "final top-1" in stdout, stdout[-2000:] + stderr[-2000:]
    assert json.loads((out / "metrics.json").read_text()) == resumed


def test_mpi_resume_refusal_is_one_line_from_rank_0(tmp_path, config_dict):
    """mpirun ... --resume of a checkpoint of another config: rank 0 says so in one line, before any data is
    loaded; the client ranks are told by broadcast and stop (none waits for a server that left)."""
    from fedml_feddpd.checkpoint import CHECKPOINT, FORMAT, _run_identity
    from fedml_feddpd.config import validate

    _mpirun()
    raw = config_dict
    raw["comm_args"] = {"backend": "MPI"}
    raw["train_args"].update(client_num_in_total=2, client_num_per_round=2)
    cf = tmp_path / "run.yaml"
    cf.write_text(yaml.safe_dump(raw))
    out = tmp_path / "half"
    out.mkdir()
    torch.save({"format": FORMAT, "config": _run_identity(validate(raw, str(cf)).sections), "round": 0},
               out / CHECKPOINT)
    raw["train_args"]["learning_rate"] = 0.05
    cf.write_text(yaml.safe_dump(raw))
    code, stdout, stderr = _run(_mpi(cf, out, "--resume"), tmp_path, _env(), timeout=240)
    assert code != 0
    ours = [line for line in (stdout + stderr).splitlines() if line.startswith("feddpd:")]
    assert ours == [f"feddpd: error: checkpoint {out / 'checkpoint.pt'} was written by another config "
                    "(train_args.learning_rate: checkpoint has 0.1, config has 0.05); expected the same config to "
                    "resume"], stdout[-2000:] + stderr[-2000:]
    assert sorted(os.listdir(out)) == ["checkpoint.pt"]


def test_mpi_fedavg_job_killed_after_round_0_resumes_to_identical_metrics(tmp_path, config_dict):
    """The fast variant: FedAvg (no generator, no supplement), 2 rounds, the job killed after round 0's checkpoint
    and resumed: the fresh clients take round 1 and their loader/RNG state from rank 0's first message."""
    _mpirun()
    raw = config_dict
    raw["comm_args"] = {"backend": "MPI"}
    raw["train_args"].update(client_num_in_total=2, client_num_per_round=2, comm_round=2, epochs=2)
    raw["run_args"].update(checkpoint_every=1)
    cf, reference = _reference(tmp_path, raw)

    out = tmp_path / "killed"
    code, stdout, stderr = _run(_mpi(cf, out), tmp_path, _env(tmp_path / "hooks", FEDDPD_TEST_KILL_AFTER="0",
                                                              FEDDPD_TEST_KILL_GROUP="session"))
    assert code == -signal.SIGKILL, stdout[-2000:] + stderr[-2000:]
    assert _round(out / "checkpoint.pt") == 0
    code, stdout, stderr = _run(_mpi(cf, out, "--resume"), tmp_path, _env())
    assert code == 0, stdout[-3000:] + stderr[-3000:]
    resumed = json.loads((out / "metrics.json").read_text())
    assert resumed["resumed_from_round"] == 0
    assert resumed["final"] == reference["final"]  # exact
    assert _strip(resumed["rounds"]) == _strip(reference["rounds"])
