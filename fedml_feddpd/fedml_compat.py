"""FedML 0.9.6 on sp, offline: `fedml.init` without network, FedML's sp round loops with round hooks,
and the sp API of a method built from its registry entry. Each workaround names the FedML file:line it
answers. The other places that patch or subclass FedML are listed in docs/DESIGN.md ("Where FedML is
patched"): fedml_plugin.py (FedML's own entry points) and distributed/ (MPI and gRPC managers).
"""
from __future__ import annotations

import copy
import logging
import os
import time

OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "WANDB_MODE": "disabled",
    "WANDB_SILENT": "true",
}


def quiet_fedml_imports() -> None:
    """Hide the two warnings FedML 0.9.6's imports print on every command: requests' RequestsDependencyWarning
    (FedML pins urllib3/chardet ranges that requests warns about) and setuptools' pkg_resources UserWarning
    (fedml/computing/scheduler/comm_utils/sys_utils.py:17). Only those two, matched by message and by the
    module that warns; called by our entry points (cli.main, compare's workers), never on import, so a
    user's own warnings and scripts are untouched."""
    import warnings

    warnings.filterwarnings("ignore", message=r"urllib3 \(.*\) or chardet", module="requests")
    warnings.filterwarnings("ignore", message=r"pkg_resources is deprecated", category=UserWarning,
                            module=r"fedml\.")


def set_offline_environment() -> None:
    """No hub, telemetry or wandb traffic from any library we load."""
    for key, value in OFFLINE_ENV.items():
        os.environ[key] = value


def _empty_mlops_configs():
    # Matches the 4-tuple MLOpsConfigs.fetch_all_configs returns; the LOG_SERVER_URL key is read
    # right after the call (core/mlops/__init__.py:1354).
    return {}, {}, {"LOG_SERVER_URL": ""}, {}


def patch_fedml_offline() -> None:
    """Keep `fedml.init` off the network.

    core/mlops/__init__.py:106 always calls `fetch_config`, which POSTs to FedML's cloud
    (core/mlops/mlops_configs.py:75-87) and retries 5 times. We hand it empty configs instead.
    `collect_env` (fedml/__init__.py:85) is avoided by calling `fedml.init(check_env=False)`.
    """
    set_offline_environment()
    from fedml.core.mlops.mlops_configs import MLOpsConfigs

    MLOpsConfigs.fetch_all_configs = staticmethod(_empty_mlops_configs)
    # FedML logs every batch and round at INFO; keep our tqdm bars readable.
    logging.getLogger().setLevel(logging.WARNING)


def init_fedml(args):
    """`fedml.init` without network, profiling threads or the print-to-logging redirect."""
    patch_fedml_offline()
    import fedml

    # fedml/__init__.py:162 starts a system-performance profiler thread unless this is False.
    args.sys_perf_profiling = False
    # should_init_logs=False: MLOpsRuntimeLog.init_logs (core/mlops/__init__.py:105) redirects
    # print into logging (mlops_runtime_log.py:193) and creates ./logs.
    args = fedml.init(args, check_env=False, should_init_logs=False)
    logging.getLogger().setLevel(logging.WARNING)
    return args


class RoundHooks:
    """Mixin over FedML's sp round loops (`simulation/sp/fedavg/fedavg_api.py` FedAvgAPI and
    `simulation/sp/fedprox/fedprox_trainer.py` FedProxTrainer, identical `train()` loops) that lets
    us act once per round without copying the loop:

    * `_client_sampling` (fedavg_api.py:84) is the first call of a round: it gives us the round
      index and the sampled client ids, which `_aggregate` never receives.
    * `_aggregate(w_locals)` (fedavg_api.py:106) averages *into* `w_locals[0]` (:150-158), so the
      uploads are copied before FedML averages, then `after_aggregation` sees them with client ids.
    * `_local_test_on_all_clients` (fedavg_api.py:111-120) is the per-round test hook; the runner
      forces `frequency_of_the_test = 1` so it fires every round and we evaluate on our own schedule.
    * Resuming: `train()` always counts rounds from 0 (fedavg_api.py:71) and starts from the trainer's
      current parameters (:68). `train_from(start)` runs `comm_round - start` rounds and the hooks add
      `start` to FedML's round index, so sampling (seeded by the round, fedavg_api.py:132) and every
      record see the true round.
    """

    round_offset = 0

    def train_from(self, start_round: int) -> None:
        total = self.args.comm_round
        self.round_offset, self.args.comm_round = start_round, total - start_round
        # fedavg_api.py:68 takes the trainer's *live* state dict (ModelTrainerCLS.get_model_params,
        # ml/trainer/my_model_trainer_classification.py:15) as the first round's global model; each
        # client loads its deepcopy into the shared model and trains it in place, so without a copy
        # client i would start from client i-1's trained weights in that round.
        trainer = self.model_trainer

        def first_call_copies():
            del trainer.get_model_params  # back to the class's method
            return copy.deepcopy(trainer.get_model_params())

        trainer.get_model_params = first_call_copies
        try:
            self.train()
        finally:
            trainer.__dict__.pop("get_model_params", None)
            self.round_offset, self.args.comm_round = 0, total

    def install_round_hooks(self, on_round_end, after_aggregation=None):
        self._on_round_end = on_round_end
        self._after_aggregation = after_aggregation
        self.round_idx = -1
        self.round_clients: list[int] = []
        self.client_seconds = 0.0
        self.server_seconds = 0.0
        from .uploads import model_spec

        # what every upload must match (uploads.py); the global model's keys, shapes and dtypes never change
        self._upload_spec = model_spec(self.model_trainer.model.state_dict())
        for client in self.client_list:
            client.train = self._timed(client.train)

    def _timed(self, train):
        # FedAvg's clients train(w_global); SCAFFOLD's train(w_global, c_global) (scaffold_trainer.py:112),
        # FedNova's train(net=..., ratio=...) (fednova_trainer.py:107-112)
        def timed_train(*args, **kwargs):
            start = time.perf_counter()
            try:
                return train(*args, **kwargs)
            finally:
                self.client_seconds += time.perf_counter() - start
        return timed_train

    def _client_sampling(self, round_idx, client_num_in_total, client_num_per_round):
        round_idx += self.round_offset
        clients = super()._client_sampling(round_idx, client_num_in_total, client_num_per_round)
        self.round_idx = round_idx
        self.round_clients = [int(c) for c in clients]
        self.client_seconds = self.server_seconds = 0.0
        return clients

    def _aggregate(self, w_locals):
        start = time.perf_counter()
        from .uploads import check_upload

        # Every upload is checked before FedML averages it (fedavg_api.py:150-158 would average NaN or another
        # model's shapes as they come): entries are (samples, params, ...), SCAFFOLD's params its weights delta.
        # sp is one trusted process, so a bad upload is a fault: one line naming the client stops the run.
        for cid, entry in zip(self.round_clients, w_locals):
            check_upload(self.round_idx, cid, entry[0], entry[1], self._upload_spec,
                         getattr(self.args, "max_client_samples", 0))
        step, uploads = self._after_aggregation, None
        if step is not None:
            from .supplement import ClientUpload

            # What FedAvg already receives, nothing more: id, sample count, a private copy of the
            # uploaded parameters. Entries are (samples, params, ...); an API whose clients upload
            # something else (SCAFFOLD's deltas, scaffold_trainer.py:115) defines upload_params(entry)
            # and aggregated_params(result) (baselines/fedml_sp.py).
            params_of = getattr(self, "upload_params", lambda entry: entry[1])
            uploads = [ClientUpload(cid, entry[0], copy.deepcopy(params_of(entry)))
                       for cid, entry in zip(self.round_clients, w_locals)]
            # feddpd.delivery: server trains each upload on its supplement before FedML averages them
            before = getattr(step, "before_aggregation", None)
            trained = before(self.round_idx, uploads, super()._aggregate) if before is not None else None
            for i, cid in enumerate(self.round_clients):
                if trained and cid in trained:
                    w_locals[i] = (w_locals[i][0], trained[cid]) + tuple(w_locals[i][2:])
        w_global = super()._aggregate(w_locals)
        if uploads is not None and getattr(self, "global_set_after_aggregate", False):
            self._pending_step = uploads  # FedOpt: its server optimizer makes the global model after this
        elif uploads is not None:
            step(self.round_idx, getattr(self, "aggregated_params", lambda r: r)(w_global), uploads)
        self.server_seconds += time.perf_counter() - start
        return w_global

    def _local_test_on_all_clients(self, round_idx):
        uploads, self._pending_step = getattr(self, "_pending_step", None), None
        if uploads is not None:  # the round's global model as the API left it, before anything reads it
            start = time.perf_counter()
            self._after_aggregation(self.round_idx, copy.deepcopy(self.model_trainer.get_model_params()), uploads)
            self.server_seconds += time.perf_counter() - start
        self._on_round_end(round_idx + self.round_offset)

    _local_test_on_validation_set = _local_test_on_all_clients


def sp_api_class(method):
    """FedML's own sp API class of a method (methods.Method.api: FedAvgAPI, FedProxTrainer, ...) with the
    round hooks mixed in. Methods with a supplement step are FedAvg with a server hook."""
    base = method.api_class()
    return type(f"Hooked{base.__name__}", (RoundHooks, base), {})


def build_sp_api(method, args, device, dataset, model):
    """simulation/simulator.py:41 builds FedAvgAPI bare and drops custom trainers, so we build the
    method's FedML API class ourselves and swap in its client trainer (methods.Method.trainer_class)."""
    cls = sp_api_class(method)
    if method.api_args == "dataset_first":  # FedProxTrainer(dataset, model, device, args)
        api = cls(dataset, model, device, args)
    else:
        api = cls(args, device, dataset, model)
    trainer_cls = method.trainer_class()
    if trainer_cls is not None:
        # fedavg_api.py:43 creates one ModelTrainerCLS shared by all clients (:56-63); replace it everywhere.
        api.model_trainer = trainer_cls(model, args)
        for client in api.client_list:
            client.model_trainer = api.model_trainer
    return api
