"""`--resume` on the gRPC cross-silo backend: a FedDPD run killed with SIGKILL right after the checkpoint of
round k continues from it to the same metrics, bit for bit, as the uninterrupted gRPC run of the same config.

Two ways to stop and restart: the whole `silo-local` (launcher, server and clients) is killed and started
again with --resume, the clients afresh; or only the server is killed and restarted with
`silo --role server --resume` while its clients keep running and reconnect. Supplements are made before the
kill and after the resume; the kill points cover both a re-sent supplement (the loader's saved shuffle state
applies) and one made right before the kill (the client starts a fresh loader, as without the kill).
"""
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml

from conftest import ROOT, shrink, write_kill_hook
from conftest import hook_env as _env
from test_distributed import _gone, _strip

ROUNDS = 4  # supplements after rounds 0 and 2


@pytest.fixture(scope="module")
def grpc_reference(tmp_path_factory):
    """The tiny FedDPD config on gRPC (2 clients, 4 rounds, a tiny generator), run without interruption."""
    folder = tmp_path_factory.mktemp("silo_resume")
    raw = shrink(yaml.safe_load(open(os.path.join(ROOT, "configs", "digits_feddpd.yaml"))))
    raw["common_args"]["training_type"] = "cross_silo"
    raw["comm_args"] = {"backend": "GRPC", "comm_timeout_s": 120}
    raw["train_args"].update(client_num_in_total=2, client_num_per_round=2, comm_round=ROUNDS, epochs=2)
    raw["feddpd"].update(schedule="periodic", dpo_rounds=1, warmup_rounds=0, supplement_every=2, tau=0.0, bank_per_class=4,
                         delivery="client")  # supplements cross the wire
    raw["generator"].update(pretrain_steps=10, sample_steps=2, guidance_scale=1.0, block_out_channels=[8, 16],
                            norm_num_groups=4, attention_head_dim=8, cache_dir=str(folder / "gen"))
    raw["dpo_args"].update(max_steps=2, batch_size=2)
    raw["run_args"].update(baseline="none", generator_threads=1, checkpoint_every=1)
    cf = folder / "grpc.yaml"
    cf.write_text(yaml.safe_dump(raw))
    write_kill_hook(folder)
    proc = subprocess.run([sys.executable, "-m", "fedml_feddpd", "silo-local", "--cf", str(cf), "--out",
                           str(folder / "ref"), "--no-progress"], capture_output=True, text=True, cwd=folder,
                          env=_env(), timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    reference = json.loads((folder / "ref" / "metrics.json").read_text())
    assert reference["resumed_from_round"] is None
    supplied = [r["round"] for r in reference["rounds"] if r.get("supplements_produced")]
    assert supplied == [0, 2]
    return cf, reference, folder


def _checkpoint_round(path):
    return torch.load(path, map_location="cpu", weights_only=False)["round"]


def _check_resumed(resumed: dict, reference: dict, killed_at: int):
    assert resumed["resumed_from_round"] == killed_at
    assert resumed["final"] == reference["final"]  # exact
    assert _strip(resumed["rounds"]) == _strip(reference["rounds"])
    # the records of the rounds before the kill come from the checkpoint, with their traffic and reports
    for before, ref in zip(resumed["rounds"][:killed_at + 1], reference["rounds"]):
        # a supplement's encoded size varies by a few bytes between runs (its stats hold timings)
        sup = "down_supplement_bytes"
        assert {k: v for k, v in before["comm"].items() if k != sup} == {k: v for k, v in ref["comm"].items() if k != sup}
        assert abs(before["comm"][sup] - ref["comm"][sup]) < 100
        assert {c: r["supplement"] for c, r in before["clients_trained_on"].items()} == \
               {c: r["supplement"] for c, r in ref["clients_trained_on"].items()}
        assert before.get("supplements_produced") == ref.get("supplements_produced")
    # every client trained every round after the resume on what it would have trained on without the kill
    for after, ref in zip(resumed["rounds"][killed_at + 1:], reference["rounds"][killed_at + 1:]):
        assert {c: r["supplement"] for c, r in after["clients_trained_on"].items()} == \
               {c: r["supplement"] for c, r in ref["clients_trained_on"].items()}
        assert after.get("supplements_produced") == ref.get("supplements_produced")


def test_silo_local_killed_after_a_round_resumes_to_identical_metrics(grpc_reference):
    """The whole silo-local is SIGKILLed right after the checkpoint of round 1 (a supplement of round 0 is held);
    `silo-local --resume` starts every party again and ends with the uninterrupted run's metrics."""
    cf, reference, folder = grpc_reference
    out, kill_after = folder / "killed_local", 1
    proc = subprocess.Popen([sys.executable, "-m", "fedml_feddpd", "silo-local", "--cf", str(cf), "--out", str(out),
                             "--no-progress"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=folder,
                            env=_env(folder / "hooks", FEDDPD_TEST_KILL_AFTER=str(kill_after),
                                     FEDDPD_TEST_KILL_GROUP="group"), start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL, stdout[-2000:] + stderr[-2000:]
    pids = {int(r): int(p) for r, p in re.findall(r"rank (\d+) pid (\d+)", stdout)}
    time.sleep(0.5)
    assert sorted(pids) == [0, 1, 2] and all(_gone(p) for p in pids.values())
    assert _checkpoint_round(out / "checkpoint.pt") == kill_after
    assert sorted(os.listdir(out)) == ["INCOMPLETE", "checkpoint.pt"]
    assert "silo-local --cf CONFIG" in (out / "INCOMPLETE").read_text()

    proc = subprocess.run([sys.executable, "-m", "fedml_feddpd", "silo-local", "--cf", str(cf), "--out", str(out),
                           "--no-progress", "--resume"], capture_output=True, text=True, cwd=folder, env=_env(),
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert sorted(os.listdir(out)) == ["config.yaml", "metrics.json"]
    resumed = json.loads((out / "metrics.json").read_text())
    _check_resumed(resumed, reference, kill_after)
    # round 2 started with the supplement of round 0 sent again to each client
    assert resumed["rounds"][kill_after + 1]["comm"]["down_supplement_bytes"] > 0

    # a finished run resumed again: read back, no party started
    proc = subprocess.run([sys.executable, "-m", "fedml_feddpd", "silo-local", "--cf", str(cf), "--out", str(out),
                           "--no-progress", "--resume"], capture_output=True, text=True, cwd=folder, env=_env(),
                          timeout=120)
    assert proc.returncode == 0 and "pid" not in proc.stdout, proc.stdout[-2000:] + proc.stderr[-2000:]


def _party(cf, role, rank, ipconfig, out, env, log, *extra):
    cmd = [sys.executable, "-m", "fedml_feddpd", "silo", "--role", role, "--rank", str(rank), "--cf", str(cf),
           "--ipconfig", str(ipconfig), "--no-progress", *extra]
    if role == "server":
        cmd += ["--out", str(out)]
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=os.path.dirname(cf), env=env)


@pytest.mark.slow
def test_server_killed_and_restarted_while_its_clients_wait(grpc_reference):
    """Only the server is SIGKILLed, right after the checkpoint of round 0 (which made the supplements of
    round 1); its clients keep running, and `silo --role server --resume` takes them on from round 1."""
    from fedml_feddpd.distributed.ipconfig import generate_ipconfig

    cf, reference, folder = grpc_reference
    work = folder / "server_only"
    work.mkdir()
    ipconfig, out, kill_after = generate_ipconfig(work, 3), work / "out", 0
    logs = {name: open(work / f"{name}.log", "w") for name in ("server", "server2", "client1", "client2")}
    procs = {}
    try:
        procs["server"] = _party(cf, "server", 0, ipconfig, out, _env(folder / "hooks", FEDDPD_TEST_KILL_AFTER="0"),
                                 logs["server"])
        for rank in (1, 2):
            procs[rank] = _party(cf, "client", rank, ipconfig, out, _env(), logs[f"client{rank}"])
        assert procs["server"].wait(timeout=600) == -signal.SIGKILL, (work / "server.log").read_text()[-3000:]
        assert _checkpoint_round(out / "checkpoint.pt") == kill_after
        assert all(procs[r].poll() is None for r in (1, 2))  # waiting for the server
        procs["server2"] = _party(cf, "server", 0, ipconfig, out, _env(), logs["server2"], "--resume")
        assert procs["server2"].wait(timeout=600) == 0, (work / "server2.log").read_text()[-3000:]
        for rank in (1, 2):
            assert procs[rank].wait(timeout=60) == 0, (work / f"client{rank}.log").read_text()[-3000:]
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()
        for fh in logs.values():
            fh.close()
    resumed = json.loads((out / "metrics.json").read_text())
    _check_resumed(resumed, reference, kill_after)
    # each client trained rounds 0 .. 3 once: the resumed server sent round 1, not round 0 again
    for rank in (1, 2):
        trained = re.findall(r"trained round (\d+)", (work / f"client{rank}.log").read_text())
        assert trained == ["0", "1", "2", "3"], trained


def test_resume_refusals_are_one_line(tmp_path, config_dict, capsys):
    """silo-local --resume of a checkpoint of another config stops before any party starts (MPI's refusals:
    test_resume_mpi.py)."""
    from fedml_feddpd.checkpoint import CHECKPOINT, FORMAT, _run_identity
    from fedml_feddpd.cli import main
    from fedml_feddpd.config import validate

    raw = config_dict
    raw["common_args"]["training_type"] = "cross_silo"
    raw["comm_args"] = {"backend": "GRPC"}
    cf = tmp_path / "run.yaml"
    cf.write_text(yaml.safe_dump(raw))
    out = tmp_path / "half"
    out.mkdir()
    torch.save({"format": FORMAT, "config": _run_identity(validate(raw, str(cf)).sections), "round": 0},
               out / CHECKPOINT)
    raw["train_args"]["learning_rate"] = 0.05
    cf.write_text(yaml.safe_dump(raw))
    assert main(["silo-local", "--cf", str(cf), "--out", str(out), "--resume", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == (f"feddpd: error: checkpoint {out / 'checkpoint.pt'} was written by another config "
                   "(train_args.learning_rate: checkpoint has 0.1, config has 0.05); expected the same config to resume")
    assert sorted(os.listdir(out)) == ["checkpoint.pt"]
