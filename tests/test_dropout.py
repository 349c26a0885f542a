"""A gRPC client may drop out and come back (comm_args.round_timeout_s, train_args.min_clients_per_round).

Rounds go on with the clients that answered, FedAvg's weights renormalised over them; `metrics.json` lists
the others per round (`missing_clients`); a restarted client (same rank, same certificate) rejoins at the
next round start; an upload from an earlier round is dropped; fewer answers than min_clients_per_round stop
the run with one line. MPI and sp stay fail-fast: round_timeout_s > 0 there is a config error.
"""
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import OrderedDict
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from conftest import ROOT


def _env():
    return {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}


def _silo_config(config_dict, tmp_path, clients, rounds, **comm):
    raw = config_dict
    raw["common_args"]["training_type"] = "cross_silo"
    raw["comm_args"] = {"backend": "GRPC", "comm_timeout_s": 60, **comm}
    raw["train_args"].update(client_num_in_total=clients, client_num_per_round=clients, comm_round=rounds, epochs=1)
    cf = tmp_path / "run.yaml"
    cf.write_text(yaml.safe_dump(raw))
    return cf


class _SiloLocal:
    """`silo-local` in its own process group; the parties' pids and logs as it prints them."""

    def __init__(self, cf, out, cwd, parties):
        self.proc = subprocess.Popen([sys.executable, "-m", "fedml_feddpd", "silo-local", "--cf", str(cf), "--out",
                                      str(out), "--no-progress"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, cwd=cwd, env=_env(), start_new_session=True)
        self.pids, self.logs = {}, {}
        while len(self.pids) < parties:
            line = self.proc.stdout.readline()
            assert line, "silo-local ended before starting its parties: " + self.proc.stderr.read()[-2000:]
            m = re.search(r"rank (\d+) pid (\d+) log (\S+)", line)
            if m:
                self.pids[int(m[1])], self.logs[int(m[1])] = int(m[2]), Path(cwd) / m[3]

    def wait_for(self, rank, text, timeout=120):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.logs[rank].exists() and text in self.logs[rank].read_text():
                return
            assert self.proc.poll() is None, f"the run ended before rank {rank} logged {text!r}"
            time.sleep(0.1)
        pytest.fail(f"rank {rank} never logged {text!r}: " + self.logs[rank].read_text()[-2000:])

    def kill(self):
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)


# --- processes ---------------------------------------------------------------------------------------------
def test_a_killed_client_is_missed_then_rejoins(tmp_path, config_dict):
    """1 server + 3 clients; client rank 3 is SIGKILLed after it trained round 1, the rounds go on without it,
    then it is restarted with its own config and certificate and trains again; the run ends with status 0."""
    # a round without rank 3 lasts >= 1 s (silo_server.RETRY_DOWN_CLIENT_S): 80 rounds leave it a minute to restart
    cf = _silo_config(config_dict, tmp_path, clients=3, rounds=80, round_timeout_s=5)
    run, rejoined = _SiloLocal(cf, tmp_path / "out", tmp_path, parties=4), None
    try:
        run.wait_for(3, "trained round 1")
        os.kill(run.pids[3], signal.SIGKILL)
        run.wait_for(0, "goes on without client rank(s) 3")
        work = run.logs[0].parent  # silo-local's folder: each rank's config (with its certificate) and the ip config
        log = open(tmp_path / "rank3_again.log", "w")
        rejoined = subprocess.Popen([sys.executable, "-m", "fedml_feddpd", "silo", "--role", "client", "--rank", "3",
                                     "--cf", str(work / "config_rank3.yaml"), "--ipconfig",
                                     str(work / "grpc_ipconfig.csv"), "--no-progress"],
                                    stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path, env=_env(),
                                    start_new_session=True)
        stdout, stderr = run.proc.communicate(timeout=300)
        assert rejoined.wait(timeout=60) == 0, (tmp_path / "rank3_again.log").read_text()[-2000:]
    finally:
        run.kill()
        if rejoined is not None and rejoined.poll() is None:
            os.killpg(rejoined.pid, signal.SIGKILL)
    assert run.proc.returncode == 0, stdout[-2000:] + stderr[-3000:]
    assert "client rank 3 exited with status -9" in stderr  # reported, not fatal
    rounds = json.loads((tmp_path / "out" / "metrics.json").read_text())["rounds"]
    assert len(rounds) == 80
    missed = [r["round"] for r in rounds if 2 in r["missing_clients"]]  # rank 3 trains client 2
    back = [r["round"] for r in rounds if missed and r["round"] > missed[-1] and 2 in r["clients"]]
    assert missed and rounds[0]["clients"] == [0, 1, 2], rounds[:3]
    assert back and back[-1] == 79, (missed, back[:3])
    for r in rounds:
        assert sorted(r["clients"] + r["missing_clients"]) == [0, 1, 2]
        assert sorted(map(int, r["clients_trained_on"])) == r["clients"]


def test_fewer_answers_than_min_clients_per_round_stop_the_run(tmp_path, config_dict):
    """1 server + 1 client (the fewest processes): once the client is killed, no round has the 1 answer needed."""
    cf = _silo_config(config_dict, tmp_path, clients=1, rounds=400, round_timeout_s=5)
    run = _SiloLocal(cf, tmp_path / "out", tmp_path, parties=2)
    try:
        run.wait_for(1, "trained round 1")
        os.kill(run.pids[1], signal.SIGKILL)
        stdout, stderr = run.proc.communicate(timeout=120)
    finally:
        run.kill()
    assert run.proc.returncode == 1, stdout[-2000:] + stderr[-2000:]
    error = [ln for ln in stderr.splitlines() if ln.startswith("feddpd: error:")]
    assert len(error) == 1, stderr[-2000:]
    assert re.search(r"server rank 0 failed: round \d+: 0 of 1 clients answered within comm_args.round_timeout_s = 5 s "
                     r"\(missing client rank\(s\) 1\); train_args.min_clients_per_round is 1", error[0]), error[0]
    assert not (tmp_path / "out" / "metrics.json").exists()


# --- fast checks, no processes -------------------------------------------------------------------------------
@pytest.mark.parametrize("backend, training_type", [("MPI", "simulation"), ("sp", "simulation")])
def test_round_timeout_is_grpc_only(config_dict, backend, training_type, tmp_path, capsys):
    from fedml_feddpd.cli import main

    config_dict["common_args"]["training_type"] = training_type
    config_dict["comm_args"] = {"backend": backend, "round_timeout_s": 5}
    cf = tmp_path / "c.yaml"
    cf.write_text(yaml.safe_dump(config_dict))
    assert main(["run", "--cf", str(cf)]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"feddpd: error: comm_args.round_timeout_s: expected 0 with backend {backend} (only GRPC goes on without "
        f"silent clients; a failed rank stops the run), got 5"]


def test_dropout_keys_are_checked_and_neutral(make_config):
    from fedml_feddpd.checkpoint import _run_identity
    from fedml_feddpd.config import ConfigError

    cfg = make_config()
    assert (cfg["round_timeout_s"], cfg["min_clients_per_round"]) == (0.0, 1)
    for least, timeout, message in [(5, 0, "train_args.min_clients_per_round: expected at most client_num_per_round "
                                           "(4), got 5"),
                                    (0, 0, "train_args.min_clients_per_round: expected an integer >= 1, got 0"),
                                    (1, -1, "comm_args.round_timeout_s: expected a number in [0, inf), got -1")]:
        with pytest.raises(ConfigError, match=re.escape(message)):
            make_config(min_clients_per_round=least, round_timeout_s=timeout)
    # a checkpoint or finished run of an older config (no such keys) is the same run
    sections = json.loads(json.dumps(make_config(min_clients_per_round=1, round_timeout_s=0).sections))
    old = json.loads(json.dumps(sections))
    del old["train_args"]["min_clients_per_round"], old["comm_args"]["round_timeout_s"]
    assert _run_identity(sections) == _run_identity(old)


def _manager(round_idx, uploaded=(), reached=(1, 2, 3)):
    """A server manager with no transport: FedML's state of an open round."""
    from fedml_feddpd.distributed.silo_server import FedDPDSiloServerManager

    m = FedDPDSiloServerManager.__new__(FedDPDSiloServerManager)
    m.args = SimpleNamespace(round_idx=round_idx, client_num_per_round=3, client_num_in_total=3)
    m.client_real_ids, m.reached, m.round_timeout_s, m.min_clients = [1, 2, 3], set(reached), 5.0, 2
    m.rejected = set()
    m.aggregator = SimpleNamespace(flag_client_model_uploaded_dict={i: i + 1 in uploaded for i in range(3)})
    return m


def test_an_upload_from_an_earlier_round_is_dropped(capsys):
    from fedml.core.distributed.communication.message import Message

    from fedml_feddpd.distributed.common import KEY_ROUND

    m = _manager(4)
    late = Message("upload", 2, 0)
    late.add_params(KEY_ROUND, 3)
    m.handle_message_receive_model_from_client(late)  # touches nothing (no core, no aggregator calls)
    assert capsys.readouterr().err.splitlines() == [
        "feddpd: warning: server rank 0: dropped client rank 2's upload for round 3: round 4 is open (it came after "
        "comm_args.round_timeout_s)"]


def test_too_few_answers_is_one_line():
    from fedml_feddpd.errors import PartyTimeout

    with pytest.raises(PartyTimeout) as err:
        _manager(7, uploaded=(2,))._close_round()
    assert str(err.value) == ("round 7: 1 of 3 clients answered within comm_args.round_timeout_s = 5 s (missing client "
                              "rank(s) 1, 3); train_args.min_clients_per_round is 2")


def test_a_round_averages_only_its_uploads_with_renormalised_weights():
    from fedml_feddpd.distributed.common import fedavg_average
    from fedml_feddpd.distributed.silo_server import FedDPDSiloAggregator

    seen = {}
    inner = SimpleNamespace(on_before_aggregation=lambda ms: (ms, list(range(len(ms)))),
                            aggregate=fedavg_average, on_after_aggregation=lambda p: p,
                            set_model_params=lambda p: seen.setdefault("global", p))
    core = SimpleNamespace(round_clients=[4, 0, 7],
                           answered=lambda clients, missing: seen.update(clients=clients, missing=missing))
    agg = FedDPDSiloAggregator.__new__(FedDPDSiloAggregator)
    agg.aggregator, agg.core, agg.client_num = inner, core, 3
    agg.flag_client_model_uploaded_dict = {0: True, 1: False, 2: True}
    agg.sample_num_dict = {0: 30, 1: 1000, 2: 10}  # rank 2's 1000 samples are from an earlier round
    agg.model_dict = {i: OrderedDict(w=torch.full((2,), float(v))) for i, v in enumerate((1.0, 500.0, 5.0))}
    averaged, _, idxes = agg.aggregate()
    assert torch.equal(averaged["w"], torch.full((2,), 1.0 * 0.75 + 5.0 * 0.25))
    assert (seen["clients"], seen["missing"], idxes) == ([4, 7], [0], [0, 2])
    assert not any(agg.flag_client_model_uploaded_dict.values())
