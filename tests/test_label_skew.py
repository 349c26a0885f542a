"""Label-skew baselines: FedLC and FedRS (client trainers within FedAvg's boundary) and Balance@B
(Balance's flattening direction at FedDPD's budget)."""
import copy
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from fedml_feddpd.baselines.fedlc import FedLCTrainer, calibrated_loss, label_counts, local_labels
from fedml_feddpd.baselines.fedrs import FedRSTrainer, restricted_logits, restricted_loss
from fedml_feddpd import methods


def by_hand_ce(z, y):
    """-z_y + log sum_c exp z_c, for one sample."""
    return -z[y] + math.log(sum(math.exp(v) for v in z))


# --- the losses on hand-made batches -----------------------------------------------------------------

def test_fedlc_calibration_raises_the_loss_of_rare_classes_and_matches_the_formula():
    counts = torch.tensor([100.0, 10.0, 1.0])
    logits = torch.tensor([[0.5, 1.0, 2.0], [0.5, 1.0, 2.0]])
    tau = 1.0
    rare, common = torch.tensor([2]), torch.tensor([0])
    assert calibrated_loss(logits[:1], rare, counts, tau) > F.cross_entropy(logits[:1], rare)
    assert calibrated_loss(logits[:1], common, counts, tau) < F.cross_entropy(logits[:1], common)
    shifted = [z - tau * n ** -0.25 for z, n in zip([0.5, 1.0, 2.0], [100, 10, 1])]
    assert calibrated_loss(logits[:1], rare, counts, tau).item() == pytest.approx(by_hand_ce(shifted, 2), rel=1e-6)
    # the batch loss is the mean of the per-sample losses
    both = calibrated_loss(logits, torch.tensor([2, 0]), counts, tau).item()
    assert both == pytest.approx((by_hand_ce(shifted, 2) + by_hand_ce(shifted, 0)) / 2, rel=1e-6)
    # tau = 0 is plain cross-entropy
    assert torch.equal(calibrated_loss(logits, rare.repeat(2), counts, 0.0), F.cross_entropy(logits, rare.repeat(2)))


def test_fedlc_absent_classes_count_as_1e_minus_8():
    """Zero counts are floored at 1e-8 (official code's max(1e-8, n_c)): finite, shifted by 100 * tau."""
    counts, logits, tau = torch.tensor([4.0, 0.0]), torch.tensor([[0.0, 3.0]]), 0.5
    loss = calibrated_loss(logits, torch.tensor([0]), counts, tau).item()
    assert math.isfinite(loss)
    assert loss == pytest.approx(by_hand_ce([0.0 - tau * 4 ** -0.25, 3.0 - tau * 100.0], 0), rel=1e-5)


def test_fedrs_scales_absent_classes_and_matches_the_formula():
    counts = torch.tensor([5.0, 0.0, 3.0])  # class 1 absent from this client
    logits = torch.tensor([[1.0, 2.0, 0.5]])
    alpha = 0.5
    assert torch.equal(restricted_logits(logits, counts, alpha), torch.tensor([[1.0, 1.0, 0.5]]))
    p_plain, p_rs = logits.softmax(1)[0, 1], restricted_logits(logits, counts, alpha).softmax(1)[0, 1]
    assert p_rs < p_plain  # the absent class's (positive) logit loses softmax weight
    y = torch.tensor([0])
    assert restricted_loss(logits, y, counts, alpha).item() == pytest.approx(by_hand_ce([1.0, 1.0, 0.5], 0), rel=1e-6)
    assert restricted_loss(logits, y, counts, alpha) < F.cross_entropy(logits, y)
    # alpha = 1 is plain cross-entropy, bit for bit
    assert torch.equal(restricted_loss(logits, y, counts, 1.0), F.cross_entropy(logits, y))


def tiny_loader(labels, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(len(labels), 4, generator=g)
    return DataLoader(TensorDataset(x, torch.tensor(labels)), batch_size=4, shuffle=True,
                      generator=torch.Generator().manual_seed(seed))


def trained(trainer_cls, loader, **hyper):
    from fedml.ml.trainer.my_model_trainer_classification import ModelTrainerCLS

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    args = SimpleNamespace(client_optimizer="sgd", learning_rate=0.5, weight_decay=0.0, epochs=2, **hyper)
    trainer = (trainer_cls or ModelTrainerCLS)(model, args)
    trainer.train(loader, torch.device("cpu"), args)
    return model.state_dict(), trainer


def test_trainers_train_with_their_loss():
    """FedML's training loop with the method's loss: the neutral setting (tau 0, alpha 1) trains exactly
    as ModelTrainerCLS does; the paper defaults train differently. Counts come from the client's own loader,
    read without moving its shuffle stream."""
    labels = [0] * 10 + [1] * 2  # class 2 absent
    loader = tiny_loader(labels)
    state = loader.generator.get_state()
    assert label_counts(local_labels(loader), 3).tolist() == [10.0, 2.0, 0.0]
    assert torch.equal(loader.generator.get_state(), state)
    pairs = DataLoader(list(zip(torch.zeros(12, 4), torch.tensor(labels))), batch_size=5, shuffle=True,
                       generator=torch.Generator().manual_seed(1))  # not a TensorDataset: read batch by batch
    state = pairs.generator.get_state()
    assert label_counts(local_labels(pairs), 3).tolist() == [10.0, 2.0, 0.0]
    assert torch.equal(pairs.generator.get_state(), state)
    plain, _ = trained(None, tiny_loader(labels))
    for cls, neutral, default in ((FedLCTrainer, {"fedlc_tau": 0.0}, {"fedlc_tau": 1.0}),
                                  (FedRSTrainer, {"fedrs_alpha": 1.0}, {"fedrs_alpha": 0.5})):
        same, trainer = trained(cls, tiny_loader(labels), **neutral)
        assert all(torch.equal(same[k], plain[k]) for k in plain), cls.__name__
        other, _ = trained(cls, tiny_loader(labels), **default)
        assert not torch.equal(other["bias"], plain["bias"]), cls.__name__
        # nothing of the client's labels stays on the trainer: the attributes of a plain one, no tensors
        assert set(vars(trainer)) == set(vars(trained(None, tiny_loader(labels))[1]))
        assert not any(isinstance(v, torch.Tensor) for v in vars(trainer).values())


# --- inside FedML's sp loop ---------------------------------------------------------------------------

@pytest.mark.parametrize("method,trainer,neutral", [("FedLC", FedLCTrainer, {"fedlc_tau": 0.0}),
                                                    ("FedRS", FedRSTrainer, {"fedrs_alpha": 1.0})])
def test_runs_inside_fedmls_sp_loop(method, trainer, neutral, tmp_path, make_config):
    from fedml_feddpd.experiment import prepare
    from fedml_feddpd.runner import run

    cfg = make_config(federated_optimizer=method, comm_round=2, epochs=1)
    exp = prepare(cfg, show_progress=False)
    assert type(exp.api.model_trainer) is trainer
    assert all(c.model_trainer is exp.api.model_trainer for c in exp.api.client_list)
    result = run(cfg, tmp_path / method, show_progress=False)
    assert result["method"] == method and len(result["rounds"]) == 2
    assert result["privacy"] == methods.WITHIN
    assert math.isfinite(result["final"]["train_loss"])
    # same split, seed and batches as FedAvg: only the client loss differs, and it shows
    fedavg = run(make_config(federated_optimizer="FedAvg", comm_round=2, epochs=1), tmp_path / "fedavg",
                 show_progress=False)
    keys = ("top1", "train_loss", "test_loss")
    assert [[r[k] for k in keys] for r in result["rounds"]] != [[r[k] for k in keys] for r in fedavg["rounds"]]
    # at its neutral setting the method is FedAvg exactly (counting labels leaves the batches as they were)
    same = run(make_config(federated_optimizer=method, comm_round=2, epochs=1, **neutral), tmp_path / "neutral",
               show_progress=False)
    assert [[r[k] for k in keys] for r in same["rounds"]] == [[r[k] for k in keys] for r in fedavg["rounds"]]


@pytest.mark.parametrize("method", ["FedLC", "FedRS"])
def test_only_weights_and_sample_counts_reach_the_server(method, make_config):
    from fedml.ml.trainer.my_model_trainer_classification import ModelTrainerCLS

    from fedml_feddpd.experiment import prepare

    exp = prepare(make_config(federated_optimizer=method, comm_round=1, epochs=1), show_progress=False)
    model_keys = set(exp.party.model.state_dict())
    seen = []
    aggregate = exp.api._aggregate

    def recording(w_locals):
        seen.extend((n, copy.deepcopy(w)) for n, w in w_locals)
        return aggregate(w_locals)

    exp.api._aggregate = recording
    exp.api.train_from(0)
    assert len(seen) == len(exp.api.client_list) > 0
    for n, w in seen:
        assert isinstance(n, (int, np.integer)) and not isinstance(n, bool)
        assert isinstance(w, dict) and set(w) == model_keys
        assert all(isinstance(v, torch.Tensor) and v.shape == exp.party.model.state_dict()[k].shape
                   for k, v in w.items())
    # the shared trainer keeps nothing of a client's labels between calls: exactly a plain trainer's state
    plain = ModelTrainerCLS(exp.party.model, exp.args)
    assert set(vars(exp.api.model_trainer)) == set(vars(plain))


# --- Balance@B ------------------------------------------------------------------------------------------

class RequestedGenerator:
    """Returns images with exactly the requested class counts."""

    def sample(self, class_counts, seed, adapter=None):
        labels = torch.repeat_interleave(torch.arange(len(class_counts)), torch.as_tensor(class_counts))
        return torch.zeros(len(labels), 1, 8, 8), labels


def test_balance_at_budget_totals_b_k_and_follows_the_flattening_direction():
    from fedml_feddpd.baselines import BalanceBudgetPolicy
    from fedml_feddpd.baselines.balance import budget_split, flatten_counts
    from fedml_feddpd.feddpd import client_budget
    from fedml_feddpd.supplement import ClientUpload, FedDPDSettings, StageTimer

    hist = np.array([[30, 5, 0, 10], [2, 2, 2, 2], [40, 20, 10, 1]])
    sizes = [int(h.sum()) for h in hist]
    data = SimpleNamespace(class_num=4, client_histograms=hist)
    policy = BalanceBudgetPolicy(FedDPDSettings(supplement_ratio=0.5), data, 0)
    ups = [ClientUpload(cid, n, {}) for cid, n in enumerate(sizes)]
    out = policy.build_supplements(0, {}, ups, None, RequestedGenerator(), StageTimer())
    for cid, n in enumerate(sizes):
        b_k = client_budget(n, 0.5)
        got = np.bincount(out[cid].labels.numpy(), minlength=4)
        assert got.sum() == b_k == out[cid].stats["budget"] > 0
        if cid != 1:  # rarer local classes get more; the largest class gets nothing
            order = np.argsort(hist[cid], kind="stable")
            assert all(got[a] >= got[b] for a, b in zip(order, order[1:]))
            assert got[np.argmax(hist[cid])] == 0 and got[np.argmin(hist[cid])] > got[np.argsort(hist[cid])[-2]]
    assert np.bincount(out[0].labels.numpy(), minlength=4).tolist() == [0, 7, 9, 6]  # 22 in ratio 0:25:30:20
    assert budget_split(hist[0], 22).tolist() == [0, 7, 9, 6] and flatten_counts(hist[0]).tolist() == [0, 25, 30, 20]
    assert np.bincount(out[1].labels.numpy(), minlength=4).tolist() == [1, 1, 1, 1]  # already flat: evenly


def test_privacy_notes_and_registry_entries():
    assert methods.get("FedLC").privacy == methods.WITHIN and methods.get("FedRS").privacy == methods.WITHIN
    assert methods.get("Balance@B").privacy == methods.LABEL_COUNTS
    assert methods.get("FedLC").trainer_class() is FedLCTrainer and methods.get("FedRS").trainer_class() is FedRSTrainer
    assert methods.get("FedLC").options["fedlc_tau"].default == 1.0
    assert methods.get("FedRS").options["fedrs_alpha"].default == 0.5
    assert not methods.get("FedLC").supplement and methods.get("Balance@B").supplement
    from fedml_feddpd.baselines import BalanceBudgetPolicy

    assert methods.get("Balance@B").policy_class() is BalanceBudgetPolicy
    assert "supplement_ratio" in methods.get("Balance@B").reads["feddpd"]
