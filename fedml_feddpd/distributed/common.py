"""What the MPI and gRPC backends share: the server's round bookkeeping, the client's supplement-aware
data (ClientCore, in client_core.py) and the result of a run.

Both backends use FedML's own managers (subclassed in `mpi.py` and `silo_*.py`); this module holds no
transport. Every party is built by experiment.open_party, the server side by experiment.server_step,
RoundRecorder and execute, the client side delivers with trainer.SupplementDelivery: so a distributed run
writes the same `metrics.json` as sp, plus per-round communication bytes and what each client trained on.
"""
from __future__ import annotations

import copy
import pickle
import time
from typing import Callable, Optional

from ..errors import PartyError, UploadError
from ..experiment import Experiment, Party, RoundRecorder, execute, open_party, server_step
from ..uploads import model_spec, report_problem, upload_problem
from .client_core import ClientCore, supplement_summary

__all__ = ["ClientCore", "KEY_CLIENT_STATE", "KEY_ROUND", "KEY_SESSION", "KEY_SUPPLEMENT", "KEY_TRAINED_ON", "Party",
           "PartyError", "ServerCore", "open_party"]

# Extra message keys our manager subclasses add to FedML's messages.
KEY_SUPPLEMENT = "feddpd_supplement"      # server -> client: the client's new supplement (or absent)
KEY_TRAINED_ON = "feddpd_trained_on"      # client -> server: what the client trained on this round, its seconds
KEY_ROUND = "feddpd_round"                # gRPC, both ways: the round a model message starts or answers; MPI:
                                          # the round the first message of a resumed run starts
KEY_SESSION = "feddpd_session"            # gRPC client -> server status: one id per client process (a restart)
# client -> server (gRPC, MPI), with each upload when the server checkpoints: the trained client's loader shuffle
# state and the client process's torch RNG state after the round; sent back in the first message of a resumed run.
KEY_CLIENT_STATE = "feddpd_client_state"


def pickled_size(obj) -> int:
    """Bytes of `obj` as FedML's MPI transport carries it (mpi4py's comm.send pickles the message; gRPC
    counts with wire.encoded_size)."""
    return len(pickle.dumps(obj))


def fedavg_average(model_list):
    """FedML's sp average (`FedAvgAPI._aggregate`, simulation/sp/fedavg/fedavg_api.py:144-159), called as is.

    FedML's MPI aggregator computes `w * n / N` (simulation/mpi/fedavg/FedAVGAggregator.py:109-115), which can
    round differently from sp's `w * (n / N)`; sp's own function on every backend, with the uploads in the same
    client order, gives the same global model bit for bit. It averages into model_list[0] in place."""
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
        self.round_rejected: dict[int, str] = {}  # client id -> why its upload was dropped (gRPC, drop_bad_uploads)
        # Every upload is checked before aggregation (uploads.py). With `drop_bad_uploads` (gRPC: any certified
        # party may be faulty or hostile) a bad one is recorded and left out; otherwise (MPI: one trusted job) it
        # stops the run.
        self.upload_spec, self.drop_bad_uploads = model_spec(party.model.state_dict()), False
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
        # --resume (gRPC, MPI): the backend sets `resumable` when its messages can restart a round; `resume_round` is
        # the round a resumed run starts with; `client_state` is what each client reported after its latest
        # round (KEY_CLIENT_STATE), which checkpoints hold and a resumed run sends back.
        self.resumable = False
        self.resume_round = 0
        self.client_state: dict[int, dict] = {}

    # --- RoundRecorder / execute interface -------------------------------------------------------
    def train_from(self, start_round: int = 0) -> None:
        if start_round and not self.resumable:
            raise PartyError("resuming from a checkpoint is supported on backends sp, MPI and GRPC only")
        self.resume_round = start_round
        if start_round:
            self.party.args.round_idx = start_round  # FedML's cross-silo server counts rounds in args.round_idx
        self.loop()

    train = train_from

    # --- checkpoints (checkpoint.Checkpointer reads the sp API's names: model_trainer, loader states) ---------
    @property
    def model_trainer(self):
        return self

    def get_model_params(self):
        return self.party.model.cpu().state_dict()

    def set_model_params(self, params) -> None:
        self.party.model.load_state_dict(params)

    def loader_states(self) -> dict:
        """Each client's loader shuffle state after the latest round it trained (what sp saves of its loaders)."""
        return {cid: s["loader"] for cid, s in sorted(self.client_state.items()) if s.get("loader") is not None}

    def checkpoint_state(self) -> dict:
        """What a checkpoint holds beyond sp's: the clients' torch RNG states and the distributed records."""
        return {"client_torch_rng": {cid: s["torch"] for cid, s in self.client_state.items() if "torch" in s},
                "comm": self.comm, "reports": self.reports, "delivered_log": self.delivered_log}

    def restore_checkpoint_state(self, state: dict) -> None:
        extra = state.get("backend") or {}
        loaders, torch_rng = state["loader_rng"], extra.get("client_torch_rng", {})
        self.client_state = {int(cid): {"loader": loaders.get(cid), **({"torch": torch_rng[cid]} if cid in torch_rng
                                                                        else {})}
                             for cid in set(loaders) | set(torch_rng)}
        self.comm = dict(extra.get("comm", {}))
        self.reports = dict(extra.get("reports", {}))
        # Checkpointer.restore re-delivered the supplements (self._keep) under round -1: the saved log replaces that
        self.delivered_log = dict(extra.get("delivered_log", {}))

    def resume_state(self, cid: int) -> Optional[dict]:
        """Client `cid`'s saved state for the first round of a resumed run (KEY_CLIENT_STATE), None if none."""
        state = dict(self.client_state.get(int(cid)) or {}) or None
        if state is not None and (self.delivered_log.get(self.resume_round - 1) or {}).get(int(cid)) is not None:
            # its supplement was made after the checkpointed round: the uninterrupted run delivered it now, to a
            # fresh loader (trainer.with_supplement), so the saved shuffle state of the loader before does not apply
            state["loader"] = None
        return state

    def resume_payload(self, rank: int, cid: int, model_state, supplement: bool = True) -> dict:
        """The gRPC payload that starts a resumed run for client `cid` on `rank`: the global model, the client's
        newest supplement (whatever the rank held before is unknown) and its saved client state."""
        self.forget_rank(rank)
        return {"client": int(cid), "model": model_state,
                "supplement": self.outgoing(rank, cid) if supplement else None, "client_state": self.resume_state(cid)}

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
        self.round_missing, self.round_rejected = [], {}
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
        """Of the round's clients, only `clients` (in rank order) uploaded uploads that passed the checks: the round
        aggregates them alone. `missing`: the others, of which those in round_rejected did upload."""
        self.round_clients = [int(c) for c in clients]
        self.round_missing = [int(c) for c in missing if int(c) not in self.round_rejected]

    def sent_model(self, round_idx: int, model_state, supplement=None) -> None:
        """Count one server -> client message starting `round_idx`: its model and supplement bytes."""
        c = self._comm(round_idx)
        c["down_model_bytes"] += self.size_of(model_state)
        c["down_supplement_bytes"] += self.size_of(supplement) if supplement is not None else 0
        c["messages_down"] += 1

    def begin_round(self, round_idx: int, clients) -> None:
        if round_idx != self.round_idx:
            self.start_round(round_idx, clients)

    def received(self, round_idx: int, cid: int, model_state, report: Optional[dict],
                 client_state: Optional[dict] = None, num_samples=None) -> Optional[str]:
        """Note client `cid`'s upload (its bytes, report and state). A bad one (uploads.py: the model, its sample
        count, the report and state beside it) stops the run, or with `drop_bad_uploads` is recorded in
        round_rejected and nothing else of it is kept: then the reason is returned (None for a good upload)."""
        c = self._comm(round_idx)
        c["up_model_bytes"] += self.size_of(model_state)
        c["messages_up"] += 1
        why = (upload_problem(num_samples, model_state, self.upload_spec, self.party.cfg["max_client_samples"])
               or report_problem(report, int(cid), client_state))
        if why and not self.drop_bad_uploads:
            raise UploadError(f"round {round_idx}: client {cid}'s upload cannot be aggregated: {why}")
        if why:
            self.round_rejected[int(cid)] = why
            return why
        if client_state is not None:
            self.client_state[int(cid)] = client_state
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
            trained = step.before_aggregation(round_idx, uploads, fedavg_average) or {}  # feddpd.delivery: server
            model_list = [(n, trained.get(int(cid), w)) for cid, (n, w) in zip(client_ids, model_list)]
        w_global = fedavg_average(model_list)
        if step is not None:
            step(round_idx, w_global, uploads)
        self.party.model.load_state_dict(w_global)
        self.server_seconds += time.perf_counter() - start
        return w_global

    def end_round(self, round_idx: int) -> None:
        self.recorder(round_idx)

    # --- result ---------------------------------------------------------------------------------------
    def result(self, backend: str, checkpoint_dir=None, state: Optional[dict] = None) -> dict:
        """Run to the end (checkpointing into `checkpoint_dir`, continuing from a checkpoint's `state`) and
        collect execute's result with the distributed records."""
        result = execute(self.experiment, checkpoint_dir, state)
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
