"""gRPC transport for cross-silo runs: FedML's GRPCCommManager with a blocking receive loop, heartbeats,
send deadlines and retries, and a one-line error naming a silent peer. Each override names the FedML line
it answers:

* the receive loop busy-waits (core/distributed/communication/grpc/grpc_comm_manager.py:157-193: its
  sleep is outside the `while`), and never gives up on a silent peer: our loop blocks on the queue,
  every party sends a small heartbeat to its peers, and a peer silent for `comm_args.comm_timeout_s`
  stops the party with a one-line error naming that rank;
* a send to a party that is not listening yet fails at once (grpc_comm_manager.py:128-141): sends are
  retried until the peer answers or the timeout passes;
* `stub.sendMessage` has no deadline (grpc_comm_manager.py:129, :138): FedML's stub module is wrapped.
"""
from __future__ import annotations

import pickle
import queue
import threading
import time

import grpc
from fedml.core.distributed.communication.grpc.grpc_comm_manager import GRPCCommManager
from fedml.core.distributed.communication.message import Message
from fedml.cross_silo.server.fedml_server_manager import FedMLServerManager
from fedml.cross_silo.server.message_define import MyMessage

from ..errors import PartyTimeout
from .ipconfig import STARTUP_GRACE_S


MSG_TYPE_HEARTBEAT = "feddpd_heartbeat"


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
