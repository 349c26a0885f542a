"""The gRPC cross-silo transport is safe to expose: nothing executable crosses the network (wire.py) and
every party is authenticated by mutual TLS (tls.py, silo_transport.py).

Messages round-trip bit for bit without pickle; a pickle payload executes nothing; `feddpd certs` makes one
certificate per rank; a caller without a certificate from the run's CA is refused at the handshake; a
certified peer that sends a crafted pickle or claims another rank is dropped with one line and the run
finishes; plaintext off the loopback interface needs `comm_args.allow_insecure`.
"""
import csv
import json
import math
import os
import pickle
import re
import signal
import struct
import subprocess
import sys
import time
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
import yaml

from conftest import ROOT


class Evil:
    """Unpickling this runs `touch <marker>`."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _same(a, b, where="value"):
    """Equal values of the same types; tensors equal in dtype, shape and every byte (NaN payloads too)."""
    assert type(a) is type(b), f"{where}: {type(a)} != {type(b)}"
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape, where
        assert a.contiguous().numpy().tobytes() == b.contiguous().numpy().tobytes(), where
    elif isinstance(a, float):
        assert struct.pack("<d", a) == struct.pack("<d", b), where
    elif isinstance(a, dict):
        assert list(a) == list(b), where
        for k in a:
            _same(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _same(x, y, f"{where}[{i}]")
    elif hasattr(a, "__dataclass_fields__"):
        for name in a.__dataclass_fields__:
            _same(getattr(a, name), getattr(b, name), f"{where}.{name}")
    else:
        assert a == b, where


def _model_state():
    from fedml_feddpd.models.cnn_digits import CNNDigits

    torch.manual_seed(0)
    state = CNNDigits(10).state_dict()
    weird = torch.tensor([0.0, -0.0, float("nan"), float("inf"), 1e-45, 3.4e38])
    weird[2] = struct.unpack("<f", b"\x01\x00\xc0\x7f")[0]  # a NaN with a payload
    state["weird"], state["num_batches_tracked"] = weird, torch.tensor(7)
    state["half"], state["empty"] = torch.randn(3).half(), torch.empty(0, 4)
    return state


def _messages():
    """One of each message our gRPC managers and FedML's cross-silo managers send."""
    from fedml.core.distributed.communication.message import Message
    from fedml.cross_silo.server.message_define import MyMessage as M

    from fedml_feddpd.distributed.common import KEY_TRAINED_ON
    from fedml_feddpd.distributed.silo_transport import MSG_TYPE_HEARTBEAT
    from fedml_feddpd.supplement import Supplement

    state = _model_state()
    pool = torch.rand(6, 1, 8, 8)
    sup = Supplement(pool[1:4], torch.tensor([3, 3, 7]), {"budget": 3, "size": 3, "allocation": [0, 2, 1],
                                                          "classes": [0, 0, 0, 2, 0, 0, 0, 1, 0, 0], "dpo_pairs": 4,
                                                          "dpo": {"loss": 0.693, "steps": 2}})
    payload = {0: {"client": 0, "model": state, "supplement": sup}, 1: {"client": 1, "model": state, "supplement": None}}
    out = []

    def msg(kind, sender, receiver, **params):
        m = Message(kind, sender, receiver)
        for k, v in params.items():
            m.add_params(k, v)
        m.add_params("sender_rank", sender)
        m.add_params("sender_ip", "127.0.0.1")
        m.add_params("sender_port", 8890 + sender)
        out.append(m)

    msg(M.MSG_TYPE_S2C_INIT_CONFIG, 0, 1, model_params=state, client_idx="0", client_os="PythonClient")
    msg(M.MSG_TYPE_S2C_SYNC_MODEL_TO_CLIENT, 0, 1, model_params=payload[0], client_idx="0", client_os="PythonClient")
    msg(M.MSG_TYPE_S2C_SYNC_MODEL_TO_CLIENT, 0, 2, model_params=payload, client_idx="1")
    msg(M.MSG_TYPE_S2C_CHECK_CLIENT_STATUS, 0, 1, client_idx="0")
    msg(M.MSG_TYPE_S2C_FINISH, 0, 2, client_idx="1")
    msg(M.MSG_TYPE_C2S_CLIENT_STATUS, 1, 0, client_status="ONLINE", client_os="Linux")
    msg(M.MSG_TYPE_C2S_CLIENT_STATUS, 2, 0, client_status="FINISHED", client_os="Linux")
    report = {"client": 1, "seconds": 0.1 + 0.2, "supplement": {"size": 3, "sha256": "ab" * 32, "classes": [0, 3]}}
    msg(M.MSG_TYPE_C2S_SEND_MODEL_TO_SERVER, 1, 0, model_params=state, num_samples=137,
        **{KEY_TRAINED_ON: report, "extras": (1, -0.0, float("nan"), None, [True, "x"])})
    msg(M.MSG_TYPE_C2S_SEND_MODEL_TO_SERVER, 2, 0, model_params=state, num_samples=40,
        **{KEY_TRAINED_ON: {"client": 0, "seconds": 1.5, "supplement": None}})
    msg(MSG_TYPE_HEARTBEAT, 2, 0)
    return out


def test_every_message_shape_round_trips_bit_for_bit():
    from fedml_feddpd.distributed.wire import decode_message, encode_message

    for m in _messages():
        data = encode_message(m)
        assert data[:4] == b"FDPD"
        back = decode_message(data)
        assert (back.type, back.sender_id, back.receiver_id) == (m.type, m.sender_id, m.receiver_id)
        _same(m.msg_params, back.msg_params, f"message {m.type}")
    # the decoded payload is what the client trainer expects: a plain dict whose model is an OrderedDict
    payload = decode_message(encode_message(_messages()[1])).get("model_params")
    assert type(payload) is dict and type(payload["model"]) is OrderedDict
    payload["supplement"].images.add_(1)  # decoded tensors own their memory


def test_a_pickle_decodes_to_nothing_and_runs_nothing(tmp_path):
    from fedml.core.distributed.communication.message import Message

    from fedml_feddpd.distributed.wire import WireError, decode_message, encode_message

    live, marker = tmp_path / "live", tmp_path / "marker"
    pickle.loads(pickle.dumps(Evil(live)))  # the payload is real: unpickling runs it
    assert live.exists()
    crafted = [pickle.dumps(Evil(marker)), pickle.dumps(Message("x", 1, 0)),
               b"FDPD\x01" + pickle.dumps(Evil(marker)),  # a pickle behind our magic
               b"FDPD\x02\x00\x00\x00\x02{}", b"FDPD\x01\xff\xff\xff\xff{}", b"", b"FDPD"]
    good = encode_message(Message("x", 1, 0))
    crafted += [good[:-3], good.replace(b'"sender":1', b'"sender":"1"'),
                good.replace(b'"sender":1', b'"sender":{"$pickle":"gASV"}')]
    with_tensor = Message("x", 1, 0)
    with_tensor.add_params("t", torch.zeros(2))
    crafted.append(encode_message(with_tensor).replace(b'"$tensor":"0"', b'"$tensor":"9"'))
    for data in crafted:
        with pytest.raises(WireError) as err:
            decode_message(data)
        assert "\n" not in str(err.value)
    assert not marker.exists()
    m = Message("x", 1, 0)
    m.add_params("bad", Evil(marker))
    with pytest.raises(WireError, match="cannot send a value of type .*Evil"):
        encode_message(m)


def test_certs_verb_makes_one_certificate_per_rank(tmp_path, capsys):
    from cryptography import x509

    from fedml_feddpd.cli import main

    out = tmp_path / "certs"
    proc = subprocess.run([sys.executable, "-m", "fedml_feddpd", "certs", "--out", str(out), "--parties", "3"],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    ca = x509.load_pem_x509_certificate((out / "ca.pem").read_bytes())
    for rank in range(3):
        cert = x509.load_pem_x509_certificate((out / f"rank{rank}.pem").read_bytes())
        assert cert.subject.rfc4514_string() == f"CN=feddpd-rank-{rank}"
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert "localhost" in san.get_values_for_type(x509.DNSName)
        assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
        cert.verify_directly_issued_by(ca)
        assert (out / f"rank{rank}.key").stat().st_mode & 0o077 == 0
    assert not (out / "rank3.pem").exists()
    for argv, message in [(["--out", str(tmp_path / "a"), "--parties", "0"], "--parties: expected an integer"),
                          (["--out", str(tmp_path / "a"), "--parties", "two"], "--parties: expected an integer"),
                          (["--parties", "2"], "--out: missing"),
                          (["--out", str(out), "--parties", "2"], "already holds ca.pem"),
                          (["--out", str(out / "ca.pem"), "--parties", "2"], "exists and is not a folder")]:
        assert main(["certs"] + argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("feddpd: error: ") and message in err[0], err


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    from fedml_feddpd.distributed.tls import make_certs

    folder = tmp_path_factory.mktemp("certs")
    make_certs(folder / "run", 3)
    make_certs(folder / "other", 3)  # another CA
    return folder


def _silo_cfg(config_dict, **comm):
    from fedml_feddpd.config import validate

    config_dict["common_args"]["training_type"] = "cross_silo"
    config_dict["comm_args"] = {"backend": "GRPC", **comm}
    return validate(config_dict, "s.yaml")


def test_tls_config_errors_name_the_key(config_dict, certs, tmp_path, capsys):
    from fedml_feddpd.cli import main
    from fedml_feddpd.config import ConfigError
    from fedml_feddpd.distributed.tls import cert_files, load_tls

    good = cert_files(certs / "run", 1)
    for tls, message in [({**good, "key": str(tmp_path / "nope.key")}, "comm_args.tls.key: file not found"),
                         ({"ca_cert": good["ca_cert"], "cert": good["cert"]}, "comm_args.tls.key: missing"),
                         ({**good, "crt": "x"}, "comm_args.tls.crt: unknown key"),
                         ({**good, "cert": 3}, "comm_args.tls.cert: expected a file path"),
                         ("ca.pem", "comm_args.tls: expected a mapping")]:
        with pytest.raises(ConfigError) as err:
            _silo_cfg(json.loads(json.dumps(config_dict)), tls=tls)
        assert message in str(err.value) and "\n" not in str(err.value)
    for tls, rank, message in [(good, 0, "is for CN=feddpd-rank-1, this party is rank 0"),
                               ({**good, "key": cert_files(certs / "run", 2)["key"]}, 1, "is not the key of"),
                               ({**good, "ca_cert": cert_files(certs / "other", 1)["ca_cert"]}, 1, "is not signed by"),
                               ({**good, "cert": good["key"]}, 1, "is not a PEM certificate")]:
        with pytest.raises(ConfigError, match=message):
            load_tls(tls, rank)
    assert load_tls(good, 1).rank == 1
    # from the command line: exit status 2 and one line
    config_dict["common_args"]["training_type"] = "cross_silo"
    config_dict["comm_args"] = {"backend": "GRPC", "tls": {**good, "cert": str(tmp_path / "gone.pem")}}
    cf = tmp_path / "s.yaml"
    cf.write_text(yaml.safe_dump(config_dict))
    assert main(["silo-local", "--cf", str(cf)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"feddpd: error: comm_args.tls.cert: file not found: {tmp_path / 'gone.pem'}"]


def test_silo_local_gives_each_rank_its_own_certificate(config_dict, certs, tmp_path, capsys):
    from fedml_feddpd.config import ConfigError, load_config
    from fedml_feddpd.distributed.silo_local import _party_configs
    from fedml_feddpd.distributed.tls import cert_files, load_tls

    for tls, folder in ((None, tmp_path / "w1" / "certs"), (cert_files(certs / "run", 0), certs / "run")):
        (tmp_path / "w1").mkdir(exist_ok=True)
        cfg = _silo_cfg(json.loads(json.dumps(config_dict)), **({"tls": tls} if tls else {}))
        for rank, path in _party_configs(cfg, tmp_path / "w1", 3).items():
            assert load_config(path)["tls"] == cert_files(folder, rank)
            assert load_tls(load_config(path)["tls"], rank).rank == rank
    with pytest.raises(ConfigError, match="needs one certificate per rank"):  # a 3-party folder, 5 parties
        _party_configs(_silo_cfg(json.loads(json.dumps(config_dict)), tls=cert_files(certs / "run", 0)),
                       tmp_path, 5)
    cfg = _silo_cfg(json.loads(json.dumps(config_dict)), allow_insecure=True)
    assert all(load_config(p)["tls"] == {} for p in _party_configs(cfg, tmp_path, 3).values())
    assert capsys.readouterr().err.count("feddpd: warning: comm_args.allow_insecure") == 1


def test_plaintext_off_loopback_needs_allow_insecure(config_dict, tmp_path, capsys):
    from fedml_feddpd.config import ConfigError
    from fedml_feddpd.distributed.silo import run_silo_party
    from fedml_feddpd.distributed.tls import transport_security

    path = tmp_path / "ip.csv"
    rows = ["0,0,10.1.2.3,9000", "1,1,127.0.0.1,9001", "2,2,10.1.2.4,9002", "3,3,127.0.0.1,9003", "4,4,::1,9004"]
    path.write_text("\n".join(["eid,rank,grpc_server_ip,grpc_server_port"] + rows) + "\n")
    cfg = _silo_cfg(json.loads(json.dumps(config_dict)))
    with pytest.raises(ConfigError) as err:
        run_silo_party(cfg, "server", 0, ipconfig=str(path))  # before FedML starts anything
    text = str(err.value)
    assert text.startswith("comm_args.tls: ") and "10.1.2.3 (rank 0), 10.1.2.4 (rank 2)" in text
    assert "allow_insecure" in text and "\n" not in text
    loopback = {r: ("127.0.0.1", 9000 + r) for r in range(5)}
    assert transport_security(cfg, loopback, 0, "ip.csv") is None and capsys.readouterr().err == ""
    table = {0: ("10.1.2.3", 9000), 1: ("127.0.0.1", 9001)}
    insecure = _silo_cfg(json.loads(json.dumps(config_dict)), allow_insecure=True)
    assert transport_security(insecure, table, 0, "ip.csv") is None
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("feddpd: warning: comm_args.allow_insecure")


def _send(port, data, tls=None, override="feddpd-rank-0", timeout=5.0):
    import grpc
    from fedml.core.distributed.communication.grpc import grpc_comm_manager_pb2 as pb
    from fedml.core.distributed.communication.grpc import grpc_comm_manager_pb2_grpc as pb_grpc

    if tls is None:
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    else:
        channel = grpc.secure_channel(f"127.0.0.1:{port}", grpc.ssl_channel_credentials(*tls),
                                      options=[("grpc.ssl_target_name_override", override)])
    try:
        pb_grpc.gRPCCommManagerStub(channel).sendMessage(pb.CommRequest(client_id=1, message=data), timeout=timeout)
    finally:
        channel.close()


def _pem(folder, rank):
    return tuple((folder / n).read_bytes() for n in ("ca.pem", f"rank{rank}.key", f"rank{rank}.pem"))


def test_handshake_and_sender_checks(certs, tmp_path, capsys):
    """Rank 0's real transport under TLS: callers without a certificate of the run's CA never get a message
    in; certified callers get in, and their message is dropped unless it parses, comes from the rank of
    their certificate, from a peer, to this party."""
    import grpc
    from fedml.core.distributed.communication.message import Message

    from fedml_feddpd.distributed.ipconfig import generate_ipconfig, read_ipconfig
    from fedml_feddpd.distributed.silo_transport import WatchfulGRPCCommManager
    from fedml_feddpd.distributed.tls import TLSMaterial, cert_files, load_tls
    from fedml_feddpd.distributed.wire import encode_message

    ipconfig = generate_ipconfig(tmp_path, 3)
    port = read_ipconfig(ipconfig, 3)[0][1]
    run, other = certs / "run", certs / "other"
    server = WatchfulGRPCCommManager(str(ipconfig), 0, 2, None, peers=[1], timeout_s=20,
                                     tls=load_tls(cert_files(run, 0), 0))
    marker = tmp_path / "marker"
    try:
        q = server.grpc_servicer.message_q
        ca, key, cert = _pem(run, 1)
        for tls in (None, (ca,), (ca,) + _pem(other, 1)[1:], _pem(other, 1)):  # no / another CA's certificate
            with pytest.raises(grpc.RpcError) as err:
                _send(port, pickle.dumps(Evil(marker)), tls)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert q.empty()

        def message(sender, receiver=0):
            m = Message("probe", sender, receiver)
            return encode_message(m)

        cases = [(pickle.dumps(Evil(marker)), _pem(run, 1), "not a FedDPD message"),
                 (message(2), _pem(run, 1), "it claims to come from rank 2"),
                 (message(2), _pem(run, 2), "rank 2 is not a peer of server rank 0"),
                 (message(1, receiver=2), _pem(run, 1), "it is addressed to rank 2"),
                 (message(1), _pem(run, 1), None)]
        for data, tls, reason in cases:
            _send(port, data, tls)
            got = server.accept(q.get(timeout=5))
            if reason is None:
                assert got is not None and got.get_sender_id() == 1 and got.get_type() == "probe"
                continue
            assert got is None
            line = server.dropped[-1]
            assert reason in line and re.search(r"from ipv4:127\.0\.0\.1:\d+ \(certificate of rank \d\)", line), line
        assert not marker.exists()
        err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("feddpd: warning:")]
        assert len(err) == 4 and all("server rank 0: dropped a message from ipv4:127.0.0.1:" in ln for ln in err)
    finally:
        server.stop_receive_message()
    # A client checks the server's identity too: a listener at rank 0's address with rank 2's certificate
    # is not rank 0.
    ca, key, cert = _pem(run, 2)
    impostor = WatchfulGRPCCommManager(str(ipconfig), 0, 2, None, peers=[1], timeout_s=20,
                                       tls=TLSMaterial(ca, cert, key, rank=0))
    client = WatchfulGRPCCommManager(str(ipconfig), 1, 2, None, peers=[0], timeout_s=20,
                                     tls=load_tls(cert_files(run, 1), 1))
    try:
        with pytest.raises(grpc.RpcError) as err:
            client._send_once(Message("probe", 1, 0))
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert impostor.grpc_servicer.message_q.empty()
    finally:
        client.stop_receive_message()
        impostor.stop_receive_message()


def test_a_certified_peers_crafted_pickle_is_dropped_and_the_run_finishes(tmp_path, config_dict):
    """silo-local (throwaway certificates) with 2 clients and 2 rounds; while it runs, a caller holding
    rank 1's certificate sends the server a CommRequest whose message is a crafted pickle."""
    config_dict["common_args"]["training_type"] = "cross_silo"
    config_dict["comm_args"] = {"backend": "GRPC", "comm_timeout_s": 120}
    config_dict["train_args"].update(client_num_in_total=2, client_num_per_round=2, comm_round=2, epochs=1)
    cf = tmp_path / "run.yaml"
    cf.write_text(yaml.safe_dump(config_dict))
    out, marker = tmp_path / "out", tmp_path / "marker"
    proc = subprocess.Popen([sys.executable, "-m", "fedml_feddpd", "silo-local", "--cf", str(cf), "--out", str(out),
                             "--no-progress"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=tmp_path, start_new_session=True,
                            env={**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"})
    try:
        line = proc.stdout.readline()
        m = re.search(r"server rank 0 pid \d+ log (\S+)", line)
        assert m, line + proc.stderr.read()[-2000:]
        work = Path(m[1]).parent
        with open(work / "grpc_ipconfig.csv") as fh:
            port = int(next(r for r in csv.DictReader(fh) if r["rank"] == "0")["grpc_server_port"])
        tls = _pem(work / "certs", 1)
        deadline = time.monotonic() + 120
        while True:  # until the server listens
            try:
                _send(port, pickle.dumps(Evil(marker)), tls, timeout=10)
                break
            except Exception:
                assert time.monotonic() < deadline and proc.poll() is None, "could not reach the server"
                time.sleep(0.2)
        stdout, stderr = proc.communicate(timeout=400)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, stdout[-2000:] + stderr[-2000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["rounds"]) == 2 and math.isfinite(metrics["final"]["top1"])
    assert not marker.exists()
    [dropped] = metrics["messages_dropped"]
    assert re.fullmatch(r"dropped a message from ipv4:127\.0\.0\.1:\d+ \(certificate of rank 1\): not a FedDPD "
                        r"message .*", dropped), dropped
