"""A client of a gRPC cross-silo run: FedML's client master manager and trainer adapter, subclassed.

The client reads its loader before the payload arrives (fedml_client_master_manager.py:142-144): the
trainer trains on the loader that the payload just installed.

Each client process names a session in its status messages, so that the server tells a restart from a
repeated ONLINE; a model message names its round (FedML's client counts rounds itself, :125-149), so that
a client that rejoins mid-run (comm_args.round_timeout_s) trains the round it was sent, and says which.

When the server checkpoints, each upload also carries the client's state after the round (KEY_CLIENT_STATE: its
loader's shuffle state, this process's torch RNG state); a resumed server sends it back with the first model,
so a client started again (or still running) trains the resumed round as the uninterrupted run would have.
"""
from __future__ import annotations

import secrets
from typing import Optional

from fedml.cross_silo.client.fedml_client_master_manager import ClientMasterManager
from fedml.cross_silo.client.fedml_trainer_dist_adapter import TrainerDistAdapter
from fedml.cross_silo.server.message_define import MyMessage

from .common import KEY_CLIENT_STATE, KEY_ROUND, KEY_SESSION, KEY_TRAINED_ON, ClientCore
from .silo_transport import _WatchfulMixin

def client_trainer(model, args, core: ClientCore):
    """sp's trainer for the method (its registry trainer; FedML's ModelTrainerCLS when it names none) with
    the payload handling of this backend."""
    base = core.party.method.trainer_class()
    if base is None:
        from fedml.ml.trainer.my_model_trainer_classification import ModelTrainerCLS as base

    class PayloadTrainer(base):
        current: Optional[int] = None

        def set_model_params(self, model_parameters):
            if type(model_parameters) is dict:  # our per-client payload
                if model_parameters["supplement"] is not None:
                    core.deliver(model_parameters["client"], model_parameters["supplement"])
                self.current = int(model_parameters["client"])
                if model_parameters.get("client_state") is not None:  # a resumed run's first round
                    core.restore_state(self.current, model_parameters["client_state"])
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
        super().__init__(args, trainer_dist_adapter, comm, rank, size, backend)
        trainer_dist_adapter.train = core.timed(trainer_dist_adapter.train, self._announce)
        self.session = secrets.token_hex(8)
        party = core.party
        self.sends_state = bool(party.cfg["checkpoint_every"]) and party.method.can_resume(party.cfg.sections)

    def _peers(self):
        return [0]

    def _announce(self, seconds):
        print(f"client rank {self.rank}: trained round {self.round_idx} "
              f"(client {self.trainer_dist_adapter.trainer.client_index}, {seconds:.2f} s)", flush=True)

    def handle_message_receive_model_from_server(self, msg_params):
        # fedml_client_master_manager.py:131-155 trains round self.round_idx (its own count): take the server's.
        self.round_idx = int(msg_params.get(KEY_ROUND))
        super().handle_message_receive_model_from_server(msg_params)

    def send_message(self, message):
        # The upload (fedml_client_master_manager.py:167-179) also says what this client trained on, and for
        # which round (it is sent before :149 counts the round).
        if message.get_type() == MyMessage.MSG_TYPE_C2S_SEND_MODEL_TO_SERVER:
            cid = self.trainer_dist_adapter.trainer.client_index
            message.add_params(KEY_TRAINED_ON, self.core.report(cid))
            message.add_params(KEY_ROUND, self.round_idx)
            if self.sends_state:  # what a checkpoint needs of this client (--resume)
                message.add_params(KEY_CLIENT_STATE, self.core.state_of(cid))
        elif message.get_type() == MyMessage.MSG_TYPE_C2S_CLIENT_STATUS:
            message.add_params(KEY_SESSION, self.session)
        super().send_message(message)


def run_client(party, rank: int, clients: int) -> None:
    """Client `rank` to the end of the run."""
    args = party.args
    [train_num, _, _, _, local_num, local_train, local_test, _] = party.data.fedml_dataset
    core = ClientCore(party)
    trainer = client_trainer(party.model, args, core)
    adapter = TrainerDistAdapter(args, party.device, rank, party.model, train_num, local_num, local_train,
                                 local_test, trainer)
    manager = FedDPDSiloClientManager(args, adapter, None, rank, clients, "GRPC", core)
    try:
        manager.run()
    finally:
        manager.com_manager.stop_receive_message()
