"""FedDPD and the baselines on FedML's MPI simulation (`backend: MPI`).

    mpirun -np <client_num_per_round + 1> python -m fedml_feddpd run --cf CONFIG [--out DIR]
    ... --resume                   # the same command again after a kill: continue from rank 0's last checkpoint

Rank 0 is the server, ranks 1.. the clients (fedml/__init__.py:268-281). Everything below extends
FedML's own MPI FedAvg classes (simulation/mpi/fedavg/) through subclasses; each override names the
FedML line it answers:

* the aggregator's averaging is hard-coded (FedAVGAggregator.py:90 calls `_fedavg_aggregation_`), so
  that call is where the FedDPD server step runs, after averaging;
* the server's messages carry only the model and client index (FedAvgServerManager.py:93-112): `send_message` is the one funnel every message passes, and there the client's own new
  supplement is added, for that client only;
* the client manager reads the supplement before FedML's handler re-reads the client's loader
  (FedAvgClientManager.py:50-58 -> FedAVGTrainer.update_dataset);
* FedML's receive loop polls its queue every 0.1 ms (core/distributed/communication/mpi/com_manager.py:86-94),
  which keeps a core busy in every waiting rank: a blocking queue read replaces it.

--resume: rank 0 checkpoints like sp (checkpoint.Checkpointer over ServerCore), and each upload carries the
client's state after the round (KEY_CLIENT_STATE: its loader's shuffle state, its torch RNG state). `mpirun`
ends every rank when one dies, so a resumed job starts every client afresh: rank 0 starts the checkpoint's next
round with one sync message per rank that names the round (KEY_ROUND; FedML's client counts rounds itself) and
carries the client's saved state and newest supplement. Before any of that, rank 0 alone reads the run folder
and tells the clients (one broadcast) whether there is anything to run.
"""
from __future__ import annotations

import os
import queue
import sys
import time
from pathlib import Path

from fedml.core.distributed.communication.message import Message
from fedml.core.distributed.communication.mpi.com_manager import MpiCommunicationManager
from fedml.simulation.mpi.fedavg.FedAVGAggregator import FedAVGAggregator
from fedml.simulation.mpi.fedavg.FedAVGTrainer import FedAVGTrainer
from fedml.simulation.mpi.fedavg.FedAvgClientManager import FedAVGClientManager
from fedml.simulation.mpi.fedavg.FedAvgServerManager import FedAVGServerManager
from fedml.simulation.mpi.fedavg.message_define import MyMessage

from ..checkpoint import server_resume_state
from ..errors import PartyError
from ..outputs import default_out_dir, write_outputs
from .common import KEY_CLIENT_STATE, KEY_ROUND, KEY_SUPPLEMENT, KEY_TRAINED_ON, ClientCore, ServerCore, open_party

MPI_WORLD_ENV = ("PMI_SIZE", "PMI_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_LOCAL_RANK",
                 "OMPI_COMM_WORLD_LOCAL_SIZE", "MV2_COMM_WORLD_SIZE", "MV2_COMM_WORLD_RANK", "MPI_LOCALRANKID",
                 "MPI_LOCALNRANKS")


class BlockingMpiCommManager(MpiCommunicationManager):
    """FedML's MPI communication manager with a receive loop that sleeps while nothing arrives."""

    def handle_receive_message(self):
        # com_manager.py:81-98 spins on `qsize()` with a 0.1 ms sleep; a blocking get with a timeout
        # (to notice `stop_receive_message`) waits without using the CPU.
        self._notify_connection_ready()
        while not self._stop_running:
            try:
                msg_params = self.q_receiver.get(timeout=0.2)
            except queue.Empty:
                continue
            self.notify(msg_params)

    def _free_q(self, q):
        # com_manager.py:120 calls `q.get_no_wait()`, which does not exist (AttributeError at shutdown
        # whenever a message is still queued).
        while not q.empty():
            q.get_nowait()


class _BlockingMpiMixin:
    def _init_manager(self):
        # FedMLCommManager._init_manager (core/distributed/fedml_comm_manager.py:133-136) builds the
        # polling MpiCommunicationManager; build ours instead.
        if self.backend != "MPI":
            return super()._init_manager()
        self.com_manager = BlockingMpiCommManager(self.comm, self.rank, self.size)
        self.com_manager.add_observer(self)


class FedDPDMPIAggregator(FedAVGAggregator):
    """FedML's MPI aggregator; averaging and the server step go through `ServerCore`."""

    def __init__(self, *args, core: ServerCore, **kwargs):
        super().__init__(*args, **kwargs)
        self.core = core

    def client_sampling(self, round_idx, client_num_in_total, client_num_per_round):
        # Called once at the start of every round with that round's index (FedAvgServerManager.py:34-38
        # and :79-83): the round's client ids, which the aggregator never receives otherwise.
        clients = super().client_sampling(round_idx, client_num_in_total, client_num_per_round)
        self.core.start_round(round_idx, clients)
        return clients

    def _fedavg_aggregation_(self, model_list):
        # FedAVGAggregator.py:90 (`aggregate`) calls this with [(n, state)] in worker order, which is the
        # order of the round's sampled clients: average as sp does, then the FedDPD server step.
        return self.core.aggregate(self.args.round_idx, model_list, self.core.round_clients)

    def test_on_server_for_all_clients(self, round_idx):
        # FedAVGAggregator.py:148-172 tests with FedML's default aggregator; record our metrics instead.
        self.core.end_round(round_idx)


class FedDPDMPIServerManager(_BlockingMpiMixin, FedAVGServerManager):
    def __init__(self, args, aggregator, comm, rank, size, backend, core: ServerCore):
        self.core = core
        super().__init__(args, aggregator, comm, rank, size, backend)

    def handle_message_receive_model_from_client(self, msg_params):
        # FedAvgServerManager.py:51-58 keeps model and sample count unchecked; note bytes and the client's report,
        # and check the upload first (ServerCore.received: a bad one stops the job, its ranks being one trusted job).
        sender = msg_params.get(MyMessage.MSG_ARG_KEY_SENDER)
        self.core.received(self.args.round_idx, self.core.round_clients[sender - 1],
                           msg_params.get(MyMessage.MSG_ARG_KEY_MODEL_PARAMS), msg_params.get(KEY_TRAINED_ON),
                           msg_params.get(KEY_CLIENT_STATE), msg_params.get(MyMessage.MSG_ARG_KEY_NUM_SAMPLES))
        super().handle_message_receive_model_from_client(msg_params)

    def send_init_msg(self):
        # FedAvgServerManager.py:32-43 starts round 0 with FedML's init message, and a client trains round 0 on
        # it (FedAvgClientManager.py:37-44): messages name no round. A resumed run starts round `start` as
        # :78-91 start every later round (the same client sampling, one sync message per rank), each message
        # naming its round (KEY_ROUND) and carrying the client's state after its latest round (the newest
        # supplement joins it in send_message: the fresh rank holds none).
        start = self.core.resume_round
        if not start:
            return super().send_init_msg()
        clients = self.aggregator.client_sampling(start, self.args.client_num_in_total, self.args.client_num_per_round)
        model = self.aggregator.get_global_model_params()
        for rank in range(1, self.size):
            self.core.forget_rank(rank)
            message = Message(MyMessage.MSG_TYPE_S2C_SYNC_MODEL_TO_CLIENT, self.get_sender_id(), rank)
            message.add_params(MyMessage.MSG_ARG_KEY_MODEL_PARAMS, model)
            message.add_params(MyMessage.MSG_ARG_KEY_CLIENT_INDEX, str(clients[rank - 1]))
            message.add_params(KEY_ROUND, start)
            message.add_params(KEY_CLIENT_STATE, self.core.resume_state(clients[rank - 1]))
            self.send_message(message)

    def send_message(self, message):
        # Every model message leaves through here (FedAvgServerManager.py:93-99, :101-112): add the
        # receiving client's new supplement, for that client only.
        if message.get_type() in (MyMessage.MSG_TYPE_S2C_INIT_CONFIG, MyMessage.MSG_TYPE_S2C_SYNC_MODEL_TO_CLIENT):
            cid = int(message.get(MyMessage.MSG_ARG_KEY_CLIENT_INDEX))
            sup = self.core.outgoing(message.get_receiver_id(), cid)
            if sup is not None:
                message.add_params(KEY_SUPPLEMENT, sup)
            self.core.sent_model(self.args.round_idx, message.get(MyMessage.MSG_ARG_KEY_MODEL_PARAMS), sup)
        super().send_message(message)


class FedDPDMPIClientManager(_BlockingMpiMixin, FedAVGClientManager):
    def __init__(self, args, trainer, comm, rank, size, backend, core: ClientCore):
        self.core = core
        super().__init__(args, trainer, comm, rank, size, backend)
        trainer.train = core.timed(trainer.train)
        party = core.party
        self.sends_state = bool(party.cfg["checkpoint_every"]) and party.method.can_resume(party.cfg.sections)

    def _take_supplement(self, msg_params):
        sup = msg_params.get(KEY_SUPPLEMENT)
        if sup is not None:
            self.core.deliver(int(msg_params.get(MyMessage.MSG_ARG_KEY_CLIENT_INDEX)), sup)

    def handle_message_init(self, msg_params):
        self._take_supplement(msg_params)
        super().handle_message_init(msg_params)
        if self.num_rounds == 1:
            # FedAvgClientManager.py:37-44 trains round 0 and never finishes; with one round this rank
            # would wait forever.
            self.finish()

    def handle_message_receive_model_from_server(self, msg_params):
        # The supplement replaces this client's loader before FedML's handler reads it
        # (FedAvgClientManager.py:55-56 -> FedAVGTrainer.update_dataset, FedAVGTrainer.py:33-38).
        self._take_supplement(msg_params)
        start = msg_params.get(KEY_ROUND)
        if start is not None:
            # The first message of a resumed run (FedDPDMPIServerManager.send_init_msg) names its round: FedML's
            # handler adds one to its own count (FedAvgClientManager.py:57) and finishes after round
            # num_rounds - 1 (:59-61), so the count starts one before. The client's saved state goes into the
            # loader the supplement just installed, before the handler reads it.
            self.args.round_idx = int(start) - 1
            state = msg_params.get(KEY_CLIENT_STATE)
            if state is not None:
                self.core.restore_state(int(msg_params.get(MyMessage.MSG_ARG_KEY_CLIENT_INDEX)), state)
        super().handle_message_receive_model_from_server(msg_params)

    def send_message(self, message):
        # The upload (FedAvgClientManager.py:63-71) also says what this client trained on and for how long.
        if message.get_type() == MyMessage.MSG_TYPE_C2S_SEND_MODEL_TO_SERVER:
            message.add_params(KEY_TRAINED_ON, self.core.report(self.trainer.client_index))
            if self.sends_state:  # what rank 0's checkpoint needs of this client (--resume)
                message.add_params(KEY_CLIENT_STATE, self.core.state_of(self.trainer.client_index))
        super().send_message(message)


def run_mpi(cfg, out_dir=None, show_progress: bool = True, resume: bool = False):
    """One rank of an MPI run. Rank 0 returns the result dict (and writes the outputs); clients return None.
    `resume`: continue from the checkpoint in the output folder (rank 0's; the clients need nothing).

    Any exception aborts the whole MPI job (MPI_Abort), so no rank is left waiting for a dead peer:
    FedML's receive threads are not daemons and would keep a failed rank alive.
    """
    from mpi4py import MPI

    out = Path(out_dir) if out_dir else default_out_dir(cfg)
    kind, found = _start(MPI.COMM_WORLD, cfg, out, resume)
    if kind != "run":  # a finished run (rank 0 returns it), a refusal (rank 0 raises it), or nothing left
        return found
    try:
        return _run_rank(cfg, out, found, show_progress)
    except Exception as exc:
        rank = MPI.COMM_WORLD.Get_rank()
        print(f"feddpd: error: MPI rank {rank}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}",
              file=sys.stderr, flush=True)
        if not MPI.Is_finalized():
            MPI.COMM_WORLD.Abort(1)
        raise


def _start(comm, cfg, out: Path, resume: bool):
    """What this rank does: ("run", rank 0's checkpoint state or None), or ("stop", rank 0's finished result /
    None). Only rank 0 reads `out` (the clients may run where it is not); it broadcasts the verdict before any
    FedML thread starts, so a refusal is one line from rank 0 and no client waits for a server that left."""
    verdict, state, found = "run", None, None
    if comm.Get_rank() == 0:
        try:
            kind, state = server_resume_state(cfg, out, resume)
        except Exception as exc:  # CheckpointError (one line), or anything else: no client may wait on
            verdict, found = "stop", exc
        else:
            if kind == "finished":
                verdict, found, state = "finished", state, None
            elif state is not None and state["round"] + 1 >= cfg["comm_round"]:
                verdict = "done"  # killed after the last round's checkpoint: rank 0 only writes the outputs
    verdict = comm.bcast(verdict, root=0)
    if comm.Get_rank() != 0:
        return ("run", None) if verdict == "run" else ("stop", None)
    if isinstance(found, Exception):
        raise found
    return ("stop", found) if verdict == "finished" else ("run", state)


def _run_rank(cfg, out: Path, state, show_progress):
    from fedml.core.dp.fedml_differential_privacy import FedMLDifferentialPrivacy
    from fedml.core.security.fedml_attacker import FedMLAttacker
    from fedml.core.security.fedml_defender import FedMLDefender
    from fedml.ml.aggregator.aggregator_creator import create_server_aggregator
    from fedml.ml.trainer.trainer_creator import create_model_trainer

    party = open_party(cfg)
    args = party.args
    rank, size = int(args.rank), int(args.worker_num)  # worker_num = MPI world size here (fedml/__init__.py:277)
    # MPI is up (fedml.init imported mpi4py). The server's DPO runs TRL on accelerate, which reads the
    # launcher's world size from these variables (accelerate/state.py:805) and then tries a
    # torch.distributed rendezvous; every rank here is one process for torch.
    for var in MPI_WORLD_ENV:
        os.environ.pop(var, None)
    if size != args.client_num_per_round + 1:
        raise PartyError(f"mpirun -np {size}: expected client_num_per_round + 1 = {args.client_num_per_round + 1} "
                         f"processes (one server rank, one rank per client of a round)")
    # As FedML_FedAvg_distributed does (simulation/mpi/fedavg/FedAvgAPI.py:35-37).
    FedMLAttacker.get_instance().init(args)
    FedMLDefender.get_instance().init(args)
    FedMLDifferentialPrivacy.get_instance().init(args)
    [train_num, _, train_global, test_global, local_num, local_train, local_test, _] = party.data.fedml_dataset
    if rank == 0:
        # init_server (FedAvgAPI.py:71-109) with our aggregator and manager.
        core = ServerCore(party, show_progress)
        core.resumable = True
        server_aggregator = create_server_aggregator(party.model, args)
        server_aggregator.set_id(-1)
        aggregator = FedDPDMPIAggregator(train_global, test_global, train_num, local_train, local_test, local_num,
                                         size - 1, party.device, args, server_aggregator, core=core)
        manager = FedDPDMPIServerManager(args, aggregator, args.comm, rank, size, "MPI", core)

        def loop():
            if core.resume_round >= args.comm_round:  # nothing left to train; the clients did not start
                return manager.finish()
            manager.send_init_msg()
            manager.run()

        core.loop = loop
        started = time.perf_counter()
        result = core.result("MPI", out, state)
        result["loop_seconds"] = time.perf_counter() - started
        write_outputs(out, result, cfg)
        return result
    # init_client (FedAvgAPI.py:112-141) with the method's client trainer, as on sp (FedML's default
    # trainer when the registry names none).
    core = ClientCore(party)
    trainer_cls = party.method.trainer_class()
    model_trainer = trainer_cls(party.model, args) if trainer_cls else create_model_trainer(party.model, args)
    model_trainer.set_id(rank - 1)
    trainer = FedAVGTrainer(rank - 1, local_train, local_num, local_test, train_num, party.device, args,
                            model_trainer)
    manager = FedDPDMPIClientManager(args, trainer, args.comm, rank, size, "MPI", core)
    manager.run()
    return None
