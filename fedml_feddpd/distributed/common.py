"""What the MPI and gRPC backends share: building a party, the server's round bookkeeping, the client's
supplement-aware data, and the result of a run.

Both backends use FedML's own managers (subclassed in `mpi.py` and `silo.py`); this module holds no
transport. The server side reuses the sp path's pieces unchanged: `runner.build_args` / `init_fedml`,
`load_federated_data`, `create_model`, `attach_server_step` (policy, scorer, generator service,
`ServerStep`), `RoundRecorder` and `runner.execute`, so a distributed run writes the same
`metrics.json` as sp, plus per-round communication bytes and what each client trained on.
"""
from __future__ import annotations

import copy
import hashlib
import pickle
import time
from dataclasses import dataclass
from typing import Callable, Optional

from ..config import SUPPLEMENT_METHODS, RunConfig

# Extra message keys our manager subclasses add to FedML's messages.
KEY_SUPPLEMENT = "feddpd_supplement"      # server -> client: the client's new supplement (or absent)
KEY_TRAINED_ON = "feddpd_trained_on"      # client -> server: what the client trained on this round, its seconds


class PartyError(RuntimeError):
    """A distributed run stopped; the message is one line naming the party (rank) and the reason."""


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
    """Bytes of `obj` as FedML's transports carry it (both pickle the message: mpi4py's comm.send,
    grpc_comm_manager.py:115)."""
    return len(pickle.dumps(obj))


@dataclass
class Party:
    """One process of a distributed run: FedML args, data and model, built the same way on every rank."""

    cfg: RunConfig
    args: object
    data: object
    model: object
    device: object
    started: float


def build_party(cfg: RunConfig, rank: Optional[int] = None, role: Optional[str] = None,
                extra_args: Optional[dict] = None) -> Party:
    """FedML args through `init_fedml` (offline, as every process must), then data and model from the seed.

    MPI: `fedml.init` sets rank, role, comm and worker_num from MPI.COMM_WORLD (fedml/__init__.py:268-281).
    Cross-silo: the caller gives rank and role; fedml.init fills `client_id_list` (__init__.py:410-433).
    """
    started = time.perf_counter()
    import torch

    from ..data import load_federated_data
    from ..fedml_compat import init_fedml
    from ..models import create_model
    from ..runner import build_args

    args = build_args(cfg)
    if rank is not None:
        args.rank, args.role = int(rank), role
    for key, value in (extra_args or {}).items():
        setattr(args, key, value)
    args = init_fedml(args)
    if cfg["torch_threads"]:
        torch.set_num_threads(cfg["torch_threads"])
    data = load_federated_data(args)
    model = create_model(args, data.class_num)
    device = torch.device("cuda" if args.using_gpu and torch.cuda.is_available() else "cpu")
    return Party(cfg, args, data, model, device, started)


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

    def __init__(self, party: Party, show_progress: bool):
        from ..runner import Experiment, RoundRecorder, attach_server_step

        self.party = party
        cfg, args, data, model = party.cfg, party.args, party.data, party.model
        self.train_data_local_dict = data.fedml_dataset[5]  # what attach_server_step reads (runner.py)
        self.round_idx = -1
        self.round_clients: list[int] = []
        self.client_seconds = self.server_seconds = 0.0
        self.recorder = RoundRecorder(self, model, data, args.eval_every, args.comm_round, show_progress)
        generator_info = None
        if args.federated_optimizer in SUPPLEMENT_METHODS:
            step, generator_info = attach_server_step(cfg, args, data, model, self, show_progress)
            # The sp delivery writes into the in-process loader dict; here the supplement waits for the
            # message that starts the client's next round.
            step.deliver = self._keep
            self.recorder.server_step = step
        self.experiment = Experiment(cfg, args, data, model, self, self.recorder, generator_info, party.started)
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

    def sent_model(self, round_idx: int, model_state, supplement=None) -> None:
        """Count one server -> client message starting `round_idx`: its model and supplement bytes."""
        c = self._comm(round_idx)
        c["down_model_bytes"] += pickled_size(model_state)
        c["down_supplement_bytes"] += pickled_size(supplement) if supplement is not None else 0
        c["messages_down"] += 1

    def begin_round(self, round_idx: int, clients) -> None:
        if round_idx != self.round_idx:
            self.start_round(round_idx, clients)

    def received(self, round_idx: int, cid: int, model_state, report: Optional[dict]) -> None:
        c = self._comm(round_idx)
        c["up_model_bytes"] += pickled_size(model_state)
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
        from ..runner import execute

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
    methods, the supplemented loader that replaces a client's loader when a supplement arrives, exactly
    as the sp delivery does (runner.attach_server_step)."""

    def __init__(self, party: Party):
        from ..trainer import tensors_of

        self.party = party
        args = party.args
        self.loaders = party.data.fedml_dataset[5]  # the dict FedML's trainers read, replaced in place
        self.supplemented = args.federated_optimizer in SUPPLEMENT_METHODS
        # sp reads every client's real tensors once before round 0 (attach_server_step): that iteration
        # draws from each loader's shuffle generator, so the clients here do the same to stay on the
        # same shuffle stream.
        self.real = {cid: tensors_of(loader) for cid, loader in self.loaders.items()} if self.supplemented else {}
        self.holding: dict[int, object] = {}  # client id -> the supplement it trains with
        self.weight = float(party.cfg.sections["feddpd"]["supplement_weight"])

    def deliver(self, cid: int, supplement) -> None:
        from ..trainer import with_supplement

        cid = int(cid)
        args = self.party.args
        self.holding[cid] = supplement
        self.loaders[cid] = with_supplement(self.real[cid], supplement, self.weight, args.batch_size,
                                            seed=int(args.random_seed) * 1000 + cid)

    def report(self, cid: int, seconds: float) -> dict:
        return {"client": int(cid), "seconds": seconds,
                "supplement": supplement_summary(self.holding.get(int(cid)), self.party.data.class_num)}


def timed(train, on_done):
    """Wrap a FedML trainer's `train(round_idx)`, handing its seconds to `on_done`."""

    def timed_train(*a, **k):
        start = time.perf_counter()
        out = train(*a, **k)
        on_done(time.perf_counter() - start)
        return out

    return timed_train


def die_with_parent() -> None:
    """A child gets SIGTERM when its launcher dies, even by SIGKILL (Linux prctl PR_SET_PDEATHSIG; elsewhere
    a no-op). Used for silo-local's parties and compare's worker processes."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)
    except Exception:
        pass
