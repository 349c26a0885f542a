"""Every upload is checked before aggregation (fedml_feddpd/uploads.py): keys, shapes and dtypes of the global
model, finite values, a positive sample count within train_args.max_client_samples. sp and MPI stop with one line
naming the client; the gRPC server drops the upload, records it, and the round goes on (tests/test_hostile_client.py
runs that end to end)."""
import json
import re
from collections import OrderedDict
from types import SimpleNamespace

import pytest
import torch
import yaml


def _state():
    return OrderedDict(w=torch.zeros(3, 2), b=torch.ones(2), steps=torch.tensor(4))


def test_upload_problem_names_what_is_wrong():
    from fedml_feddpd.uploads import model_spec, upload_problem

    spec = model_spec(_state())
    assert upload_problem(10, _state(), spec) is None
    assert upload_problem(10, _state(), spec, max_samples=10) is None
    import numpy as np

    assert upload_problem(np.int64(7), _state(), spec) is None  # FedML's counts may be numpy integers
    cases = [(0, _state(), "its sample count 0 is not a positive integer"),
             (10.0, _state(), "its sample count 10.0 is not a positive integer"),
             (True, _state(), "its sample count True is not a positive integer"),
             ("12", _state(), "its sample count 12 is not a positive integer"),
             (None, _state(), "its sample count None is not a positive integer"),
             (11, _state(), None),
             (10, [1, 2], "its model is a list, not a state dict"),
             (10, {**_state(), "labels": torch.zeros(3)}, "'labels' is not a model parameter"),
             (10, {"w": torch.zeros(3, 2), "b": torch.ones(2)}, "steps is missing"),
             (10, {**_state(), "w": torch.zeros(2, 3)}, "w has shape [2, 3], the model's is [3, 2]"),
             (10, {**_state(), "w": torch.zeros(3, 2, dtype=torch.float64)},
              "w has dtype float64, the model's is float32"),
             (10, {**_state(), "w": [[0.0] * 2] * 3}, "w is a list, not a tensor"),
             (10, {**_state(), "b": torch.tensor([1.0, float("nan")])}, "b holds NaN or infinite values"),
             (10, {**_state(), "w": torch.full((3, 2), -float("inf"))}, "w holds NaN or infinite values")]
    for n, state, why in cases:
        got = upload_problem(n, state, spec, max_samples=10)
        if why is None:
            assert got == "its sample count 11 is above train_args.max_client_samples = 10"
        else:
            assert got == why, (n, got)


def test_report_and_client_state_are_what_an_honest_client_sends():
    from fedml_feddpd.uploads import report_problem

    honest = {"client": 3, "seconds": 0.5, "supplement": {"size": 2, "sha256": "ab" * 32, "classes": [1, 1]}}
    state = {"loader": torch.get_rng_state(), "torch": torch.get_rng_state()}
    assert report_problem(honest, 3, state) is None
    assert report_problem(None, 3, None) is None
    assert report_problem({**honest, "supplement": None}, 3, {"loader": None, "torch": state["torch"]}) is None
    for report, client_state, why in [
            ({**honest, "client": 4}, None, "its report names client 4, not client 3"),
            ({**honest, "seconds": "x"}, None, "its report's seconds are not a finite number >= 0"),
            ({**honest, "seconds": float("nan")}, None, "its report's seconds are not a finite number >= 0"),
            ({**honest, "extra": 1}, None, "its report is not {client, seconds, supplement}"),
            ({**honest, "supplement": torch.zeros(3)}, None, "its report's supplement is not {size, sha256, classes}"),
            ([honest], None, "its report is not {client, seconds, supplement}"),
            (honest, {"torch": torch.zeros(7, dtype=torch.uint8)}, "its client state's torch is not a random "
                                                                   "generator state"),
            (honest, {"data": state["torch"]}, "its client state is not {loader, torch}")]:
        assert report_problem(report, 3, client_state) == why


def test_check_boundary_is_the_same_check():
    from fedml_feddpd.errors import PrivacyBoundaryError
    from fedml_feddpd.supplement import ClientUpload, check_boundary
    from fedml_feddpd.uploads import model_spec

    spec = model_spec(_state())
    check_boundary([ClientUpload(1, 5, _state())], spec)
    with pytest.raises(PrivacyBoundaryError, match=r"client 2's upload does not match the model \(w has dtype "
                                                   r"float16, the model's is float32\)"):
        check_boundary([ClientUpload(2, 5, {**_state(), "w": torch.zeros(3, 2).half()})], spec)


def _core(drop: bool, max_samples: int = 0):
    """A ServerCore with no party behind it: the state `received` reads."""
    from fedml_feddpd.distributed.common import ServerCore
    from fedml_feddpd.uploads import model_spec

    core = ServerCore.__new__(ServerCore)
    core.party = SimpleNamespace(cfg={"max_client_samples": max_samples})
    core.size_of, core.comm, core.reports, core.client_state = (lambda v: 1), {}, {}, {}
    core.upload_spec, core.drop_bad_uploads = model_spec(_state()), drop
    core.round_rejected, core.client_seconds = {}, 0.0
    return core


def test_mpi_stops_and_grpc_records_a_bad_upload():
    from fedml_feddpd.errors import UploadError

    nan = {**_state(), "b": torch.tensor([0.0, float("nan")])}
    with pytest.raises(UploadError) as err:  # MPI: one trusted job
        _core(drop=False).received(3, 7, nan, None, None, 20)
    assert str(err.value) == "round 3: client 7's upload cannot be aggregated: b holds NaN or infinite values"
    core = _core(drop=True, max_samples=100)
    assert core.received(3, 7, _state(), None, None, 10**12) == ("its sample count 1000000000000 is above "
                                                                 "train_args.max_client_samples = 100")
    report = {"client": 5, "seconds": 2.0, "supplement": None}
    assert core.received(3, 5, _state(), report, None, 40) is None
    assert core.round_rejected == {7: "its sample count 1000000000000 is above train_args.max_client_samples = 100"}
    assert core.reports == {3: {5: report}} and core.client_seconds == 2.0  # nothing of the rejected one is kept
    assert core.comm[3]["messages_up"] == 2  # its bytes did arrive
    core.answered([5], [7, 6])
    assert (core.round_clients, core.round_missing) == ([5], [6])


def _manager(reached=(1, 2, 3), min_clients=1):
    """A gRPC server manager with no transport, in an open round 2 whose clients are 10, 11, 12 on ranks 1, 2, 3."""
    from fedml_feddpd.distributed.silo_server import FedDPDSiloServerManager

    m = FedDPDSiloServerManager.__new__(FedDPDSiloServerManager)
    m.args = SimpleNamespace(round_idx=2, client_num_per_round=3, client_num_in_total=3)
    m.client_real_ids, m.reached, m.rejected, m.round_timeout_s, m.min_clients = [1, 2, 3], set(reached), set(), 0, \
        min_clients
    kept = {}
    m.aggregator = SimpleNamespace(flag_client_model_uploaded_dict={i: False for i in range(3)},
                                   add_local_trained_result=lambda i, model, n: (
                                       kept.__setitem__(i, n), m.aggregator.flag_client_model_uploaded_dict.update(
                                           {i: True})))
    m.core = _core(drop=True, max_samples=1000)
    m.core.round_clients = [10, 11, 12]
    m._close_round = lambda: kept.setdefault("closed", True)
    return m, kept


def _upload(sender, state, n):
    from fedml.core.distributed.communication.message import Message
    from fedml.cross_silo.server.message_define import MyMessage

    from fedml_feddpd.distributed.common import KEY_ROUND

    msg = Message(MyMessage.MSG_TYPE_C2S_SEND_MODEL_TO_SERVER, sender, 0)
    msg.add_params(MyMessage.MSG_ARG_KEY_MODEL_PARAMS, state)
    msg.add_params(MyMessage.MSG_ARG_KEY_NUM_SAMPLES, n)
    msg.add_params(KEY_ROUND, 2)
    return msg


def test_grpc_drops_a_bad_upload_with_one_line_and_closes_the_round(capsys):
    m, kept = _manager()
    m.handle_message_receive_model_from_client(_upload(1, _state(), 50))
    m.handle_message_receive_model_from_client(_upload(2, {**_state(), "w": torch.zeros(4, 2)}, 50))
    assert "closed" not in kept  # rank 3 has not answered
    m.handle_message_receive_model_from_client(_upload(2, _state(), 50))  # a second try in the same round
    m.handle_message_receive_model_from_client(_upload(3, _state(), 5000))
    assert kept == {0: 50, "closed": True}  # every rank answered: the round closes with rank 1's upload alone
    assert m.core.round_rejected == {11: "w has shape [4, 2], the model's is [3, 2]",
                                     12: "its sample count 5000 is above train_args.max_client_samples = 1000"}
    assert capsys.readouterr().err.splitlines() == [
        "feddpd: warning: server rank 0: rejected client rank 2's upload for round 2 (client 11): w has shape [4, 2], "
        "the model's is [3, 2]; the round goes on without it",
        "feddpd: warning: server rank 0: dropped client rank 2's second upload for round 2",
        "feddpd: warning: server rank 0: rejected client rank 3's upload for round 2 (client 12): its sample count "
        "5000 is above train_args.max_client_samples = 1000; the round goes on without it"]


def test_too_few_good_uploads_stop_the_round_with_one_line():
    from fedml_feddpd.distributed.silo_server import FedDPDSiloServerManager
    from fedml_feddpd.errors import PartyError

    m, _ = _manager(min_clients=2)
    m.aggregator.flag_client_model_uploaded_dict[0] = True
    m.rejected = {3}
    m.round_timeout_s = 5.0
    with pytest.raises(PartyError) as err:
        FedDPDSiloServerManager._close_round(m)
    assert str(err.value) == ("round 2: 1 of 3 clients' uploads can be averaged (rejected client rank(s) 3; missing 2); "
                              "train_args.min_clients_per_round is 2")


def test_sp_stops_at_a_nan_upload_with_one_line(config_dict, tmp_path, monkeypatch, capsys):
    """FedML's sp client 1 uploads NaN weights: exit status 1, one line naming the round, the client and the key."""
    from fedml.simulation.sp.fedavg.client import Client

    from fedml_feddpd.cli import main

    train = Client.train

    def poisoned(self, w_global):
        weights = train(self, w_global)
        if self.client_idx == 1:
            weights = {k: torch.full_like(v, float("nan")) for k, v in weights.items()}
        return weights

    monkeypatch.setattr(Client, "train", poisoned)
    config_dict["train_args"].update(comm_round=1, epochs=1)
    cf = tmp_path / "c.yaml"
    cf.write_text(yaml.safe_dump(config_dict))
    assert main(["run", "--cf", str(cf), "--out", str(tmp_path / "out"), "--no-progress"]) == 1
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("feddpd:")]
    assert err == ["feddpd: error: round 0: client 1's upload cannot be aggregated: features.0.weight holds NaN or "
                   "infinite values"]
    assert not (tmp_path / "out" / "metrics.json").exists()


def test_max_client_samples_is_checked_and_part_of_a_runs_identity(make_config):
    from fedml_feddpd.checkpoint import _run_identity
    from fedml_feddpd.config import ConfigError

    assert make_config()["max_client_samples"] == 0
    with pytest.raises(ConfigError, match=re.escape("train_args.max_client_samples: expected an integer >= 0, got -1")):
        make_config(max_client_samples=-1)
    off = json.loads(json.dumps(make_config(max_client_samples=0).sections))
    older = json.loads(json.dumps(off))
    del older["train_args"]["max_client_samples"]
    assert _run_identity(off) == _run_identity(older)  # runs made before the key existed stay the same run
    bounded = json.loads(json.dumps(make_config(max_client_samples=500).sections))
    assert _run_identity(bounded) != _run_identity(off)  # a bound may reject uploads: another run
