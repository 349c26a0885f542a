"""FedDPD and the baselines on FedML's gRPC cross-silo backend (`training_type: cross_silo`, `backend: GRPC`).

    python -m fedml_feddpd silo --role server --rank 0 --cf CONFIG      # one party
    python -m fedml_feddpd silo --role client --rank 1 --cf CONFIG
    python -m fedml_feddpd silo-local --cf CONFIG                       # server + clients on 127.0.0.1

FedML's cross-silo server and client managers run the rounds (cross_silo/server/fedml_server_manager.py,
cross_silo/client/fedml_client_master_manager.py). Supplements travel in FedML's per-client payload:
when `ServerAggregator.aggregate` returns a plain dict {client_index: payload}, the server sends each
client its own entry (cross_silo/server/fedml_aggregator.py:88-102, fedml_server_manager.py:225-231,
:314-332) and the client receives it in its trainer's `set_model_params`. Subclasses answer FedML's
traps, each at the line it answers:

* the receive loop busy-waits (core/distributed/communication/grpc/grpc_comm_manager.py:157-193: its
  sleep is outside the `while`), and never gives up on a silent peer: our loop blocks on the queue,
  every party sends a small heartbeat to its peers, and a peer silent for `comm_args.comm_timeout_s`
  stops the party with a one-line error naming that rank;
* a send to a party that is not listening yet fails at once (grpc_comm_manager.py:128-141): sends are
  retried until the peer answers or the timeout passes;
* the server sleeps 5 s before it exits (fedml_server_manager.py:163);
* the client reads its loader before the payload arrives (fedml_client_master_manager.py:142-144):
  the trainer trains on the loader the payload just installed.
"""
from __future__ import annotations

import os
import pickle
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Optional

import grpc
from fedml.core import ServerAggregator
from fedml.core.distributed.communication.grpc.grpc_comm_manager import GRPCCommManager
from fedml.core.distributed.communication.message import Message
from fedml.cross_silo.client.fedml_client_master_manager import ClientMasterManager
from fedml.cross_silo.client.fedml_trainer_dist_adapter import TrainerDistAdapter
from fedml.cross_silo.server.fedml_aggregator import FedMLAggregator
from fedml.cross_silo.server.fedml_server_manager import FedMLServerManager
from fedml.cross_silo.server.message_define import MyMessage

from ..config import SUPPLEMENT_METHODS
from .common import KEY_TRAINED_ON, ClientCore, PartyError, ServerCore, build_party, die_with_parent, timed

MSG_TYPE_HEARTBEAT = "feddpd_heartbeat"
# A peer that has not been heard from at all may still be starting (importing FedML takes ~10 s, more on a
# loaded machine): until its first message it gets at least this long.
STARTUP_GRACE_S = 120.0


class PartyTimeout(PartyError):
    pass


class _StubsWithDeadline:
    """Stands in for the `grpc_comm_manager_pb2_grpc` module inside FedML's grpc_comm_manager: its
    `stub.sendMessage(request)` (grpc_comm_manager.py:129, :138) has no deadline, so a send to a party
    that accepts the TCP connection but never answers (stopped, hung) would block forever."""

    def __init__(self, module, timeout_s: float):
        self._module, self.timeout_s = module, timeout_s

    def gRPCCommManagerStub(self, channel):  # noqa: N802 (FedML's name)
        stub = self._module.gRPCCommManagerStub(channel)
        send = stub.sendMessage
        stub.sendMessage = lambda request: send(request, timeout=self.timeout_s)
        return stub

    def __getattr__(self, name):
        return getattr(self._module, name)


def _install_send_deadline(timeout_s: float) -> None:
    from fedml.core.distributed.communication.grpc import grpc_comm_manager as module

    stubs = module.grpc_comm_manager_pb2_grpc
    if isinstance(stubs, _StubsWithDeadline):
        stubs.timeout_s = timeout_s
    else:
        module.grpc_comm_manager_pb2_grpc = _StubsWithDeadline(stubs, timeout_s)


class WatchfulGRPCCommManager(GRPCCommManager):
    """FedML's gRPC communication manager with a blocking receive loop, heartbeats and a peer timeout."""

    def __init__(self, grpc_ipconfig_path, client_rank, client_num, args, peers, timeout_s: float):
        _install_send_deadline(float(timeout_s))
        super().__init__(grpc_ipconfig_path, client_rank=client_rank, client_num=max(client_num, 2), args=args)
        self.timeout_s = float(timeout_s)
        now = time.monotonic()
        self.last_heard = {int(p): now for p in peers}
        self.heard_from: set[int] = set()
        self.finished_peers: set[int] = set()
        self._stop = threading.Event()
        self._beat_every = min(2.0, self.timeout_s / 4)
        self._heartbeat = threading.Thread(target=self._beat, name="feddpd-heartbeat", daemon=True)
        self._heartbeat.start()

    @staticmethod
    def role_of(rank: int) -> str:
        return "server" if rank == 0 else "client"

    # --- sending ---------------------------------------------------------------------------------
    def _beat(self):
        while not self._stop.wait(self._beat_every):
            for peer in list(self.last_heard):
                if peer in self.finished_peers:
                    continue
                try:
                    super().send_message(Message(MSG_TYPE_HEARTBEAT, self.client_rank, peer))
                except Exception:  # a silent peer is what the receive loop's timeout is for
                    pass

    def send_message(self, msg: Message):
        # grpc_comm_manager.py:128-141 opens a channel and sends once: a peer that is not up yet (a
        # client started before its server) fails at once. Retry while it is unavailable; a peer that
        # does not answer in time (deadline: _StubsWithDeadline) is an error naming its rank.
        deadline = time.monotonic() + self.timeout_s
        receiver = int(msg.get_receiver_id())
        while True:
            try:
                return super().send_message(msg)
            except grpc.RpcError as exc:
                code = exc.code() if hasattr(exc, "code") else None
                if code != grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline or self._stop.is_set():
                    raise PartyTimeout(f"{self.role_of(receiver)} rank {receiver} at "
                                       f"{self._address(receiver)} did not accept a message within "
                                       f"comm_args.comm_timeout_s = {self.timeout_s:g} s ({code})") from None
                time.sleep(0.2)

    def _address(self, rank: int) -> str:
        m = self.grpc_mappings.get(rank)
        return f"{m.grpc_server_ip}:{m.grpc_server_port}" if m else "?"

    # --- receiving -------------------------------------------------------------------------------
    def message_handling_subroutine(self):
        # Replaces grpc_comm_manager.py:157-193, which polls `qsize()` without sleeping (a core at 100%
        # while it waits) and never notices a silent peer.
        q = self.grpc_servicer.message_q
        while self.is_running:
            try:
                msg_pkl = q.get(timeout=0.25)
            except queue.Empty:
                self._check_peers()
                continue
            msg = pickle.loads(msg_pkl)
            sender = int(msg.get_sender_id())
            if sender in self.last_heard:
                self.last_heard[sender] = time.monotonic()
                self.heard_from.add(sender)
            msg_type = msg.get_type()
            if msg_type == MSG_TYPE_HEARTBEAT:
                continue
            if msg_type == MyMessage.MSG_TYPE_C2S_CLIENT_STATUS and msg.get(
                    MyMessage.MSG_ARG_KEY_CLIENT_STATUS) == FedMLServerManager.RUN_FINISHED_STATUS_FLAG:
                self.finished_peers.add(sender)  # done: its silence from now on is expected
            for observer in self._observers:
                observer.receive_message(msg_type, msg)
            if q.empty():
                self._check_peers()

    def _check_peers(self):
        now = time.monotonic()
        never = max(self.timeout_s, STARTUP_GRACE_S)
        silent = [p for p, t in self.last_heard.items() if p not in self.finished_peers
                  and now - t > (self.timeout_s if p in self.heard_from else never)]
        if silent:
            who = ", ".join(f"{self.role_of(p)} rank {p} ({self._address(p)})" for p in silent)
            if all(p in self.heard_from for p in silent):
                raise PartyTimeout(f"no message from {who} for {self.timeout_s:g} s (comm_args.comm_timeout_s): "
                                   f"it stopped or cannot be reached")
            raise PartyTimeout(f"{who} never connected within {never:g} s: not started, or at another address "
                               f"than the ip config says")

    def stop_receive_message(self):
        self._stop.set()
        super().stop_receive_message()


class _WatchfulMixin:
    def _init_manager(self):
        # FedMLCommManager._init_manager (core/distributed/fedml_comm_manager.py:189-196) builds FedML's
        # GRPCCommManager; build ours.
        self.com_manager = WatchfulGRPCCommManager(self.args.grpc_ipconfig_path, self.rank, self.size, self.args,
                                                   peers=self._peers(), timeout_s=self.args.comm_timeout_s)
        self.com_manager.add_observer(self)


# --- server ------------------------------------------------------------------------------------------
class FedDPDServerAggregator(ServerAggregator):
    """The FedML ServerAggregator of every method: FedML-sp averaging and the FedDPD server step
    (`ServerCore.aggregate`); for supplement methods it returns one payload per client."""

    def __init__(self, model, args, core: ServerCore, next_clients):
        super().__init__(model, args)
        self.core = core
        self.next_clients = next_clients  # () -> client indexes of the next round, in rank order

    def get_model_params(self):
        return self.model.cpu().state_dict()  # an OrderedDict: FedML broadcasts it (fedml_server_manager.py:56-66)

    def set_model_params(self, model_parameters):
        # fedml_aggregator.py:101-102 hands back what `aggregate` returned; the payload dict carries the
        # global model that `ServerCore.aggregate` has already loaded.
        if type(model_parameters) is dict:
            return
        self.model.load_state_dict(model_parameters)

    def aggregate(self, raw_client_model_or_grad_list):
        core = self.core
        w_global = core.aggregate(self.args.round_idx, raw_client_model_or_grad_list, core.round_clients)
        if core.recorder.server_step is None:
            return OrderedDict(w_global)  # a plain dict would be taken as per-client payloads
        # {client_index: payload}: FedML sends payload `client_index` to the rank that trains it next
        # (fedml_server_manager.py:225-231). Keys are the next round's clients, never -1 (:240-243).
        # fedml_aggregator.py:96-97 walks keys 0..n-1, so every client index gets an entry; only the next
        # round's clients can receive a supplement.
        rank_of = {int(cid): pos + 1 for pos, cid in enumerate(self.next_clients())}
        return {cid: {"client": cid, "model": w_global,
                      "supplement": core.outgoing(rank_of[cid], cid) if cid in rank_of else None}
                for cid in range(int(self.args.client_num_in_total))}

    def test(self, test_data, device, args):
        return None

    def test_all(self, train_data_local_dict, test_data_local_dict, device, args) -> bool:
        return True


class FedDPDSiloAggregator(FedMLAggregator):
    def __init__(self, *args, core: ServerCore, **kwargs):
        super().__init__(*args, **kwargs)
        self.core = core

    def next_clients(self):
        # fedml_server_manager.py:214-216 selects the next round's silos right after aggregation with the
        # same arguments; data_silo_selection reseeds numpy with them, so this is the same list.
        return list(self.data_silo_selection(self.args.round_idx, self.args.client_num_in_total,
                                             self.client_num))

    def test_on_server_for_all_clients(self, round_idx):
        # fedml_aggregator.py:183-219 tests through FedML's aggregator; record our metrics instead.
        self.core.end_round(round_idx)


class FedDPDSiloServerManager(_WatchfulMixin, FedMLServerManager):
    def __init__(self, args, aggregator, comm, rank, client_num, backend, core: ServerCore):
        self.core = core
        super().__init__(args, aggregator, comm, rank, client_num, backend)

    def _peers(self):
        # called from FedMLCommManager.__init__, before fedml_server_manager.py:29 sets client_real_ids
        import json

        return [int(c) for c in json.loads(self.args.client_id_list)]

    def handle_message_receive_model_from_client(self, msg_params):
        # fedml_server_manager.py:174-183 keeps the model and sample count; note bytes and the report.
        report = msg_params.get(KEY_TRAINED_ON)
        sender = int(msg_params.get(MyMessage.MSG_ARG_KEY_SENDER))
        cid = report["client"] if report else self.core.round_clients[self.client_real_ids.index(sender)]
        self.core.received(self.args.round_idx, cid, msg_params.get(MyMessage.MSG_ARG_KEY_MODEL_PARAMS), report)
        super().handle_message_receive_model_from_client(msg_params)

    def send_message(self, message):
        # Every model message leaves through here (fedml_server_manager.py:261-277, :292-332): count it.
        kind = message.get_type()
        if kind in (MyMessage.MSG_TYPE_S2C_INIT_CONFIG, MyMessage.MSG_TYPE_S2C_SYNC_MODEL_TO_CLIENT):
            # The init goes out at round 0; a sync after aggregating round r (before FedML's round counter
            # moves, :245) starts round r + 1.
            starts = 0 if kind == MyMessage.MSG_TYPE_S2C_INIT_CONFIG else self.args.round_idx + 1
            self.core.begin_round(starts, self.data_silo_index_list)
            payload = message.get(MyMessage.MSG_ARG_KEY_MODEL_PARAMS)
            if type(payload) is dict:
                self.core.sent_model(starts, payload["model"], payload["supplement"])
            else:
                self.core.sent_model(starts, payload)
        super().send_message(message)

    def process_online_status(self, client_status, msg_params):
        # fedml_server_manager.py:124-144 sends every client the init message again whenever one more
        # ONLINE status arrives (a client answers both its own start and the server's status check).
        if self.is_initialized:
            self.client_online_mapping[str(msg_params.get_sender_id())] = True
            return
        super().process_online_status(client_status, msg_params)

    def process_finished_status(self, client_status, msg_params):
        # fedml_server_manager.py:146-164 without its `time.sleep(5)` (:163) and MLOps calls (offline here).
        self.client_finished_mapping[str(msg_params.get_sender_id())] = True
        if all(self.client_finished_mapping.get(str(c), False) for c in self.client_id_list_in_this_round):
            self.finish()


# --- client ------------------------------------------------------------------------------------------
def client_trainer(model, args, core: ClientCore):
    """sp's trainer for the method (FedML's ModelTrainerCLS for FedAvg, SupplementedTrainer for supplement
    methods) with the payload handling of this backend."""
    if args.federated_optimizer in SUPPLEMENT_METHODS:
        from ..trainer import SupplementedTrainer as base
    else:
        from fedml.ml.trainer.my_model_trainer_classification import ModelTrainerCLS as base

    class PayloadTrainer(base):
        current: Optional[int] = None

        def set_model_params(self, model_parameters):
            if type(model_parameters) is dict:  # our per-client payload
                if model_parameters["supplement"] is not None:
                    core.deliver(model_parameters["client"], model_parameters["supplement"])
                self.current = int(model_parameters["client"])
                model_parameters = model_parameters["model"]
            super().set_model_params(model_parameters)

        def train(self, train_data, device, args):
            # fedml_client_master_manager.py:142-144 picks the loader (update_dataset) before the payload
            # (update_model) installs the supplemented one: train on the client's current loader.
            if self.current is not None:
                train_data = core.loaders[self.current]
            return super().train(train_data, device, args)

    return PayloadTrainer(model, args)


class FedDPDSiloClientManager(_WatchfulMixin, ClientMasterManager):
    def __init__(self, args, trainer_dist_adapter, comm, rank, size, backend, core: ClientCore):
        self.core = core
        self.last_seconds = 0.0
        super().__init__(args, trainer_dist_adapter, comm, rank, size, backend)
        trainer_dist_adapter.train = timed(trainer_dist_adapter.train, self._trained)

    def _peers(self):
        return [0]

    def _trained(self, seconds):
        self.last_seconds = seconds
        print(f"client rank {self.rank}: trained round {self.round_idx} "
              f"(client {self.trainer_dist_adapter.trainer.client_index}, {seconds:.2f} s)", flush=True)

    def send_message(self, message):
        # The upload (fedml_client_master_manager.py:167-179) also says what this client trained on.
        if message.get_type() == MyMessage.MSG_TYPE_C2S_SEND_MODEL_TO_SERVER:
            cid = self.trainer_dist_adapter.trainer.client_index
            message.add_params(KEY_TRAINED_ON, self.core.report(cid, self.last_seconds))
        super().send_message(message)


# --- parties -----------------------------------------------------------------------------------------
def resolve_ipconfig(cfg, override: Optional[str] = None, folder: Optional[str] = None) -> str:
    """The ip config every party reads: the user's (validated), or FedML's 8890 + rank on 127.0.0.1."""
    from .ipconfig import generate_ipconfig, read_ipconfig

    parties = cfg["client_num_per_round"] + 1
    path = override or cfg["grpc_ipconfig_path"]
    if path:
        read_ipconfig(path, parties)
        return os.path.abspath(path)
    folder = folder or tempfile.mkdtemp(prefix="feddpd-grpc-")
    return str(generate_ipconfig(folder, parties, fixed_ports=True))


def run_silo_party(cfg, role: str, rank: int, out_dir=None, ipconfig: Optional[str] = None,
                   show_progress: bool = True):
    """One cross-silo party, to the end of the run. The server returns the result dict and writes the
    outputs; a client returns None. Failures raise PartyError (one line) after gRPC is stopped."""
    from .ipconfig import check_party

    clients = cfg["client_num_per_round"]
    check_party(role, rank, clients)
    path = resolve_ipconfig(cfg, ipconfig)
    party = build_party(cfg, rank=rank, role=role, extra_args={
        "grpc_ipconfig_path": path, "worker_num": clients, "comm": None,
        # send_init_msg would describe the model to MLOps (fedml_server_manager.py:75-76)
        "skip_log_model_net": True})
    args = party.args
    [train_num, _, train_global, test_global, local_num, local_train, local_test, _] = party.data.fedml_dataset
    manager = None
    try:
        if role == "server":
            from ..runner import default_out_dir, write_outputs

            core = ServerCore(party, show_progress)
            holder = {}
            server_aggregator = FedDPDServerAggregator(party.model, args, core,
                                                       next_clients=lambda: holder["agg"].next_clients())
            server_aggregator.set_id(0)
            aggregator = FedDPDSiloAggregator(train_global, test_global, train_num, local_train, local_test,
                                              local_num, clients, party.device, args, server_aggregator, core=core)
            holder["agg"] = aggregator
            manager = FedDPDSiloServerManager(args, aggregator, None, 0, clients, "GRPC", core)
            core.loop = manager.run
            result = core.result("GRPC")
            write_outputs(Path(out_dir) if out_dir else _default_out(cfg, default_out_dir), result, cfg)
            return result
        core = ClientCore(party)
        trainer = client_trainer(party.model, args, core)
        adapter = TrainerDistAdapter(args, party.device, rank, party.model, train_num, local_num, local_train,
                                     local_test, trainer)
        manager = FedDPDSiloClientManager(args, adapter, None, rank, clients, "GRPC", core)
        manager.run()
        return None
    except PartyError:
        raise
    except Exception as exc:
        text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise PartyError(f"{role} rank {rank}: {type(exc).__name__}: {text}") from exc
    finally:
        if manager is not None and getattr(manager, "com_manager", None) is not None:
            manager.com_manager.stop_receive_message()  # gRPC threads would keep a failed party alive


def _default_out(cfg, default_out_dir):
    return default_out_dir(cfg)


# --- silo-local: a server and its clients on this machine ---------------------------------------------
def _wait_listening(host: str, port: int, proc: subprocess.Popen, timeout_s: float) -> None:
    import socket

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.2)
    raise PartyTimeout(f"server rank 0 did not listen on {host}:{port} within {timeout_s:g} s of its start")


def _last_error(log: Path) -> str:
    lines = log.read_text(errors="replace").splitlines() if log.is_file() else []
    errors = [ln for ln in lines if ln.startswith("feddpd: error:")]
    return errors[-1][len("feddpd: error:"):].strip() if errors else (lines[-1].strip() if lines else "no output")


def run_silo_local(cfg, out_dir=None, show_progress: bool = True) -> dict:
    """Start the server and one process per client on this machine, wait for all of them, return the
    server's result. Each party is `python -m fedml_feddpd silo ...`; their logs go to a folder that is
    kept when the run fails. No party outlives this call."""
    import json

    from ..runner import default_out_dir
    from .ipconfig import generate_ipconfig, read_ipconfig

    clients = cfg["client_num_per_round"]
    out = Path(out_dir) if out_dir else default_out_dir(cfg)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.silo-", dir=out.parent))  # party logs, kept on failure
    if cfg["grpc_ipconfig_path"]:
        table = read_ipconfig(cfg["grpc_ipconfig_path"], clients + 1)
        csv_path = os.path.abspath(cfg["grpc_ipconfig_path"])
    else:
        csv_path = str(generate_ipconfig(work, clients + 1))
        table = read_ipconfig(csv_path, clients + 1)
    cf = work / "config.yaml"
    cf.write_text(cfg.to_yaml())
    timeout_s = cfg["comm_timeout_s"]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[2]),
                                                        os.environ.get("PYTHONPATH")]))}
    procs: dict[int, subprocess.Popen] = {}
    logs: dict[int, Path] = {}

    def start(rank: int, role: str) -> None:
        cmd = [sys.executable, "-m", "fedml_feddpd", "silo", "--role", role, "--rank", str(rank), "--cf", str(cf),
               "--ipconfig", csv_path]
        if role == "server":
            cmd += ["--out", str(out)]
        if role != "server" or not show_progress:
            cmd.append("--no-progress")
        logs[rank] = work / f"rank{rank}_{role}.log"
        with open(logs[rank], "w") as log:
            procs[rank] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                           preexec_fn=die_with_parent)
        print(f"silo-local: {role} rank {rank} pid {procs[rank].pid} log {logs[rank]}", flush=True)

    def stop_all(grace: float = 5.0) -> None:
        for p in procs.values():
            if p.poll() is None:
                p.terminate()
        deadline = time.monotonic() + grace
        for p in procs.values():
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    previous = signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        start(0, "server")
        host, port = table[0]
        _wait_listening("127.0.0.1" if host in ("0.0.0.0", "::") else host, port, procs[0],
                        max(timeout_s, STARTUP_GRACE_S))
        for rank in range(1, clients + 1):
            start(rank, "client")
        reported = set()
        while procs[0].poll() is None:
            for rank, p in procs.items():
                if rank and rank not in reported and p.poll() not in (None, 0):
                    reported.add(rank)
                    print(f"silo-local: client rank {rank} exited with status {p.returncode}: "
                          f"{_last_error(logs[rank])}", file=sys.stderr, flush=True)
            time.sleep(0.2)
        if procs[0].returncode != 0:
            raise PartyError(f"server rank 0 failed: {_last_error(logs[0])} (logs in {work})")
        # After the server's last message every client finishes on its own; give them a moment.
        deadline = time.monotonic() + 30
        while any(p.poll() is None for p in procs.values()) and time.monotonic() < deadline:
            time.sleep(0.2)
        failed = {r: p.returncode for r, p in procs.items() if p.returncode not in (0, None)}
        if failed:
            raise PartyError(f"client rank(s) {', '.join(map(str, failed))} failed: "
                             f"{_last_error(logs[min(failed)])} (logs in {work})")
        result = json.loads((out / "metrics.json").read_text())
        result["out_dir"] = str(out)
        shutil.rmtree(work, ignore_errors=True)  # kept only when the run fails
        return result
    finally:
        stop_all()
        signal.signal(signal.SIGTERM, previous)
