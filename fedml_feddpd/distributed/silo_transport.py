"""gRPC transport for cross-silo runs: FedML's GRPCCommManager with mutual TLS, messages without pickle,
a blocking receive loop, heartbeats, send deadlines and retries, and a one-line error naming a silent
peer. Each override names the FedML line it answers:

* the server listens with `add_insecure_port` (core/distributed/communication/grpc/grpc_comm_manager.py:95)
  and sends over `grpc.insecure_channel` (:128): with `comm_args.tls` ours listen with
  `ssl_server_credentials(require_client_auth=True)` and call with `ssl_channel_credentials` (tls.py);
* every message is pickled (:115) and whatever arrives is unpickled (:167), so anyone who reaches the port
  runs code: ours travel as JSON + safetensors (wire.py), and a message that does not parse, whose sender
  is not the rank of the caller's certificate, or that is not from a peer of this party, is dropped with
  one line naming the caller's address; the run goes on;
* the receive loop busy-waits (:157-193: its sleep is outside the `while`), and never gives up on a silent
  peer: ours blocks on the queue, every party sends a small heartbeat to its peers, and a peer silent for
  `comm_args.comm_timeout_s` stops the party with a one-line error naming that rank;
* a send to a party that is not listening yet fails at once (:128-141): sends are retried until the peer
  answers or the timeout passes; `stub.sendMessage` has no deadline (:138): ours have one.

With comm_args.round_timeout_s the server marks its clients `expendable` (their silence is no error) and
closes rounds from `on_tick`, which the receive loop calls whenever its queue is empty (silo_server.py).
"""
from __future__ import annotations

import logging
import queue
import sys
import threading
import time
from concurrent import futures
from typing import Callable, Optional

import grpc
from fedml.core.distributed.communication.grpc import grpc_comm_manager_pb2 as pb
from fedml.core.distributed.communication.grpc import grpc_comm_manager_pb2_grpc as pb_grpc
from fedml.core.distributed.communication.grpc.grpc_comm_manager import GRPCCommManager
from fedml.core.distributed.communication.grpc.grpc_server import GRPCCOMMServicer
from fedml.core.distributed.communication.message import Message
from fedml.cross_silo.server.fedml_server_manager import FedMLServerManager
from fedml.cross_silo.server.message_define import MyMessage

from ..errors import PartyError, PartyTimeout
from .ipconfig import STARTUP_GRACE_S
from .tls import TLSMaterial, cn_for, rank_of_cn
from .wire import WireError, decode_message, encode_message

MSG_TYPE_HEARTBEAT = "feddpd_heartbeat"
MAX_DROPPED_KEPT = 1000


def _target(ip: str, port: int) -> str:
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


class AuthenticatingServicer(GRPCCOMMServicer):
    """FedML's servicer (grpc_server.py:25-38) queues the raw bytes only; ours queues them with the caller's
    address and, under TLS, the rank its client certificate names."""

    def __init__(self, host, port, client_num, client_id, tls: bool):
        super().__init__(host, port, client_num, client_id)
        self.tls = tls

    def sendMessage(self, request, context):  # noqa: N802 (FedML's name)
        cert_rank = None
        if self.tls:
            names = context.auth_context().get("x509_common_name", [])
            cert_rank = rank_of_cn(names[0]) if len(names) == 1 else None
        self.message_q.put((request.message, cert_rank, context.peer()))
        return pb.CommResponse()


class WatchfulGRPCCommManager(GRPCCommManager):
    """FedML's gRPC communication manager, secured (TLS, no pickle), with a blocking receive loop, heartbeats
    and a peer timeout."""

    def __init__(self, grpc_ipconfig_path, client_rank, client_num, args, peers, timeout_s: float,
                 tls: Optional[TLSMaterial] = None):
        # grpc_comm_manager.py:36-102 without its insecure port and its fallback to 0.0.0.0 (:72-80).
        self._topic, self._observers = "fedml", []
        self.grpc_ipconfig_path, self.grpc_mappings, self.args = grpc_ipconfig_path, {}, args
        self.client_rank = self.client_id = int(client_rank)
        self.client_num = max(int(client_num), 2)
        self.node_type = self.role_of(self.client_rank)
        self._init_grpc_mappings()
        if self.client_rank not in self.grpc_mappings:
            raise PartyError(f"rank {self.client_rank} is not in the ip config {grpc_ipconfig_path}")
        self.tls = tls
        self.timeout_s = float(timeout_s)
        self.opts = [("grpc.max_send_message_length", 1000 * 1024 * 1024),
                     ("grpc.max_receive_message_length", 1000 * 1024 * 1024),
                     ("grpc.enable_http_proxy", 0)]
        me = self.grpc_mappings[self.client_rank]
        self.grpc_server = grpc.server(futures.ThreadPoolExecutor(max_workers=self.client_num), options=self.opts)
        self.grpc_servicer = AuthenticatingServicer(me.grpc_server_ip, me.grpc_server_port, self.client_num,
                                                    self.client_rank, tls=tls is not None)
        pb_grpc.add_gRPCCommManagerServicer_to_server(self.grpc_servicer, self.grpc_server)
        address = _target(me.grpc_server_ip, me.grpc_server_port)
        try:
            if tls is not None:
                creds = grpc.ssl_server_credentials([(tls.key, tls.cert)], root_certificates=tls.ca,
                                                    require_client_auth=True)
                self.grpc_server.add_secure_port(address, creds)
            else:
                self.grpc_server.add_insecure_port(address)
        except RuntimeError:  # grpc's "Failed to bind to address ...": in use, or not this machine's
            raise PartyError(f"{self.node_type} rank {self.client_rank} cannot listen on {address} (ip config "
                             f"{grpc_ipconfig_path}): the port is in use, the address is not this machine's, or gRPC "
                             f"refused its TLS material") from None
        self.grpc_server.start()
        self.is_running = True
        logging.info("gRPC server on %s (%s)", address, "mutual TLS" if tls else "plaintext")
        self._channels: dict[int, grpc.Channel] = {}
        self._channels_lock = threading.Lock()
        now = time.monotonic()
        self.last_heard = {int(p): now for p in peers}
        self.heard_from: set[int] = set()
        self.finished_peers: set[int] = set()
        self.dropped: list[str] = []
        self.expendable: set[int] = set()  # peers whose silence is not an error (round_timeout_s, silo_server.py)
        self.on_tick: Optional[Callable[[], None]] = None  # called on the receive thread between messages
        self._stop = threading.Event()
        self._beat_every = min(2.0, self.timeout_s / 4)
        self._heartbeat = threading.Thread(target=self._beat, name="feddpd-heartbeat", daemon=True)
        self._heartbeat.start()

    @staticmethod
    def role_of(rank: int) -> str:
        return "server" if rank == 0 else "client"

    # --- sending ---------------------------------------------------------------------------------
    def _channel(self, rank: int) -> grpc.Channel:
        with self._channels_lock:
            channel = self._channels.get(rank)
            if channel is None:
                m = self.grpc_mappings[rank]
                target = _target(m.ingress_ip or m.grpc_server_ip, m.grpc_server_port)
                if self.tls is None:
                    channel = grpc.insecure_channel(target, options=self.opts)
                else:  # the peer must show rank `rank`'s certificate, whatever its address
                    creds = grpc.ssl_channel_credentials(self.tls.ca, self.tls.key, self.tls.cert)
                    channel = grpc.secure_channel(target, creds, options=self.opts + [
                        ("grpc.ssl_target_name_override", cn_for(rank))])
                self._channels[rank] = channel
            return channel

    def _forget_channel(self, rank: int, close: bool = True) -> None:
        with self._channels_lock:
            channel = self._channels.pop(rank, None)
        if channel is not None and close:
            channel.close()

    def _send_once(self, msg: Message, deadline_s: Optional[float] = None) -> None:
        # grpc_comm_manager.py:104-141, with our encoding, credentials, cached channels and a deadline.
        me = self.grpc_mappings[self.client_rank]
        msg.add_params(GRPCCommManager.MSG_ARG_KEY_SENDER_RANK, self.client_rank)
        msg.add_params(GRPCCommManager.MSG_ARG_KEY_SENDER_IP, me.ingress_ip or me.grpc_server_ip)
        msg.add_params(GRPCCommManager.MSG_ARG_KEY_SENDER_PORT, me.grpc_server_port)
        request = pb.CommRequest(client_id=self.client_rank, message=encode_message(msg))
        stub = pb_grpc.gRPCCommManagerStub(self._channel(int(msg.get_receiver_id())))
        stub.sendMessage(request, timeout=self.timeout_s if deadline_s is None else deadline_s)

    def _beat(self):
        while not self._stop.wait(self._beat_every):
            for peer in list(self.last_heard):
                if peer in self.finished_peers:
                    continue
                try:
                    # a hung peer holds up the other peers' heartbeats for 10 s at most
                    self._send_once(Message(MSG_TYPE_HEARTBEAT, self.client_rank, peer), min(self.timeout_s, 10.0))
                except Exception:  # a silent peer is what the receive loop's timeout is for; a fresh channel
                    # reaches it at once when it restarts (no reconnect backoff). Not closed here: the receive
                    # thread may be sending on it; garbage collection closes it.
                    self._forget_channel(peer, close=False)

    def send_message(self, msg: Message, retry_s: Optional[float] = None, deadline_s: Optional[float] = None):
        # A peer that is not up yet (a client started before its server) fails at once: retry while it is
        # unavailable, on a fresh channel each time (a failed one waits out gRPC's reconnect backoff). A
        # peer that does not answer in time is an error naming its rank. retry_s (how long to retry) and
        # deadline_s (per call) default to comm_timeout_s; the server shortens both for a client it can do
        # without (comm_args.round_timeout_s, silo_server.py).
        deadline = time.monotonic() + (self.timeout_s if retry_s is None else retry_s)
        receiver = int(msg.get_receiver_id())
        while True:
            try:
                return self._send_once(msg, deadline_s)
            except grpc.RpcError as exc:
                code = exc.code() if hasattr(exc, "code") else None
                if code != grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline or self._stop.is_set():
                    raise PartyTimeout(f"{self.role_of(receiver)} rank {receiver} at "
                                       f"{self._address(receiver)} did not accept a message within "
                                       f"comm_args.comm_timeout_s = {self.timeout_s:g} s ({code})") from None
                self._forget_channel(receiver)
                time.sleep(0.2)

    def _address(self, rank: int) -> str:
        m = self.grpc_mappings.get(rank)
        return _target(m.grpc_server_ip, m.grpc_server_port) if m else "?"

    # --- receiving -------------------------------------------------------------------------------
    def _drop(self, peer: str, cert_rank: Optional[int], reason: str) -> None:
        who = peer + (f" (certificate of rank {cert_rank})" if cert_rank is not None else "")
        line = f"dropped a message from {who}: {reason}".replace("\n", " ")
        print(f"feddpd: warning: {self.node_type} rank {self.client_rank}: {line}", file=sys.stderr, flush=True)
        if len(self.dropped) < MAX_DROPPED_KEPT:
            self.dropped.append(line)

    def accept(self, item) -> Optional[Message]:
        """The message in a queued (bytes, certificate rank, address), or None once it is dropped."""
        data, cert_rank, peer = item
        try:
            msg = decode_message(data)
        except WireError as exc:
            return self._drop(peer, cert_rank, str(exc))
        sender, params = msg.get_sender_id(), msg.get_params()
        claims = {params.get(Message.MSG_ARG_KEY_SENDER, sender),
                  params.get(GRPCCommManager.MSG_ARG_KEY_SENDER_RANK, sender)}
        if claims != {sender}:
            return self._drop(peer, cert_rank, f"its sender fields disagree ({sender}, {sorted(map(str, claims))})")
        if self.tls is not None and sender != cert_rank:
            return self._drop(peer, cert_rank, f"it claims to come from rank {sender}")
        if sender not in self.last_heard:
            return self._drop(peer, cert_rank, f"rank {sender} is not a peer of {self.node_type} rank {self.client_rank}")
        if msg.get_receiver_id() != self.client_rank or params.get(Message.MSG_ARG_KEY_RECEIVER) != self.client_rank:
            return self._drop(peer, cert_rank, f"it is addressed to rank {msg.get_receiver_id()}")
        return msg

    def message_handling_subroutine(self):
        # Replaces grpc_comm_manager.py:157-193, which polls `qsize()` without sleeping (a core at 100%
        # while it waits), unpickles what arrives, and never notices a silent peer.
        q = self.grpc_servicer.message_q
        while self.is_running:
            try:
                msg = self.accept(q.get(timeout=0.25))
            except queue.Empty:
                msg = None
            if msg is not None:
                sender = int(msg.get_sender_id())
                self.last_heard[sender] = time.monotonic()
                self.heard_from.add(sender)
                msg_type = msg.get_type()
                if msg_type != MSG_TYPE_HEARTBEAT:
                    if msg_type == MyMessage.MSG_TYPE_C2S_CLIENT_STATUS and msg.get(
                            MyMessage.MSG_ARG_KEY_CLIENT_STATUS) == FedMLServerManager.RUN_FINISHED_STATUS_FLAG:
                        self.finished_peers.add(sender)  # done: its silence from now on is expected
                    for observer in self._observers:
                        observer.receive_message(msg_type, msg)
            if q.empty() and self.is_running:  # what arrived is handled: time-outs next
                self._check_peers()
                if self.on_tick is not None:
                    self.on_tick()

    def _check_peers(self):
        now = time.monotonic()
        never = max(self.timeout_s, STARTUP_GRACE_S)
        silent = [p for p, t in self.last_heard.items() if p not in self.finished_peers | self.expendable
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
        with self._channels_lock:
            channels, self._channels = list(self._channels.values()), {}
        for channel in channels:
            channel.close()


class _WatchfulMixin:
    def _init_manager(self):
        # FedMLCommManager._init_manager (core/distributed/fedml_comm_manager.py:189-196) builds FedML's
        # GRPCCommManager; build ours, with the TLS material silo.py loaded (None: plaintext).
        self.com_manager = WatchfulGRPCCommManager(self.args.grpc_ipconfig_path, self.rank, self.size, self.args,
                                                   peers=self._peers(), timeout_s=self.args.comm_timeout_s,
                                                   tls=getattr(self.args, "feddpd_tls", None))
        self.com_manager.add_observer(self)
