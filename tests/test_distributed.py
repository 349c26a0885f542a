"""FedDPD on FedML's MPI simulation and gRPC cross-silo backends, as real processes.

Each backend runs a 2-round, 2-client FedDPD config and must give the same rounds as the sp run of the
same config (bit-identical: same averaging formula and client order, same per-client shuffle streams),
and each client must have trained on the supplement the server produced for it. Another test kills a
client mid-run and checks the server stops within `comm_timeout_s`, naming the rank, with no process left.
"""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import yaml

from conftest import ROOT, shrink

TIMING = ("client_seconds", "server_seconds", "wall_seconds", "server_stage_seconds", "seconds",
          "steps_per_second")
DISTRIBUTED_ONLY = ("comm", "clients_trained_on", "supplements_produced")


def _strip(obj):
    if isinstance(obj, dict):
        return {k: _strip(v) for k, v in obj.items() if k not in TIMING + DISTRIBUTED_ONLY}
    if isinstance(obj, list):
        return [_strip(v) for v in obj]
    return obj


def _env():
    return {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}


def _tiny_feddpd(cache_dir) -> dict:
    raw = shrink(yaml.safe_load(open(os.path.join(ROOT, "configs", "digits_feddpd.yaml"))))
    raw["train_args"].update(client_num_in_total=2, client_num_per_round=2)
    # delivery: client, so supplements cross the wire (FedDPD's own default, server, sends clients nothing)
    raw["feddpd"].update(dpo_rounds=1, warmup_rounds=0, supplement_every=1, tau=0.0, bank_per_class=4,
                         delivery="client")
    raw["generator"].update(pretrain_steps=5, sample_steps=3, cache_dir=str(cache_dir))
    raw["dpo_args"].update(max_steps=2, batch_size=2)
    raw["run_args"]["baseline"] = "none"
    return raw


def _write(raw, path):
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture(scope="module")
def sp_reference(tmp_path_factory):
    """The sp run of the tiny config: the run every backend must reproduce."""
    from fedml_feddpd.config import validate
    from fedml_feddpd.runner import run

    folder = tmp_path_factory.mktemp("dist")
    raw = _tiny_feddpd(folder / "gen")
    result = run(validate(raw, "tiny.yaml"), folder / "sp", show_progress=False)
    return raw, result, folder


def _check_same_as_sp(sp: dict, dist: dict, backend: str):
    assert dist["backend"] == backend
    assert dist["final"] == sp["final"]  # exact: same numbers, not just close
    assert _strip(dist["rounds"]) == _strip(sp["rounds"])
    # Each client trained round 1 on exactly the supplement the server produced for it after round 0 ...
    produced = dist["rounds"][0]["supplements_produced"]
    trained = dist["rounds"][1]["clients_trained_on"]
    assert set(produced) == set(trained) == {"0", "1"}
    for cid in ("0", "1"):
        assert trained[cid]["client"] == int(cid)
        assert trained[cid]["supplement"] == produced[cid]
        # ... which is what the sp server step chose for that client
        sp_sup = sp["rounds"][0]["server_step"]["supplements"][cid]
        assert (produced[cid]["size"], produced[cid]["classes"]) == (sp_sup["size"], sp_sup["classes"])
        assert dist["rounds"][0]["clients_trained_on"][cid]["supplement"] is None
    assert produced["0"]["sha256"] != produced["1"]["sha256"]  # each client got its own
    # model bytes every round, supplement bytes only with the round that follows a supplement
    assert dist["rounds"][0]["comm"]["down_supplement_bytes"] == 0
    assert dist["rounds"][1]["comm"]["down_supplement_bytes"] > 0
    assert all(r["comm"]["down_model_bytes"] > 100_000 and r["comm"]["up_model_bytes"] > 100_000
               for r in dist["rounds"])


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:  # a zombie (exited, not yet reaped by its parent) counts as gone
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(")")[-1].split()[0] == "Z"
    except OSError:
        return True


def _mpirun():
    exe = shutil.which("mpirun")
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        exe = None
    if exe is None:
        if os.environ.get("FEDDPD_REQUIRE_MPI"):
            pytest.fail("mpirun and mpi4py are required here (.ci/run installs them)")
        pytest.skip("needs mpirun and mpi4py: apt-get install openmpi-bin libopenmpi-dev; pip install mpi4py")
    return exe


def test_mpi_feddpd_matches_sp(sp_reference):
    raw, sp, folder = sp_reference
    raw = json.loads(json.dumps(raw))
    raw["comm_args"] = {"backend": "MPI"}
    cf, out = _write(raw, folder / "mpi.yaml"), folder / "mpi"
    cmd = [_mpirun(), "--allow-run-as-root", "--oversubscribe", "--mca", "btl", "self,vader",
           "--mca", "btl_vader_single_copy_mechanism", "none", "-np", "3",
           sys.executable, "-m", "fedml_feddpd", "run", "--cf", str(cf), "--out", str(out), "--no-progress"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=folder, env=_env(), timeout=480)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "FedDPD on digits (seed 0): final top-1" in proc.stdout
    _check_same_as_sp(sp, json.loads((out / "metrics.json").read_text()), "MPI")


def _silo_local(cf, out, cwd):
    return subprocess.Popen([sys.executable, "-m", "fedml_feddpd", "silo-local", "--cf", str(cf), "--out", str(out),
                             "--no-progress"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd,
                            env=_env(), start_new_session=True)


def _run_silo_local(raw: dict, folder, name: str):
    """`raw` as a gRPC cross-silo run of silo-local in `folder`, to its end (exit 0): (stdout, output folder);
    no party outlives a timeout."""
    raw["common_args"]["training_type"] = "cross_silo"
    raw["comm_args"] = {"backend": "GRPC", "comm_timeout_s": 120}
    cf, out = _write(raw, folder / f"{name}.yaml"), folder / name
    proc = _silo_local(cf, out, folder)
    try:
        stdout, stderr = proc.communicate(timeout=480)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, stdout[-3000:] + stderr[-3000:]
    return stdout, out


def _pids(stdout: str) -> dict:
    return {int(r): int(p) for r, p in re.findall(r"rank (\d+) pid (\d+)", stdout)}


def test_grpc_feddpd_matches_sp(sp_reference):
    raw, sp, folder = sp_reference
    stdout, out = _run_silo_local(json.loads(json.dumps(raw)), folder, "grpc")
    assert "backend GRPC): final top-1" in stdout
    pids = _pids(stdout)
    assert sorted(pids) == [0, 1, 2]
    assert all(_gone(p) for p in pids.values())  # no party outlives silo-local
    _check_same_as_sp(sp, json.loads((out / "metrics.json").read_text()), "GRPC")


def test_grpc_server_delivery_matches_sp(tmp_path):
    """FedDPD's default delivery (server) across processes: the server trains each upload on its supplement before
    averaging, as on sp, bit for bit, and no supplement byte goes down to a client."""
    from fedml_feddpd.config import validate
    from fedml_feddpd.runner import run

    raw = _tiny_feddpd(tmp_path / "gen")
    raw["feddpd"].update(delivery="server", dpo_rounds=0)
    sp = run(validate(json.loads(json.dumps(raw)), "tiny.yaml"), tmp_path / "sp", show_progress=False)
    _, out = _run_silo_local(raw, tmp_path, "grpc")
    dist = json.loads((out / "metrics.json").read_text())
    assert dist["backend"] == "GRPC" and dist["final"] == sp["final"]
    assert _strip(dist["rounds"]) == _strip(sp["rounds"])
    assert sp["rounds"][0]["server_step"]["supplements"]  # the server did supply (and train on) something
    assert all(r["comm"]["down_supplement_bytes"] == 0 for r in dist["rounds"])


def test_grpc_killed_client_stops_the_server_within_the_timeout(tmp_path, config_dict):
    """FedAvg over many rounds; client rank 2 is SIGKILLed once it has trained; the server must stop on
    its own with a one-line error naming rank 2 within comm_timeout_s, and no party may remain."""
    raw = config_dict
    raw["common_args"]["training_type"] = "cross_silo"
    raw["comm_args"] = {"backend": "GRPC", "comm_timeout_s": 8}
    raw["train_args"].update(client_num_in_total=2, client_num_per_round=2, comm_round=500, epochs=1)
    cf = _write(raw, tmp_path / "kill.yaml")
    proc = _silo_local(cf, tmp_path / "out", tmp_path)
    pids, logs, lines = {}, {}, []
    try:
        deadline = time.monotonic() + 240
        while len(pids) < 3 and time.monotonic() < deadline:  # silo-local prints each party's pid and log
            line = proc.stdout.readline()
            assert line, "silo-local ended before starting its parties: " + proc.stderr.read()[-2000:]
            lines.append(line)
            m = re.search(r"rank (\d+) pid (\d+) log (\S+)", line)
            if m:
                pids[int(m[1])], logs[int(m[1])] = int(m[2]), m[3]
        while time.monotonic() < deadline:
            if os.path.exists(logs[2]) and "trained round 2" in open(logs[2]).read():
                break
            assert proc.poll() is None, "the run ended before the client could be killed"
            time.sleep(0.2)
        else:
            pytest.fail("client rank 2 never trained: " + open(logs[2]).read()[-2000:])
        os.kill(pids[2], signal.SIGKILL)
        killed = time.monotonic()
        stdout, stderr = proc.communicate(timeout=90)
        elapsed = time.monotonic() - killed
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 1, stdout[-2000:] + stderr[-2000:]
    error = [ln for ln in stderr.splitlines() if ln.startswith("feddpd: error:")]
    assert len(error) == 1 and "client rank 2" in error[0] and "comm_timeout_s" in error[0], stderr[-2000:]
    assert elapsed < 8 + 20, elapsed  # the timeout, plus a loaded machine's slack
    time.sleep(1)
    assert all(_gone(p) for p in pids.values()), {r: _gone(p) for r, p in pids.items()}


# --- fast checks, no processes ------------------------------------------------------------------------
def _csv(tmp_path, rows, header="eid,rank,grpc_server_ip,grpc_server_port"):
    path = tmp_path / "ip.csv"
    path.write_text("\n".join([header] + rows) + "\n")
    return path


@pytest.mark.parametrize("rows, message", [
    (["0,0,127.0.0.1,9000", "1,1,127.0.0.1,9001", "1,1,127.0.0.1,9002"], "rank 1 appears twice"),
    (["0,0,127.0.0.1,9000", "1,1,127.0.0.1,9001"], "rank(s) 2 missing"),
    (["0,0,127.0.0.1,9000", "1,1,127.0.0.1,70000", "2,2,127.0.0.1,9002"], "grpc_server_port '70000' is not a port"),
    (["0,0,127.0.0.1,9000", "1,1,127.0.0.1,abc", "2,2,127.0.0.1,9002"], "grpc_server_port 'abc' is not a port"),
    (["0,0,127.0.0.1,9000", "1,2,127.0.0.1,9001", "2,2,127.0.0.1,9002"], "eid 1 differs from rank 2"),
    (["0,0,localhost,9000", "1,1,127.0.0.1,9001", "2,2,127.0.0.1,9002"], "'localhost' is not an IP address"),
    (["0,0,127.0.0.1,9000", "1,1,127.0.0.1,9000", "2,2,127.0.0.1,9002"], "ranks 0 and 1 share 127.0.0.1:9000"),
])
def test_bad_ipconfig_is_a_one_line_error(tmp_path, rows, message):
    from fedml_feddpd.config import ConfigError
    from fedml_feddpd.distributed.ipconfig import read_ipconfig

    path = _csv(tmp_path, rows)
    with pytest.raises(ConfigError) as err:
        read_ipconfig(path, 3)
    text = str(err.value)
    assert message in text and str(path) in text and "\n" not in text


def test_ipconfig_missing_column_and_user_addresses(tmp_path):
    from fedml_feddpd.config import ConfigError
    from fedml_feddpd.distributed.ipconfig import read_ipconfig

    with pytest.raises(ConfigError, match="missing column"):
        read_ipconfig(_csv(tmp_path, ["0,0,127.0.0.1"], header="eid,rank,grpc_server_ip"), 1)
    # a non-loopback address is fine when the user wrote it
    table = read_ipconfig(_csv(tmp_path, ["0,0,10.1.2.3,9000", "1,1,10.1.2.4,9000"]), 2)
    assert table == {0: ("10.1.2.3", 9000), 1: ("10.1.2.4", 9000)}


def test_generated_ipconfig_is_loopback_with_free_distinct_ports(tmp_path):
    from fedml_feddpd.distributed.ipconfig import generate_ipconfig, read_ipconfig

    table = read_ipconfig(generate_ipconfig(tmp_path, 4), 4)
    assert sorted(table) == [0, 1, 2, 3]
    assert {ip for ip, _ in table.values()} == {"127.0.0.1"}
    assert len({port for _, port in table.values()}) == 4


@pytest.mark.parametrize("overrides, message", [
    ({("comm_args", "backend"): "GRPC"}, "comm_args.backend: training_type simulation runs on sp or MPI, got 'GRPC'"),
    ({("common_args", "training_type"): "cross_silo"}, "comm_args.backend: training_type cross_silo runs on GRPC"),
    ({("comm_args", "backend"): "MPI", ("train_args", "federated_optimizer"): "FedProx"},
     "train_args.federated_optimizer: backend MPI runs FedAvg, FedDPD, FedDiff, Balance, Oracle"),
    ({("comm_args", "backend"): "MPI", ("run_args", "baseline"): "FedAvg"},
     "run_args.baseline: expected none with backend MPI"),
    ({("comm_args", "comm_timeout_s"): 0}, "comm_args.comm_timeout_s: expected a number in (0, inf)"),
])
def test_backend_config_errors(config_dict, overrides, message):
    from fedml_feddpd.config import ConfigError, validate

    for (section, key), value in overrides.items():
        config_dict.setdefault(section, {})[key] = value
    with pytest.raises(ConfigError) as err:
        validate(config_dict, "t.yaml")
    assert message in str(err.value)


def test_silo_rejects_a_wrong_rank(tmp_path, config_dict):
    config_dict["common_args"]["training_type"] = "cross_silo"
    config_dict["comm_args"] = {"backend": "GRPC"}
    cf = _write(config_dict, tmp_path / "s.yaml")
    proc = subprocess.run([sys.executable, "-m", "fedml_feddpd", "silo", "--role", "client", "--rank", "9",
                           "--cf", str(cf)], capture_output=True, text=True, env=_env(), timeout=120)
    assert proc.returncode == 2
    assert "feddpd: error: --rank 9: expected a client rank in 1..4" in proc.stderr
