"""The aggregators of a gRPC cross-silo server (silo_server.py runs them): FedML's cross-silo FedMLAggregator and
ServerAggregator, subclassed. Averaging and the server step are ServerCore.aggregate's (sp's formula); a round
averages only the uploads of that round that passed the checks (uploads.py), and for supplement methods the
result is one payload per client, which carries the client's supplement (silo_server.py's docstring).
"""
from __future__ import annotations

from collections import OrderedDict

from fedml.core import ServerAggregator
from fedml.cross_silo.server.fedml_aggregator import FedMLAggregator

from .common import ServerCore


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

    def aggregate(self):
        # fedml_aggregator.py:78-106 averages every index's latest upload, answered this round or not: here
        # only this round's, so FedAvg's sample-count weights are renormalised over the clients that answered
        # (a rejected upload was never kept, silo_server.py: it is averaged as little as a missing one).
        flags = self.flag_client_model_uploaded_dict
        answered = [i for i in range(self.client_num) if flags[i]]
        for i in range(self.client_num):
            flags[i] = False
        clients = self.core.round_clients  # this round's client per rank position
        self.core.answered([clients[i] for i in answered], [c for i, c in enumerate(clients) if i not in answered])
        model_list, idxes = self.aggregator.on_before_aggregation(
            [(self.sample_num_dict[i], self.model_dict[i]) for i in answered])
        averaged = self.aggregator.aggregate(model_list)
        if type(averaged) is dict:  # per-client payloads (fedml_aggregator.py:90-97)
            for client_index in range(len(averaged)):
                averaged[client_index] = self.aggregator.on_after_aggregation(averaged[client_index])
        else:
            averaged = self.aggregator.on_after_aggregation(averaged)
        self.set_global_model_params(averaged)
        return averaged, model_list, [answered[i] for i in idxes]

    def test_on_server_for_all_clients(self, round_idx):
        # fedml_aggregator.py:183-219 tests through FedML's aggregator; record our metrics instead.
        self.core.end_round(round_idx)
