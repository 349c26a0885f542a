"""FedML 0.9.6's own sp FedOpt, FedNova and SCAFFOLD, run by FedML's API classes (registry methods
"FedOpt", "FedNova", "SCAFFOLD", sp backend only).

Each class subclasses FedML's and changes only what is broken, next to the FedML file:line it answers
(paths under fedml/). fedml_compat.build_sp_api mixes RoundHooks on top of these classes, as it does for
FedAvgAPI, so the hooks below the mixin are the names RoundHooks calls through `super()`:
`_client_sampling` and `_aggregate`, and `_local_test_on_all_clients` is the per-round test hook.

FedML's FedDyn (simulation/sp/feddyn/) is not offered: it reads the "old" global model after the clients
trained the shared model (feddyn_trainer.py:140), and its client loss builds both FedDyn penalty terms from
`param.data` (ml/trainer/feddyn_trainer.py:75-77), so they carry no gradient and the client objective is
plain cross-entropy.

Resume: each method keeps server or client state that checkpoint.py does not save (FedOpt's server
optimizer moments, SCAFFOLD's control variates, FedNova's server momentum when gmf > 0).
"""
from __future__ import annotations

import copy
import time

from fedml.ml.trainer.trainer_creator import create_model_trainer
from fedml.simulation.sp.fednova.client import Client as FedNovaClient
from fedml.simulation.sp.fednova.fednova_trainer import FedNovaTrainer
from fedml.simulation.sp.fedopt.fedopt_api import FedOptAPI
from fedml.simulation.sp.scaffold.client import Client as ScaffoldClient
from fedml.simulation.sp.scaffold.scaffold_trainer import ScaffoldTrainer



# --- FedOpt -----------------------------------------------------------------------------------------
def _hand_out_copies(trainer) -> None:
    """Make `trainer.get_model_params()` return a copy of the model's state dict, not the live one.

    Done on the class (a subclass of the trainer's own class) so that RoundHooks.train_from, which patches
    the instance's get_model_params for its first call, still finds it."""
    base = type(trainer)

    def get_model_params(self):
        return copy.deepcopy(base.get_model_params(self))

    trainer.__class__ = type(f"Copying{base.__name__}", (base,), {"get_model_params": get_model_params})


class FedOpt(FedOptAPI):
    """FedML's FedOptAPI (Reddi et al., adaptive server optimizers): clients run FedAvg's local training;
    the server takes w_global - avg(w_locals) as the gradient of `server_optimizer` (a torch optimizer,
    optrepo.py) at `server_lr`. FedML passes only the learning rate (fedopt_api.py:79-85)."""

    # the round's global model is the server optimizer's step after `_aggregate` (fedopt_api.py:125-130): a supplement
    # step (fedml_compat.RoundHooks) reads it at the round's end, not the plain average
    global_set_after_aggregate = True

    def __init__(self, args, device, dataset, model):
        super().__init__(args, device, dataset, model)
        # fedopt_api.py:89 takes the trainer's *live* state dict as the round's global model and :115 hands
        # it to every client uncopied. Clients share one trainer and train its model in place, so client i
        # started from client i-1's trained weights, the reset at :121 was a no-op, and the pseudo-gradient
        # (:127, :165) was taken from the last client's weights. With a copy, every client starts from the
        # round's global model and :121 restores it before the server step.
        _hand_out_copies(self.model_trainer)

    # Time the server optimizer's step (fedopt_api.py:125-130), which runs after `_aggregate`, into the
    # round's server seconds: the step is the optimizer FedML re-creates each round (:128).
    def _set_model_global_grads(self, new_state):
        self._server_step_started = time.perf_counter()
        super()._set_model_global_grads(new_state)

    def _instanciate_opt(self):
        super()._instanciate_opt()
        step = self.opt.step

        def timed_step(*args, **kwargs):
            try:
                return step(*args, **kwargs)
            finally:
                self.server_seconds = getattr(self, "server_seconds", 0.0) + (
                    time.perf_counter() - self._server_step_started)

        self.opt.step = timed_step


# --- FedNova ----------------------------------------------------------------------------------------
class _FedNovaClientKeepingWeights(FedNovaClient):
    """FedML's FedNova client; keeps the parameters it trained, so that the round hooks can hand a
    supplement step (fedml_compat.RoundHooks._aggregate) the upload FedAvg's server would see."""

    def train(self, net, ratio):
        result = super().train(net, ratio)
        self.trained_params = {k: v.detach().clone() for k, v in net.state_dict().items()}
        return result

    def get_local_norm_grad(self, opt, cur_params, init_params, weight=0):
        # fednova/client.py:56-57 scales init - cur in place by a float tensor, which raises for integer
        # buffers (BatchNorm's num_batches_tracked, e.g. resnet56). They are counters, not gradients: left
        # out here, and FedNova._aggregate keeps their round-start value.
        keys = [k for k, v in cur_params.items() if v.is_floating_point()]
        return super().get_local_norm_grad(opt, {k: cur_params[k] for k in keys},
                                           {k: init_params[k] for k in keys}, weight)


class FedNova(FedNovaTrainer):
    """FedML's FedNovaTrainer (Wang et al. 2020, normalized averaging of local updates), with FedML's hook
    names mapped onto the ones RoundHooks uses. FedNova's optimizer (fednova/client.py:83-93) reads
    `gmf`, `mu`, `momentum`, `dampening` (our options), `wd` (our `weight_decay`) and `nesterov` (off: it
    needs momentum > 0 and dampening 0, fednova.py:87-88)."""

    def __init__(self, dataset, model, device, args):
        args.wd = args.weight_decay  # fednova/client.py:91 reads `wd`; FedAvg's trainers read weight_decay
        args.nesterov = False
        self._server_momentum: dict = {}
        super().__init__(dataset, model, device, args)
        # FedNovaTrainer keeps its global model as `model_global` (fednova_trainer.py:30) and has no
        # model_trainer; RoundHooks.train_from and checkpoint.py read the global model through one.
        self.model_trainer = create_model_trainer(self.model_global, args)

    def setup_clients(self, train_data_local_num_dict, train_data_local_dict, test_data_local_dict):
        for client_idx in range(self.args.client_num_per_round):  # fednova_trainer.py:41-55
            self.client_list.append(_FedNovaClientKeepingWeights(
                client_idx, train_data_local_dict[client_idx], test_data_local_dict[client_idx],
                train_data_local_num_dict[client_idx], self.args, self.device))

    # fednova_trainer.py:80 empties the server momentum buffer at the start of every round, so with
    # gmf > 0 aggregate (:151-160) always starts a fresh buffer and gmf never acts. The buffer persists here.
    @property
    def global_momentum_buffer(self):
        return self._server_momentum

    @global_momentum_buffer.setter
    def global_momentum_buffer(self, _ignored):
        pass

    # FedNova's round loop (fednova_trainer.py:73-134) calls client_sampling, aggregate and
    # local_test_on_all_clients; RoundHooks hooks FedAvgAPI's underscore names.
    def client_sampling(self, round_idx, client_num_in_total, client_num_per_round):
        return self._client_sampling(round_idx, client_num_in_total, client_num_per_round)

    def _client_sampling(self, round_idx, client_num_in_total, client_num_per_round):
        return FedNovaTrainer.client_sampling(self, round_idx, client_num_in_total, client_num_per_round)

    def aggregate(self, params, norm_grads, tau_effs, tau_eff=0):
        """fednova_trainer.py:120: FedAvg-shaped entries (samples, trained params, normalized grad, tau_eff),
        client by client, so RoundHooks._aggregate can time the step and read uploads."""
        self._round_start = params
        entries = [(client.get_sample_number(), client.trained_params, grad, tau)
                   for client, grad, tau in zip(self.client_list, norm_grads, tau_effs)]
        return self._aggregate(entries)

    def _aggregate(self, entries):
        params = self._round_start
        floats = {k: v for k, v in params.items() if v.is_floating_point()}
        new = FedNovaTrainer.aggregate(self, floats, [e[2] for e in entries], [e[3] for e in entries])
        return {k: new.get(k, v) for k, v in params.items()}

    def local_test_on_all_clients(self, model_global, round_idx):
        self._local_test_on_all_clients(round_idx)

    def _local_test_on_all_clients(self, round_idx):
        FedNovaTrainer.local_test_on_all_clients(self, self.model_global, round_idx)


# --- SCAFFOLD ---------------------------------------------------------------------------------------
class _ScaffoldClientKeepingControl(ScaffoldClient):
    def train(self, w_global, c_model_global_param):
        c_local = {k: v.clone() for k, v in self.c_model_local.state_dict().items()}
        weights_delta, c_delta = super().train(w_global, c_model_global_param)
        # scaffold/client.py:44-53 computes the new control variate c_i+ into a dict and never stores it:
        # c_model_local stays zero, so every round's delta was taken against 0. c_i+ = c_i + delta.
        self.c_model_local.load_state_dict({k: c_local[k] + c_delta[k] for k in c_delta})
        return weights_delta, c_delta


class SCAFFOLD(ScaffoldTrainer):
    """FedML's ScaffoldTrainer (Karimireddy et al. 2020, control variates, option II). Clients upload
    3-tuples (samples, weights delta, control delta) (scaffold_trainer.py:115); the server adds
    `scaffold_server_lr` times the averaged delta (:130-136)."""

    def __init__(self, dataset, model, device, args):
        # scaffold_trainer.py:62-66, :96-99: without initialize_all_clients, client_num_per_round Client
        # objects, each holding a control variate (scaffold/client.py:17), serve whichever clients are
        # sampled, so a control variate belonged to a slot, not to a client.
        args.initialize_all_clients = True
        # :132-136 read `server_lr`; FedOpt's server_lr is another setting (an Adam step size), so ours is
        # scaffold_server_lr.
        args.server_lr = args.scaffold_server_lr
        super().__init__(dataset, model, device, args)
        # (scaffold_trainer.py:81 also takes the live state dict as the global model; RoundHooks.train_from
        # copies that first call, and :138 loads rather than aliases it afterwards.)

    def _setup_clients(self, train_data_local_num_dict, train_data_local_dict, test_data_local_dict,
                       model_trainer):
        for client_idx in range(self.args.client_num_in_total):  # scaffold_trainer.py:58-77
            self.client_list.append(_ScaffoldClientKeepingControl(
                client_idx, train_data_local_dict[client_idx], test_data_local_dict[client_idx],
                train_data_local_num_dict[client_idx], self.args, self.device, model_trainer))

    def _client_sampling(self, round_idx, client_num_in_total, client_num_per_round):
        if getattr(self, "_after_aggregation", None) is not None:
            # the round's global model (loaded at :138), for upload_params / aggregated_params
            self._round_global = copy.deepcopy(self.model_trainer.get_model_params())
        return super()._client_sampling(round_idx, client_num_in_total, client_num_per_round)

    def _aggregate(self, w_locals):
        # agg_operator.py:114-117 overwrite both sums, after summing, with the *last* client's delta (and its
        # control delta / N): the server applied one client's update. Sample-weighted mean of the weight
        # deltas, and (1/N) * sum of the control deltas (N = client_num_in_total), as the paper has it.
        total = sum(entry[0] for entry in w_locals)
        n_all = self.args.client_num_in_total
        keys = list(w_locals[0][1].keys())
        weights_delta = {k: sum(d[k] * (n / total) for n, d, _ in w_locals) for k in keys}
        c_delta = {k: sum(c[k] for _, _, c in w_locals) / n_all for k in keys}
        return weights_delta, c_delta

    # For a supplement step on the round hooks (RoundHooks._aggregate): the parameters a client trained,
    # and the global model the round ends with (:130-136), as FedAvg-style uploads would carry them.
    def upload_params(self, entry):
        _, weights_delta, _ = entry
        return {k: (self._round_global[k] + d).to(self._round_global[k].dtype) for k, d in weights_delta.items()}

    def aggregated_params(self, result):
        weights_delta, _ = result
        return {k: (self._round_global[k] + d * self.args.server_lr).to(self._round_global[k].dtype)
                for k, d in weights_delta.items()}
