"""The server of a gRPC cross-silo run: FedML's cross-silo server manager and aggregator, subclassed.

Supplements travel in FedML's per-client payload: when `ServerAggregator.aggregate` returns a plain dict
{client_index: payload}, the server sends each client its own entry (cross_silo/server/fedml_aggregator.py:
88-102, fedml_server_manager.py:225-231, :314-332) and the client receives it in its trainer's
`set_model_params` (silo_client.py). The server sleeps 5 s before it exits (fedml_server_manager.py:163):
not here.
"""
from __future__ import annotations

import json
from collections import OrderedDict

from fedml.core import ServerAggregator
from fedml.cross_silo.server.fedml_aggregator import FedMLAggregator
from fedml.cross_silo.server.fedml_server_manager import FedMLServerManager
from fedml.cross_silo.server.message_define import MyMessage

from .common import KEY_TRAINED_ON, ServerCore
from .silo_transport import _WatchfulMixin
from .wire import encoded_size

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


def run_server(party, clients: int, show_progress: bool) -> dict:
    """Rank 0 to the end of the run: the result dict (execute's, plus communication bytes)."""
    args = party.args
    [train_num, _, train_global, test_global, local_num, local_train, local_test, _] = party.data.fedml_dataset
    core = ServerCore(party, show_progress, size_of=encoded_size)
    holder = {}
    server_aggregator = FedDPDServerAggregator(party.model, args, core, next_clients=lambda: holder["agg"].next_clients())
    server_aggregator.set_id(0)
    aggregator = FedDPDSiloAggregator(train_global, test_global, train_num, local_train, local_test,
                                      local_num, clients, party.device, args, server_aggregator, core=core)
    holder["agg"] = aggregator
    manager = FedDPDSiloServerManager(args, aggregator, None, 0, clients, "GRPC", core)
    core.loop = manager.run
    try:
        result = core.result("GRPC")
        # what the transport refused (silo_transport.py): one line each, naming the caller's address
        result["messages_dropped"] = list(manager.com_manager.dropped)
        return result
    finally:
        manager.com_manager.stop_receive_message()  # gRPC threads would keep a failed party alive
