"""A supplement method on top of another FedML optimizer: train_args.federated_optimizer + train_args.supplement."""
import copy
import os

import pytest
import torch
import yaml

from conftest import ROOT, shrink


def _raw(tmp_path, optimizer, supplement="none", **feddpd):
    raw = shrink(yaml.safe_load(open(os.path.join(ROOT, "configs", "digits_feddpd.yaml"))))
    raw["train_args"].update(federated_optimizer=optimizer, supplement=supplement, comm_round=3)
    raw["feddpd"].update(warmup_rounds=0, tau=0.0, bank_per_class=4, **feddpd)
    raw["generator"].update(pretrain_steps=3, sample_steps=2, cache_dir=str(tmp_path / "gen"))
    raw["run_args"].update(baseline="none", generator_threads=1)
    return raw


def test_one_key_names_the_pair_and_bad_pairs_are_one_line(tmp_path):
    from fedml_feddpd import methods
    from fedml_feddpd.config import ConfigError, validate

    cfg = validate(_raw(tmp_path, "FedOpt", "FedDPD"))
    method = methods.of(cfg.sections["train_args"])
    assert method.name == "FedDPD+FedOpt" and method.api.endswith("fedml_sp:FedOpt")
    assert method.policy.endswith("FedDPDPolicy") and not method.can_resume(cfg.sections)  # FedOpt's state
    assert method.trainer_class().__name__ == "SupplementedTrainer"
    prox = methods.of(validate(_raw(tmp_path, "FedProx", "FedDiff")).sections["train_args"])
    assert prox.trainer_class() is None and prox.can_resume({})  # FedProx's own trainer carries the proximal term
    bad = [(("FedLC", "FedDPD", {}), r"^train_args.supplement: a supplement runs on FedAvg, FedProx, FedOpt, FedNova, "
                                    r"SCAFFOLD; expected none with federated_optimizer FedLC, got 'FedDPD'$"),
           (("FedOpt", "FedX", {}), r"^train_args.supplement: expected none or one of FedDPD, FedDiff, Balance, "
                                    r"Oracle, Balance@B, got 'FedX'$"),
           (("FedProx", "FedDPD", {"supplement_weight": 0.5}), r"^feddpd.supplement_weight: expected 1 with "
                                                                r"federated_optimizer FedProx .*got 0.5$"),
           (("SCAFFOLD", "FedDPD", {"delivery": "server"}), r"^feddpd.delivery: expected client with "
                                                             r"federated_optimizer SCAFFOLD .*got 'server'$")]
    for (optimizer, supplement, feddpd), message in bad:
        with pytest.raises(ConfigError, match=message):
            validate(_raw(tmp_path, optimizer, supplement, **feddpd))
    mpi = _raw(tmp_path, "FedOpt", "FedDPD")
    mpi["comm_args"]["backend"] = "MPI"
    with pytest.raises(ConfigError, match=r"^train_args.federated_optimizer: backend MPI runs .*; FedDPD\+FedOpt runs "
                                          r"on backend sp$"):
        validate(mpi)


def _strip(rounds):
    return [{k: v for k, v in r.items() if "seconds" not in k and k != "server_step"} for r in rounds]


def test_feddpd_on_fedavg_is_plain_feddpd_bit_for_bit(tmp_path):
    from fedml_feddpd.config import validate
    from fedml_feddpd.runner import run

    plain = run(validate(_raw(tmp_path, "FedDPD")), tmp_path / "plain", show_progress=False)
    composed = run(validate(_raw(tmp_path, "FedAvg", "FedDPD")), tmp_path / "composed", show_progress=False)
    assert composed["method"] == "FedDPD+FedAvg" and plain["method"] == "FedDPD"
    assert _strip(composed["rounds"]) == _strip(plain["rounds"]) and composed["final"] == plain["final"]
    supplied = [r["server_step"]["supplements"] for r in composed["rounds"] if "server_step" in r]
    assert supplied == [r["server_step"]["supplements"] for r in plain["rounds"] if "server_step" in r] and supplied


def _uploads(model, clients, seed):
    g = torch.Generator().manual_seed(seed)
    state = model.state_dict()
    return [(10 + i, {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in state.items()})
            for i in range(clients)]


@pytest.mark.parametrize("optimizer", ["FedOpt", "FedProx", "SCAFFOLD"])
def test_given_the_same_uploads_a_composed_pair_aggregates_as_its_optimizer_alone(optimizer, tmp_path):
    from fedml_feddpd.config import validate
    from fedml_feddpd.runner import prepare

    # delivery: client, so the server step runs after aggregation (under server delivery it trains the uploads first)
    plain, composed = (prepare(validate(_raw(tmp_path, optimizer, s, delivery="client")), show_progress=False)
                       for s in ("none", "FedDPD"))
    assert composed.recorder.server_step is not None and plain.recorder.server_step is None
    results = []
    for exp in (plain, composed):
        api = exp.api
        api._client_sampling(0, api.args.client_num_in_total, api.args.client_num_per_round)  # the round's state
        uploads = _uploads(exp.model, len(api.round_clients), seed=1)
        if optimizer == "SCAFFOLD":  # its clients upload (samples, weights delta, control delta)
            uploads = [(n, {k: v - exp.model.state_dict()[k] for k, v in w.items()},
                        {k: torch.zeros_like(v) for k, v in w.items()}) for n, w in uploads]
        results.append(api._aggregate(copy.deepcopy(uploads)))
    flat = [r if isinstance(r, dict) else r[0] for r in results]
    assert set(flat[0]) == set(flat[1]) and all(torch.equal(flat[0][k], flat[1][k]) for k in flat[0])


@pytest.mark.parametrize("optimizer", ["FedProx", "FedNova"])
def test_a_composed_run_delivers_supplements_through_the_optimizers_own_trainer(optimizer, tmp_path):
    """FedProx and FedNova keep FedML's own client trainer; their clients read the supplemented (x, y) loaders."""
    from fedml_feddpd.config import validate
    from fedml_feddpd.runner import run

    result = run(validate(_raw(tmp_path, optimizer, "FedDPD", delivery="client")), tmp_path / "run",
                 show_progress=False)
    assert result["method"] == f"FedDPD+{optimizer}"
    sizes = [s["size"] for r in result["rounds"] if "server_step" in r for s in r["server_step"]["supplements"].values()]
    assert sizes and sum(sizes) > 0 and result["final"]["top1"] > 0.2


def test_a_composed_run_resumes_to_identical_metrics(tmp_path):
    """FedProx + FedDPD (both resumable): a run stopped after round 1's checkpoint and resumed equals a whole run."""
    from fedml_feddpd import checkpoint
    from fedml_feddpd.config import validate
    from fedml_feddpd.runner import run

    raw = _raw(tmp_path, "FedProx", "FedDPD", schedule="periodic", supplement_every=2)
    whole = run(validate(raw), tmp_path / "whole", show_progress=False)

    class Stop(Exception):
        pass

    save = checkpoint.Checkpointer.save

    def save_then_stop(self, round_idx):
        save(self, round_idx)
        if round_idx == 1:
            raise Stop

    checkpoint.Checkpointer.save = save_then_stop
    try:
        with pytest.raises(Stop):
            run(validate(raw), tmp_path / "stopped", show_progress=False)
    finally:
        checkpoint.Checkpointer.save = save
    assert (tmp_path / "stopped" / "checkpoint.pt").is_file()
    resumed = run(validate(raw), tmp_path / "stopped", show_progress=False, resume=True)
    assert resumed["resumed_from_round"] == 1
    assert _strip(resumed["rounds"]) == _strip(whole["rounds"]) and resumed["final"] == whole["final"]


def test_every_shipped_suite_gives_its_methods_the_same_local_training():
    """A comparison is fair only if every method trains the same local epochs, batch size and learning rate."""
    import glob

    from fedml_feddpd.compare import load_suite

    suites = glob.glob(os.path.join(ROOT, "configs", "compare_*.yaml")) + glob.glob(
        os.path.join(ROOT, "benchmarks", "studies", "*_*.yaml"))
    checked = 0
    for path in suites:
        if "base" not in yaml.safe_load(open(path)):  # a validation rule, not a suite
            continue
        suite, runs = load_suite(path)
        for setting in suite["settings"]:
            local = {(cfg["epochs"], cfg["batch_size"], cfg["learning_rate"], cfg["client_optimizer"])
                     for (s, _, _), cfg in runs.items() if s == setting}
            assert len(local) == 1, f"{path} {setting}: methods train differently: {sorted(local)}"
            checked += 1
    assert checked >= 3
