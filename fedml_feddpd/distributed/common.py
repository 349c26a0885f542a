"""What the MPI and gRPC backends share: the server's round bookkeeping, the client's supplement-aware
data, and the result of a run.

Both backends use FedML's own managers (subclassed in `mpi.py` and `silo_*.py`); this module holds no
transport. Every party is built by experiment.open_party, the server side by experiment.server_step,
RoundRecorder and execute, the client side delivers with trainer.SupplementDelivery: so a distributed run
writes the same `metrics.json` as sp, plus per-round communication bytes and what each client trained on.
"""
from __future__ import annotations

import copy
import hashlib
import pickle
import time
from typing import Callable, Optional

from ..errors import PartyError
from ..experiment import Experiment, Party, RoundRecorder, execute, open_party, server_step

__all__ = ["ClientCore", "KEY_ROUND", "KEY_SESSION", "KEY_SUPPLEMENT", "KEY_TRAINED_ON", "Party", "PartyError",
           "ServerCore", "open_party"]

# Extra message keys our manager subclasses add to FedML's messages.
KEY_SUPPLEMENT = "feddpd_supplement"      # server -> client: the client's new supplement (or absent)
KEY_TRAINED_ON = "feddpd_trained_on"      # client -> server: what the client trained on this round, its seconds
KEY_ROUND = "feddpd_round"                # gRPC, both ways: the round a model message starts or answers
KEY_SESSION = "feddpd_session"            # gRPC client -> server status: one id per client process (a restart)


def supplement_digest(supplement) -> Optional[str]:
    """sha256 of a supplement's images and labels: the server and the client compute it on their own copies."""
    if supplement is None:
        return None
    h = hashlib.sha256(supplement.images.contiguous().numpy().tobytes())
    h.update(supplement.labels.contiguous().numpy().tobytes())
    return h.hexdigest()


def supplement_summary(supplement, num_classes: int) -> Optional[dict]:
    """Size, per-class counts and digest of a supplement (the server's log and the client's report match)."""
    if supplement is None:
        return None
    import numpy as np

    return {"size": int(len(supplement.labels)), "sha256": supplement_digest(supplement),
            "classes": np.bincount(supplement.labels.numpy(), minlength=num_classes).tolist()}


def pickled_size(obj) -> int:
    """Bytes of `obj` as FedML's MPI transport carries it (mpi4py's comm.send pickles the message; gRPC
    counts with wire.encoded_size)."""
    return len(pickle.dumps(obj))


def fedavg_average(model_list):
    """FedML's sp average (`FedAvgAPI._aggregate`, simulation/sp/fedavg/fedavg_api.py:144-159), called as is.

    FedML's MPI aggregator computes `w * n / N` (simulation/mpi/fedavg/FedAVGAggregator.py:109-115), which
    can round differently from sp's `w * (n / N)`; calling sp's own function on every backend, with the
    uploads in the same client order, gives the same global model bit for bit. It averages into
    model_list[0] in place.
    """
    from fedml.simulation.sp.fedavg.fedavg_api import FedAvgAPI

    return FedAvgAPI._aggregate(None, model_list)


class ServerCore:
    """The server's side of a round, whichever FedML backend carries the messages.

    It plays the part of the sp API for `RoundRecorder` / `runner.execute` (`round_clients`,
    `client_seconds`, `server_seconds`, `train_from`), runs FedML-style averaging and then the
    supplement step, keeps each client's newest supplement until it is sent, and counts bytes.
    """

    def __init__(self, party: Party, show_progress: bool, size_of: Optional[Callable[[object], int]] = None):
        self.party = party
        self.size_of = size_of or pickled_size  # bytes of a value as the backend's transport carries it
        self.round_idx = -1
        self.round_clients: list[int] = []
        self.round_missing: list[int] = []  # selected clients whose upload did not come (gRPC round_timeout_s)
        self.client_seconds = self.server_seconds = 0.0
        self.recorder = RoundRecorder(self, party, show_progress)
        # On sp the supplement goes into the client's loader at once; here it waits for the message that
        # starts the client's next round.
        step, generator_info = server_step(party, self._keep, show_progress)
        self.recorder.attach(step)
        self.experiment = Experiment(party, self, self.recorder, generator_info)
        self.latest: dict[int, tuple[int, object]] = {}  # client id -> (version, newest supplement)
        self.sent: dict[tuple[int, int], int] = {}        # (receiving rank, client id) -> version it holds
        self.delivered_log: dict[int, dict] = {}          # round -> {client id: summary of what was produced}
        self.comm: dict[int, dict] = {}           # round -> bytes
        self.reports: dict[int, dict] = {}        # round -> {client id: what it trained on}
        self.loop: Optional[Callable[[], None]] = None  # the backend's FedML message loop
        self._round_sent = 0.0

    # --- RoundRecorder / execute interface -------------------------------------------------------
    def train_from(self, start_round: int = 0) -> None:
        if start_round:
            raise PartyError("resuming from a checkpoint is supported on backend sp only")
        self.loop()

    train = train_from

    # --- round bookkeeping -------------------------------------------------------------------------
    def _comm(self, round_idx: int) -> dict:
        return self.comm.setdefault(round_idx, {"down_model_bytes": 0, "down_supplement_bytes": 0,
                                                "up_model_bytes": 0, "messages_down": 0, "messages_up": 0})

    def _keep(self, cid: int, supplement) -> None:
        version = self.latest.get(int(cid), (0, None))[0] + 1
        self.latest[int(cid)] = (version, supplement)
        self.delivered_log.setdefault(self.round_idx, {})[int(cid)] = supplement_summary(
            supplement, self.party.data.class_num)

    def start_round(self, round_idx: int, clients) -> None:
        self.round_idx = round_idx
        self.round_clients = [int(c) for c in clients]
        self.round_missing = []
        self.client_seconds = self.server_seconds = 0.0
        self._round_sent = time.perf_counter()

    def outgoing(self, rank: int, cid: int) -> Optional[object]:
        """The supplement to send to `rank` with client `cid`'s next model, or None when that rank already
        holds the newest one. With client sampling a client may move between ranks: each rank gets a
        client's supplement once per version."""
        version, newest = self.latest.get(int(cid), (0, None))
        if newest is None or self.sent.get((int(rank), int(cid))) == version:
            return None
        self.sent[(int(rank), int(cid))] = version
        return newest

    def forget_rank(self, rank: int) -> None:
        """`rank` holds no supplement any more (it restarted, or a message to it failed): send the newest again."""
        for key in [k for k in self.sent if k[0] == int(rank)]:
            del self.sent[key]

    def answered(self, clients, missing) -> None:
        """Of the round's clients, only `clients` (in rank order) uploaded: the round aggregates them alone."""
        self.round_clients, self.round_missing = [int(c) for c in clients], [int(c) for c in missing]

    def sent_model(self, round_idx: int, model_state, supplement=None) -> None:
        """Count one server -> client message starting `round_idx`: its model and supplement bytes."""
        c = self._comm(round_idx)
        c["down_model_bytes"] += self.size_of(model_state)
        c["down_supplement_bytes"] += self.size_of(supplement) if supplement is not None else 0
        c["messages_down"] += 1

    def begin_round(self, round_idx: int, clients) -> None:
        if round_idx != self.round_idx:
            self.start_round(round_idx, clients)

    def received(self, round_idx: int, cid: int, model_state, report: Optional[dict]) -> None:
        c = self._comm(round_idx)
        c["up_model_bytes"] += self.size_of(model_state)
        c["messages_up"] += 1
        if report is not None:
            self.reports.setdefault(round_idx, {})[int(cid)] = report
            self.client_seconds += float(report.get("seconds", 0.0))

    def aggregate(self, round_idx: int, model_list, client_ids) -> dict:
        """Average (sp formula) and run the supplement step, as RoundHooks._aggregate does on sp."""
        start = time.perf_counter()
        from ..supplement import ClientUpload

        step = self.recorder.server_step
        uploads = None
        if step is not None:
            uploads = [ClientUpload(int(cid), n, copy.deepcopy(w)) for cid, (n, w) in zip(client_ids, model_list)]
        w_global = fedavg_average(model_list)
        if step is not None:
            step(round_idx, w_global, uploads)
        self.party.model.load_state_dict(w_global)
        self.server_seconds += time.perf_counter() - start
        return w_global

    def end_round(self, round_idx: int) -> None:
        self.recorder(round_idx)

    # --- result ---------------------------------------------------------------------------------------
    def result(self, backend: str) -> dict:
        result = execute(self.experiment)
        for record in result["rounds"]:
            r = record["round"]
            record["comm"] = self.comm.get(r)
            record["clients_trained_on"] = {str(k): v for k, v in sorted(self.reports.get(r, {}).items())}
            if r in self.delivered_log:
                record["supplements_produced"] = {str(k): v for k, v in sorted(self.delivered_log[r].items())}
        result["backend"] = backend
        # gRPC cross-silo sends one more model after the last round (fedml_server_manager.py:222-236),
        # which the clients need to finish (fedml_client_master_manager.py:145-155).
        result["comm_after_last_round"] = self.comm.get(self.party.args.comm_round)
        result["comm_bytes_total"] = {k: sum(c[k] for c in self.comm.values())
                                      for k in ("down_model_bytes", "down_supplement_bytes", "up_model_bytes")}
        return result


class ClientCore:
    """A client party's data: its real loaders (built from the seed like every rank's) and, for supplement
    methods, the delivery that replaces a client's loader when a supplement arrives, as on sp."""

    def __init__(self, party: Party):
        from ..trainer import SupplementDelivery

        self.party = party
        args = party.args
        self.last_seconds = 0.0  # the latest train() call's seconds (timed)
        self.loaders = party.data.fedml_dataset[5]  # the dict FedML's trainers read, replaced in place
        # sp reads every client's real tensors once before round 0 (SupplementDelivery): the clients here
        # do the same, so that both stay on the same shuffle stream.
        self.delivery = (SupplementDelivery(self.loaders, party.cfg.sections["feddpd"]["supplement_weight"],
                                            args.batch_size, int(args.random_seed), party.data.space)
                         if party.method.supplement else None)

    def deliver(self, cid: int, supplement) -> None:
        self.delivery(cid, supplement)

    def timed(self, train, announce=None):
        """Wrap a FedML trainer's `train(...)`: its seconds go into this client's next report (and to
        `announce(seconds)` when given)."""

        def timed_train(*a, **k):
            start = time.perf_counter()
            out = train(*a, **k)
            self.last_seconds = time.perf_counter() - start
            if announce is not None:
                announce(self.last_seconds)
            return out

        return timed_train

    def report(self, cid: int) -> dict:
        """What client `cid` trained on in the round it just trained, and for how long."""
        holding = self.delivery.holding.get(int(cid)) if self.delivery else None
        return {"client": int(cid), "seconds": self.last_seconds,
                "supplement": supplement_summary(holding, self.party.data.class_num)}
