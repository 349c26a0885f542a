"""The server of a gRPC cross-silo run: FedML's cross-silo server manager, subclassed (its aggregators:
silo_aggregator.py).

Supplements travel in FedML's per-client payload: when `ServerAggregator.aggregate` returns a plain dict
{client_index: payload}, the server sends each client its own entry (cross_silo/server/fedml_aggregator.py:
88-102, fedml_server_manager.py:225-231, :314-332) and the client receives it in its trainer's
`set_model_params` (silo_client.py). The server sleeps 5 s before it exits (fedml_server_manager.py:163):
not here.

With `comm_args.round_timeout_s` > 0 a round closes without the clients still silent that long after its
models went out, or at once without those its model could not reach: FedML's handler
(fedml_server_manager.py:174-251) waits for every client, so the round's close is ours (`_close_round`).
Every model message carries its round (`KEY_ROUND`); an upload for another round is dropped with one line.
A client that restarts announces a new session (`KEY_SESSION`) and gets the model at the next round start.
Every upload is checked before FedML's aggregator keeps it (ServerCore.received, uploads.py): a bad one is dropped
with one line, recorded (`rejected_uploads`), and the round goes on without it, as without a silent client.

--resume: the server checkpoints like sp (checkpoint.Checkpointer over ServerCore). Each upload carries the
client's state after the round (`KEY_CLIENT_STATE`: its loader's shuffle state and its torch RNG state), which
checkpoints hold. A resumed server starts the checkpoint's next round with sync messages, not FedML's init
(a client still running from before ignores a second init, fedml_client_master_manager.py:103-105), each
carrying the client's newest supplement and its saved state, so the clients go on as if never interrupted.
"""
from __future__ import annotations

import json
import sys
import time

from fedml.cross_silo.server.fedml_server_manager import FedMLServerManager
from fedml.cross_silo.server.message_define import MyMessage

from ..errors import PartyError, PartyTimeout
from .common import KEY_CLIENT_STATE, KEY_ROUND, KEY_SESSION, KEY_TRAINED_ON, ServerCore
from .silo_aggregator import FedDPDServerAggregator, FedDPDSiloAggregator
from .silo_transport import _WatchfulMixin
from .wire import encoded_size

MODEL_MESSAGES = (MyMessage.MSG_TYPE_S2C_INIT_CONFIG, MyMessage.MSG_TYPE_S2C_SYNC_MODEL_TO_CLIENT)
RETRY_DOWN_CLIENT_S = 1.0  # with round_timeout_s: how long a refused model message to a client is retried


class FedDPDSiloServerManager(_WatchfulMixin, FedMLServerManager):
    def __init__(self, args, aggregator, comm, rank, client_num, backend, core: ServerCore):
        self.core = core
        super().__init__(args, aggregator, comm, rank, client_num, backend)
        self.round_timeout_s = float(getattr(args, "round_timeout_s", 0.0))
        self.min_clients = int(getattr(args, "min_clients_per_round", 1))
        self.reached: set[int] = set()  # ranks the open round's model reached
        self.rejected: set[int] = set()  # ranks whose upload of the open round failed the checks (uploads.py)
        self.reached_round = -1
        self.sessions: dict[int, str] = {}  # rank -> the session its latest ONLINE status named
        self.deadline = None  # when the open round closes without the clients still silent
        self.resume_sending = None  # the round the resumed run's first messages start (send_init_msg)
        if self.round_timeout_s > 0:
            self.com_manager.on_tick = self._on_tick

    def _peers(self):
        # called from FedMLCommManager.__init__, before fedml_server_manager.py:29 sets client_real_ids
        return [int(c) for c in json.loads(self.args.client_id_list)]

    def _say(self, line: str) -> None:
        print(f"feddpd: warning: server rank 0: {line}", file=sys.stderr, flush=True)

    def _start_clock(self) -> None:
        if self.round_timeout_s > 0:
            self.deadline = time.monotonic() + self.round_timeout_s
            self.com_manager.expendable = set(self.client_real_ids)  # a silent client misses rounds, no more

    def handle_message_receive_model_from_client(self, msg_params):
        # fedml_server_manager.py:174-186 keeps the model and sample count, and closes the round once every
        # client answered; here once every client the round's model reached answered. Notes bytes and report.
        sender = int(msg_params.get(MyMessage.MSG_ARG_KEY_SENDER))
        if msg_params.get(KEY_ROUND) != self.args.round_idx:
            self._say(f"dropped client rank {sender}'s upload for round {msg_params.get(KEY_ROUND)}: round "
                      f"{self.args.round_idx} is open (it came after comm_args.round_timeout_s)")
            return
        if sender not in self.reached:  # e.g. trained for the server before a restart (--resume)
            self._say(f"dropped client rank {sender}'s upload for round {msg_params.get(KEY_ROUND)}: this server did "
                      f"not send it that round's model")
            return
        position, flags = self.client_real_ids.index(sender), self.aggregator.flag_client_model_uploaded_dict
        if flags[position] or sender in self.rejected:
            self._say(f"dropped client rank {sender}'s second upload for round {self.args.round_idx}")
            return
        # the client this rank was sent (fedml_server_manager.py:225-231); the upload is checked before FedML's
        # aggregator keeps it: a bad one is dropped and the round goes on without it, as without a silent client
        cid, model = self.core.round_clients[position], msg_params.get(MyMessage.MSG_ARG_KEY_MODEL_PARAMS)
        samples = msg_params.get(MyMessage.MSG_ARG_KEY_NUM_SAMPLES)
        why = self.core.received(self.args.round_idx, cid, model, msg_params.get(KEY_TRAINED_ON),
                                 msg_params.get(KEY_CLIENT_STATE), samples)
        if why:
            self.rejected.add(sender)
            self._say(f"rejected client rank {sender}'s upload for round {self.args.round_idx} (client {cid}): {why}; "
                      f"the round goes on without it")
        else:
            self.aggregator.add_local_trained_result(position, model, samples)
        if all(flags[self.client_real_ids.index(r)] or r in self.rejected for r in self.reached):
            self._close_round()

    def _on_tick(self):
        if self.deadline is None or time.monotonic() < self.deadline:
            return
        self.deadline = None
        if self.args.round_idx >= self.round_num:  # the last model went out; the silent ones will not finish
            self._say(f"client rank(s) {', '.join(str(r) for r in sorted(self.reached - self._finished()))} did "
                      f"not report finishing within comm_args.round_timeout_s; the run ends without them")
            self.finish()
            return
        self._close_round()

    def _close_round(self):
        # fedml_server_manager.py:187-251 without its MLOps, wandb and Context calls: aggregate (only the
        # uploads of this round), test, select the next round's clients, send each its model, count the round.
        r, flags, ids = self.args.round_idx, self.aggregator.flag_client_model_uploaded_dict, self.client_real_ids
        missing = [rank for i, rank in enumerate(ids) if not flags[i] and rank not in self.rejected]
        rejected, ranks = sorted(self.rejected), (lambda rs: ", ".join(map(str, rs)))
        averaged = len(ids) - len(missing) - len(rejected)
        if averaged < self.min_clients and not rejected:
            raise PartyTimeout(f"round {r}: {averaged} of {len(ids)} clients answered within comm_args.round_timeout_s "
                               f"= {self.round_timeout_s:g} s (missing client rank(s) {ranks(missing)}); "
                               f"train_args.min_clients_per_round is {self.min_clients}")
        if averaged < self.min_clients:
            raise PartyError(f"round {r}: {averaged} of {len(ids)} clients' uploads can be averaged (rejected client "
                             f"rank(s) {ranks(rejected)}" + (f"; missing {ranks(missing)}" if missing else "")
                             + f"); train_args.min_clients_per_round is {self.min_clients}")
        if missing:
            self._say(f"round {r} goes on without client rank(s) {ranks(missing)}: averaging the {averaged} "
                      f"upload(s) that came")
        self.deadline = None
        global_model_params, _, _ = self.aggregator.aggregate()
        self.aggregator.test_on_server_for_all_clients(r)
        self.client_id_list_in_this_round = self.aggregator.client_selection(
            r, self.client_real_ids, self.args.client_num_per_round)
        self.data_silo_index_list = self.aggregator.data_silo_selection(
            r, self.args.client_num_in_total, len(self.client_id_list_in_this_round))
        for receiver, client_index in zip(self.client_id_list_in_this_round, self.data_silo_index_list):
            if type(global_model_params) is dict:
                self.send_message_diff_sync_model_to_client(receiver, global_model_params[client_index], client_index)
            else:
                self.send_message_sync_model_to_client(receiver, global_model_params, client_index)
        self.args.round_idx += 1
        self._start_clock()

    def send_message(self, message):
        # Every model message leaves through here (fedml_server_manager.py:261-277, :292-332): count it.
        kind, receiver = message.get_type(), int(message.get_receiver_id())
        starts = None
        if kind in MODEL_MESSAGES:
            # The init goes out at round 0; a sync after aggregating round r (before FedML's round counter
            # moves, :245) starts round r + 1.
            starts = (0 if kind == MyMessage.MSG_TYPE_S2C_INIT_CONFIG else self.resume_sending
                      if self.resume_sending is not None else self.args.round_idx + 1)
            self.core.begin_round(starts, self.data_silo_index_list)
            if starts != self.reached_round:
                self.reached, self.rejected, self.reached_round = set(), set(), starts
            message.add_params(KEY_ROUND, starts)
        if self.round_timeout_s > 0 and self.is_initialized and receiver != 0:
            # a client that does not take its model now misses the round (a dead one refuses at once)
            try:
                self.com_manager.send_message(message, retry_s=min(RETRY_DOWN_CLIENT_S, self.round_timeout_s),
                                              deadline_s=min(self.round_timeout_s, self.args.comm_timeout_s))
            except PartyError:
                self.core.forget_rank(receiver)  # what it held is unknown now
                what = f"model of round {starts}" if starts is not None else f"{kind} message"
                self._say(f"client rank {receiver} ({self.com_manager._address(receiver)}) did not take the {what}; "
                          f"the run goes on without it")
                return
        else:
            super().send_message(message)
        if starts is not None:
            self.reached.add(receiver)
            payload = message.get(MyMessage.MSG_ARG_KEY_MODEL_PARAMS)
            if type(payload) is dict:
                self.core.sent_model(starts, payload["model"], payload["supplement"])
            else:
                self.core.sent_model(starts, payload)

    def send_init_msg(self):
        # fedml_server_manager.py:48-67 sends every client the init message of round 0. A resumed run starts
        # round `start` as _close_round starts any round after the first: the same silo selection (FedML draws
        # round r + 1's with r, :211-216) and a sync message per client, with its newest supplement and its
        # state after round start - 1 (ServerCore.resume_payload).
        start = self.core.resume_round
        if not start:
            return super().send_init_msg()
        self.client_id_list_in_this_round = self.aggregator.client_selection(
            start - 1, self.client_real_ids, self.args.client_num_per_round)
        self.data_silo_index_list = self.aggregator.data_silo_selection(
            start - 1, self.args.client_num_in_total, len(self.client_id_list_in_this_round))
        model = self.aggregator.get_global_model_params()
        self.resume_sending = start
        try:
            for receiver, client_index in zip(self.client_id_list_in_this_round, self.data_silo_index_list):
                # after the last round the clients only need the model to finish (no supplement)
                payload = self.core.resume_payload(receiver, client_index, model, supplement=start < self.round_num)
                self.send_message_diff_sync_model_to_client(receiver, payload, client_index)
        finally:
            self.resume_sending = None

    def process_online_status(self, client_status, msg_params):
        # fedml_server_manager.py:124-144 sends every client the init message again whenever one more
        # ONLINE status arrives (a client answers both its own start and the server's status check). An
        # ONLINE with a new session after the start is a restarted client: with round_timeout_s it gets the
        # model (and its newest supplement) at the next round start; without, the run stops.
        sender = int(msg_params.get_sender_id())
        session, before = msg_params.get(KEY_SESSION), self.sessions.get(sender)
        self.sessions[sender] = session
        if self.is_initialized:
            self.client_online_mapping[str(sender)] = True
            if before is not None and session != before:
                if self.round_timeout_s <= 0:
                    raise PartyError(f"client rank {sender} restarted mid-run; with comm_args.round_timeout_s > 0 "
                                     f"it would rejoin")
                self.core.forget_rank(sender)
                self._say(f"client rank {sender} rejoined (a new process); the next round start sends it the model")
            return
        super().process_online_status(client_status, msg_params)
        if self.is_initialized:
            self._start_clock()

    def _finished(self) -> set[int]:
        return {int(c) for c, done in self.client_finished_mapping.items() if done}

    def process_finished_status(self, client_status, msg_params):
        # fedml_server_manager.py:146-164 without its `time.sleep(5)` (:163) and MLOps calls (offline here);
        # it waits for the clients the last model reached.
        self.client_finished_mapping[str(msg_params.get_sender_id())] = True
        if self.reached <= self._finished():
            self.finish()


def run_server(party, clients: int, show_progress: bool, out_dir=None, state=None) -> dict:
    """Rank 0 to the end of the run: the result dict (execute's, plus communication bytes). Checkpoints go
    into `out_dir` (run_args.checkpoint_every); with a checkpoint's `state` the run continues from it."""
    args = party.args
    [train_num, _, train_global, test_global, local_num, local_train, local_test, _] = party.data.fedml_dataset
    core = ServerCore(party, show_progress, size_of=encoded_size)
    core.resumable = core.drop_bad_uploads = True
    holder = {}
    server_aggregator = FedDPDServerAggregator(party.model, args, core, next_clients=lambda: holder["agg"].next_clients())
    server_aggregator.set_id(0)
    aggregator = FedDPDSiloAggregator(train_global, test_global, train_num, local_train, local_test,
                                      local_num, clients, party.device, args, server_aggregator, core=core)
    holder["agg"] = aggregator
    manager = FedDPDSiloServerManager(args, aggregator, None, 0, clients, "GRPC", core)
    core.loop = manager.run
    try:
        result = core.result("GRPC", out_dir, state)
        # what the transport refused (silo_transport.py): one line each, naming the caller's address
        result["messages_dropped"] = list(manager.com_manager.dropped)
        return result
    finally:
        manager.com_manager.stop_receive_message()  # gRPC threads would keep a failed party alive
