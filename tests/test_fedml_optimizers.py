"""FedML's own sp FedOpt, FedNova and SCAFFOLD as registry methods (baselines/fedml_sp.py): they run inside
FedML's round loops with the round hooks, and each FedML bug worked around there stays fixed. The
hand-computed tests drive FedML's real loops on a 2-parameter model with client training replaced by a
known update, so every server step can be computed by hand."""
import copy
import types

import numpy as np
import pytest
import torch

METHODS = ("FedOpt", "FedNova", "SCAFFOLD")


@pytest.mark.parametrize("method", METHODS)
def test_method_runs_inside_fedmls_sp_loop(method, tmp_path, make_config):
    from fedml_feddpd.runner import run

    result = run(make_config(federated_optimizer=method), tmp_path / "x", show_progress=False)
    rounds = result["rounds"]
    assert result["method"] == method and [r["round"] for r in rounds] == [0, 1]
    for r in rounds:
        assert r["clients"] == [0, 1, 2, 3]
        assert r["client_seconds"] > 0 and r["server_seconds"] > 0
        assert 0.0 <= r["top1"] <= 1.0 and len(r["per_class_accuracy"]) == 10
    # better than always predicting the most frequent test class (about 0.19 on this split)
    assert result["final"]["top1"] > 0.2


def test_scaffold_first_round_is_fedavgs_round(tmp_path, make_config):
    """With zero control variates and scaffold_server_lr 1, SCAFFOLD's first round is FedAvg's; FedML's
    aggregation (agg_operator.py:116-117) applied the last client's update alone."""
    from fedml_feddpd.runner import run

    fedavg = run(make_config(federated_optimizer="FedAvg", comm_round=1, checkpoint_every=0), tmp_path / "a",
                 show_progress=False)["rounds"][0]
    scaffold = run(make_config(federated_optimizer="SCAFFOLD", comm_round=1, checkpoint_every=0), tmp_path / "b",
                   show_progress=False)["rounds"][0]
    assert scaffold["test_loss"] == pytest.approx(fedavg["test_loss"], rel=1e-4)
    assert scaffold["top1"] == pytest.approx(fedavg["top1"], abs=0.01)


def test_fedopt_clients_start_from_the_rounds_global_model(make_config):
    """fedopt_api.py:89,115 hand every client the trainer's live state dict: client i started from client
    i-1's trained weights. Record what each client's training starts from, in both rounds."""
    from fedml_feddpd.runner import execute, prepare

    exp = prepare(make_config(federated_optimizer="FedOpt", epochs=1, checkpoint_every=0), show_progress=False)
    initial = {k: v.clone() for k, v in exp.model.state_dict().items()}
    trainer, starts = exp.api.model_trainer, []
    train = trainer.train

    def spy(*args, **kwargs):
        starts.append({k: v.clone() for k, v in trainer.model.state_dict().items()})
        return train(*args, **kwargs)

    trainer.train = spy
    execute(exp)
    assert len(starts) == 8  # four clients, two rounds

    def same(a, b):
        return all(torch.equal(a[k], b[k]) for k in a)

    assert all(same(start, initial) for start in starts[:4])
    assert not same(starts[4], initial) and all(same(start, starts[4]) for start in starts[4:])


# --- FedML's loops on a 2-parameter model -------------------------------------------------------------
def _args(method, **extra):
    return types.SimpleNamespace(federated_optimizer=method, dataset="digits", comm_round=2, frequency_of_the_test=1,
                                 ci=0, enable_wandb=False, learning_rate=0.1, weight_decay=0.0, epochs=1, **extra)


def _build(method, args, samples):
    """The registry's sp API on nn.Linear(1, 1) (weight, bias) with clients holding `samples`; returns the
    API, what the round hooks saw, and the model."""
    from fedml_feddpd import methods
    from fedml_feddpd.fedml_compat import build_sp_api

    torch.manual_seed(0)
    model = torch.nn.Linear(1, 1)
    with torch.no_grad():
        model.weight.fill_(0.3)
        model.bias.fill_(-0.2)
    n = len(samples)
    dataset = [sum(samples), 0, None, None, dict(enumerate(samples)), {i: f"data{i}" for i in range(n)},
               {i: None for i in range(n)}, 1]
    api = build_sp_api(methods.get(method), args, torch.device("cpu"), dataset, model)
    seen = {"ends": [], "uploads": []}
    api.install_round_hooks(seen["ends"].append,
                            after_aggregation=lambda r, w, ups: seen["uploads"].append((r, copy.deepcopy(w), ups)))
    return api, seen, model


def _vec(state):
    return np.array([state["weight"].item(), state["bias"].item()], dtype=np.float64)


# client k's local update in round r: its trained weights are its start + DELTA[r][k]
DELTA = [[np.array([1.0, -2.0]), np.array([-0.5, 0.5]), np.array([0.25, 1.5])],
         [np.array([-1.0, 0.5]), np.array([2.0, 1.0]), np.array([0.5, -0.75])]]


def _shift(model, delta):
    with torch.no_grad():
        model.weight += float(delta[0])
        model.bias += float(delta[1])


def _adam(x, grads, lr, b1=0.9, b2=0.999, eps=1e-8):
    m = v = np.zeros_like(x)
    for t, g in enumerate(grads, 1):
        m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
        x = x - lr * (m / (1 - b1 ** t)) / (np.sqrt(v / (1 - b2 ** t)) + eps)
    return x


@pytest.mark.parametrize("opt", ["adam", "sgd"])
def test_fedopt_server_step_equals_hand_computation(opt):
    samples = [1, 2]
    api, seen, model = _build("FedOpt", _args("FedOpt", client_num_in_total=2, client_num_per_round=2,
                                              server_optimizer=opt, server_lr=0.1), samples)
    starts = []

    def fake_train(train_data, device, args):  # trains the shared model in place, as FedML's trainer does
        starts.append(_vec(model.state_dict()))
        _shift(model, DELTA[len(seen["ends"])][int(train_data[-1])])

    api.model_trainer.train = fake_train
    api.train_from(0)

    x, grads = np.array([0.3, -0.2]), []
    weights = np.array(samples) / sum(samples)
    for r in range(2):
        assert np.allclose(starts[2 * r], x) and np.allclose(starts[2 * r + 1], x)  # no chaining
        grads.append(-(weights[0] * DELTA[r][0] + weights[1] * DELTA[r][1]))  # w_global - avg(w_locals)
        x = _adam(np.array([0.3, -0.2]), grads, 0.1) if opt == "adam" else x - 0.1 * grads[-1]
    assert np.allclose(_vec(model.state_dict()), x, atol=1e-6)
    assert seen["ends"] == [0, 1]
    assert api.server_seconds > 0


def test_scaffold_control_variates_and_uploads_equal_hand_computation():
    """SCAFFOLD's clients send 3-tuples (samples, weights delta, control delta); the round hooks still hand
    a supplement step per-client uploads and round ids; control variates belong to clients and persist
    (scaffold/client.py:44-53); the aggregate averages every client (agg_operator.py:116-117)."""
    samples, lr, server_lr, steps = [1, 2, 3], 0.1, 0.5, 2
    api, seen, model = _build("SCAFFOLD", _args("SCAFFOLD", client_num_in_total=3, client_num_per_round=2,
                                                scaffold_server_lr=server_lr), samples)
    got_controls = []

    def fake_train(train_data, device, args, c_global, c_local):
        k = int(train_data[-1])
        got_controls.append((k, _vec(c_global), _vec(c_local)))
        _shift(model, DELTA[len(seen["ends"])][k])
        return steps

    api.model_trainer.train = fake_train
    api.train_from(0)

    x, c, ci = np.array([0.3, -0.2]), np.zeros(2), {k: np.zeros(2) for k in range(3)}
    calls = iter(got_controls)
    for r, (round_idx, w_after, uploads) in enumerate(seen["uploads"]):
        ids = [u.client_id for u in uploads]
        np.random.seed(r)
        assert round_idx == r and ids == list(np.random.choice(range(3), 2, replace=False))
        n_round = sum(samples[k] for k in ids)
        dx, dc = np.zeros(2), np.zeros(2)
        for u in uploads:
            k = u.client_id
            seen_k, seen_c, seen_ci = next(calls)
            assert seen_k == k and np.allclose(seen_c, c) and np.allclose(seen_ci, ci[k])
            assert u.num_samples == samples[k] and np.allclose(_vec(u.state_dict), x + DELTA[r][k])
            new_ci = ci[k] - c - DELTA[r][k] / (steps * lr)  # c_i+ = c_i - c + (x - y_i) / (K lr)
            dx += samples[k] / n_round * DELTA[r][k]
            dc += new_ci - ci[k]
            ci[k] = new_ci
        x, c = x + server_lr * dx, c + dc / 3
        assert np.allclose(_vec(w_after), x, atol=1e-6)
    assert seen["ends"] == [0, 1]
    assert np.allclose(_vec(model.state_dict()), x, atol=1e-6)
    assert np.allclose(_vec(api.c_model_global.state_dict()), c, atol=1e-6)
    for k in range(3):
        assert np.allclose(_vec(api.client_list[k].c_model_local.state_dict()), ci[k], atol=1e-6)


def test_fednova_hooks_and_server_momentum_equal_hand_computation(monkeypatch):
    """FedNova's loop calls client_sampling / aggregate / local_test_on_all_clients and trains clients with
    train(net=, ratio=); the round hooks see rounds, clients, seconds and uploads. gmf acts across rounds
    (fednova_trainer.py:80 emptied the momentum buffer every round)."""
    from fedml.simulation.sp.fednova.client import Client

    samples, gmf, lr = [1, 3], 0.5, 0.1

    def fake_train(self, net, ratio):  # one local step (tau = 1): FedNova's normalized grad is ratio * (x - y)
        start = {k: v.clone() for k, v in net.state_dict().items()}
        _shift(net, DELTA[len(seen["ends"])][self.client_idx])
        grad = {k: (start[k] - v) * ratio for k, v in net.state_dict().items()}
        return 0.0, grad, 1.0 * ratio

    monkeypatch.setattr(Client, "train", fake_train)
    api, seen, model = _build("FedNova", _args("FedNova", client_num_in_total=2, client_num_per_round=2, gmf=gmf,
                                               mu=0.0, momentum=0.0, dampening=0.0), samples)
    api.train_from(0)

    x, buf, p = np.array([0.3, -0.2]), None, np.array(samples) / sum(samples)
    for r, (round_idx, w_after, uploads) in enumerate(seen["uploads"]):
        assert round_idx == r and [u.client_id for u in uploads] == [0, 1]
        for u in uploads:
            assert np.allclose(_vec(u.state_dict), x + DELTA[r][u.client_id])
        cum = -(p[0] * DELTA[r][0] + p[1] * DELTA[r][1])  # tau_eff * sum of normalized grads
        buf = cum / lr if buf is None else gmf * buf + cum / lr
        x = x - lr * buf
        assert np.allclose(_vec(w_after), x, atol=1e-6)
    assert seen["ends"] == [0, 1] and api.round_clients == [0, 1]
    assert api.client_seconds > 0 and api.server_seconds > 0
    assert np.allclose(_vec(model.state_dict()), x, atol=1e-6)


def test_fednova_trains_a_model_with_integer_buffers():
    """FedML's FedNova client scales every state-dict entry in place by a float (fednova/client.py:56-57),
    which raises on BatchNorm's num_batches_tracked; real FedNova training, 2 rounds."""
    from fedml_feddpd import methods
    from fedml_feddpd.fedml_compat import build_sp_api

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(2, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2))
    data = {k: [(torch.randn(8, 2), torch.randint(0, 2, (8,))) for _ in range(3)] for k in range(2)}
    args = _args("FedNova", client_num_in_total=2, client_num_per_round=2, gmf=0.5, mu=0.0, momentum=0.9,
                 dampening=0.0)
    api = build_sp_api(methods.get("FedNova"), args, torch.device("cpu"), [48, 0, None, None, {0: 24, 1: 24}, data,
                                                                           {0: None, 1: None}, 2], model)
    before = copy.deepcopy(model.state_dict())
    ends = []
    api.install_round_hooks(ends.append)
    api.train_from(0)
    after = model.state_dict()
    assert ends == [0, 1] and after["1.num_batches_tracked"].dtype == torch.int64
    assert not torch.equal(after["0.weight"], before["0.weight"])
    assert not torch.equal(after["1.running_mean"], before["1.running_mean"])


def test_fednova_resumes_to_the_same_rounds(tmp_path, make_config):
    """With gmf 0 FedNova keeps no state across rounds beyond the global model, so a run stopped after a
    checkpoint resumes to the uninterrupted run's records (FedOpt, SCAFFOLD and FedNova with gmf > 0 keep
    server or client state that checkpoint.py does not save)."""
    from fedml_feddpd.runner import execute, prepare, run

    cfg = make_config(federated_optimizer="FedNova", comm_round=3, epochs=1)
    reference = run(cfg, tmp_path / "ref", show_progress=False)
    exp = prepare(cfg, show_progress=False)
    sample = exp.api._client_sampling

    def stop_in_round_2(round_idx, *args):
        if round_idx == 2:
            raise KeyboardInterrupt
        return sample(round_idx, *args)

    exp.api._client_sampling = stop_in_round_2
    with pytest.raises(KeyboardInterrupt):
        execute(exp, tmp_path / "x")
    resumed = run(cfg, tmp_path / "x", show_progress=False, resume=True)

    def strip(records):
        return [{k: v for k, v in r.items() if not k.endswith("seconds")} for r in records]

    assert resumed["resumed_from_round"] == 1 and strip(resumed["rounds"]) == strip(reference["rounds"])


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("backend", ["MPI", "GRPC"])
def test_distributed_backends_refuse_sp_only_methods_in_one_line(method, backend, make_config):
    from fedml_feddpd.errors import ConfigError

    training_type = "simulation" if backend == "MPI" else "cross_silo"
    with pytest.raises(ConfigError) as err:
        make_config(federated_optimizer=method, backend=backend, training_type=training_type)
    message = str(err.value)
    assert message.startswith("train_args.federated_optimizer:") and "\n" not in message
    assert method in message


@pytest.mark.parametrize("key, value", [("server_optimizer", "yogi"), ("server_lr", 0.0), ("gmf", 1.0),
                                        ("momentum", -0.1), ("scaffold_server_lr", -1.0)])
def test_method_options_are_checked(key, value, make_config):
    from fedml_feddpd.errors import ConfigError

    with pytest.raises(ConfigError, match=rf"^train_args\.{key}: expected"):
        make_config(federated_optimizer="FedOpt", **{key: value})


def test_resume_of_a_method_without_checkpointed_state_is_refused_in_one_line(tmp_path, make_config):
    """FedOpt's server state is not in checkpoint.py's checkpoints: it writes none, and --resume says so."""
    from fedml_feddpd.errors import CheckpointError
    from fedml_feddpd.runner import run

    cfg = make_config(federated_optimizer="FedOpt", comm_round=1)
    with pytest.raises(CheckpointError, match=r"^--resume: FedOpt keeps server or client state") as err:
        run(cfg, tmp_path / "o", show_progress=False, resume=True)
    assert "\n" not in str(err.value)
    result = run(cfg, tmp_path / "o", show_progress=False)
    assert not (tmp_path / "o" / "checkpoint.pt").exists() and result["method"] == "FedOpt"
    assert run(cfg, tmp_path / "o", show_progress=False, resume=True)["final"] == result["final"]  # finished: reused


def test_scaffold_client_steps_equal_the_papers_rule_by_hand():
    """Karimireddy et al. (2020), Alg. 1 option II, on nn.Linear(2, 2) with the cross-entropy of 2 classes:
    y <- y - lr (g(y) - c_i + c) per step, c_i+ = c_i - c + (x - y) / (K lr); FedML's client and trainer with our
    kept control variate give exactly that (the suites' SCAFFOLD diverges at lr 0.1 by its own dynamics)."""
    from fedml.ml.trainer.scaffold_trainer import ScaffoldModelTrainer

    from fedml_feddpd.baselines.fedml_sp import _ScaffoldClientKeepingControl

    torch.manual_seed(0)
    model = torch.nn.Linear(2, 2)
    x0 = {k: v.clone() for k, v in model.state_dict().items()}
    data = [(torch.tensor([[1.0, -1.0], [0.5, 2.0]]), torch.tensor([0, 1])), (torch.tensor([[2.0, 0.0]]), torch.tensor([1]))]
    args = types.SimpleNamespace(client_optimizer="sgd", learning_rate=0.3, weight_decay=0.0, epochs=2)
    client = _ScaffoldClientKeepingControl(0, data, None, 3, args, torch.device("cpu"), ScaffoldModelTrainer(model, args))
    c_global = {k: torch.full_like(v, 0.05) for k, v in x0.items()}
    c_local = {k: torch.full_like(v, -0.1) for k, v in x0.items()}
    client.c_model_local.load_state_dict(c_local)
    delta, c_delta = client.train({k: v.clone() for k, v in x0.items()}, c_global)

    ref = torch.nn.Linear(2, 2)
    ref.load_state_dict(x0)
    steps = 0
    for _ in range(2):
        for x, y in data:
            ref.zero_grad()
            torch.nn.functional.cross_entropy(ref(x), y).backward()
            with torch.no_grad():
                for name, p in ref.named_parameters():
                    p -= 0.3 * (p.grad - c_local[name] + c_global[name])
            steps += 1
    for k, v in ref.state_dict().items():
        assert torch.allclose(delta[k], v - x0[k], atol=1e-6)
        c_plus = c_local[k] - c_global[k] + (x0[k] - v) / (steps * 0.3)
        assert torch.allclose(c_delta[k], c_plus - c_local[k], atol=1e-5)
        assert torch.allclose(client.c_model_local.state_dict()[k], c_plus, atol=1e-5)  # kept for the next round
