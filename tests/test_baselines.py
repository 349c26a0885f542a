"""Baseline supplement policies on hand-made inputs (a stand-in generator that labels by request)."""
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from fedml_feddpd.baselines import BalanceBudgetPolicy, BalancePolicy, FedDiffPolicy, OraclePolicy
from fedml_feddpd.baselines.balance import flatten_counts
from fedml_feddpd.supplement import ClientUpload, FedDPDSettings, StageTimer


class CountingGenerator:
    """Returns images whose pixels encode the call number, with exactly the requested class counts."""

    def __init__(self):
        self.calls = 0

    def sample(self, class_counts, seed, adapter=None):
        self.calls += 1
        labels = torch.repeat_interleave(torch.arange(len(class_counts)), torch.as_tensor(class_counts))
        return torch.full((len(labels), 1, 8, 8), float(self.calls)), labels


def server_data(num_classes, histograms=None, oracle=None):
    """The server's view of a run that a policy reads (data.FederatedData's fields)."""
    return SimpleNamespace(class_num=num_classes, client_histograms=histograms, oracle=oracle)


def uploads(sizes):
    return [ClientUpload(cid, n, {}) for cid, n in enumerate(sizes)]


def test_balance_flattens_a_skewed_histogram():
    hist = np.array([[30, 5, 0, 10], [2, 2, 2, 2]])
    policy = BalancePolicy(FedDPDSettings(), server_data(4, histograms=hist), 0)
    out = policy.build_supplements(0, {}, uploads([45, 8]), None, CountingGenerator(), StageTimer())
    for cid in (0, 1):
        after = hist[cid] + np.bincount(out[cid].labels.numpy(), minlength=4)
        assert len(set(after.tolist())) == 1
    assert flatten_counts(hist[0]).tolist() == [0, 25, 30, 20] and len(out[1].labels) == 0
    from fedml_feddpd import methods

    assert methods.get("Balance").privacy == methods.LABEL_COUNTS


def test_feddiff_is_class_balanced_and_identical_across_clients():
    gen = CountingGenerator()
    policy = FedDiffPolicy(FedDPDSettings(schedule="periodic", supplement_ratio=0.5), server_data(10), 0)
    first = policy.build_supplements(0, {}, uploads([40, 20, 60]), None, gen, StageTimer())
    assert len(first[0].labels) == round(np.mean([20, 10, 30]))  # mean FedDPD budget
    counts = np.bincount(first[0].labels.numpy(), minlength=10)
    assert counts.max() - counts.min() <= 1
    assert all(torch.equal(first[c].images, first[0].images) for c in (1, 2))
    again = policy.build_supplements(5, {}, uploads([40, 20, 60]), None, gen, StageTimer())
    assert gen.calls == 1 and torch.equal(again[2].images, first[0].images)  # one set, generated once


def test_under_the_exponential_schedule_baselines_draw_once_and_send_a_shrinking_part():
    settings = FedDPDSettings(schedule="exponential", warmup_rounds=0, supplement_ratio=0.5, decay=0.5)
    gen = CountingGenerator()
    feddiff = FedDiffPolicy(settings, server_data(10), 0)
    first = feddiff.build_supplements(0, {}, uploads([40, 20, 60]), None, gen, StageTimer())[0]
    later = feddiff.build_supplements(2, {}, uploads([40, 20, 60]), None, gen, StageTimer())[1]
    assert gen.calls == 1 and len(first.labels) == 20 and len(later.labels) == 5  # 20 * 0.5 ** 2
    assert np.bincount(later.labels.numpy(), minlength=10).max() == 1  # still one class each
    assert all(any(torch.equal(x, y) for y in first.images) for x in later.images)
    hist = np.array([[30, 5, 0, 10]])
    gen = CountingGenerator()
    balance = BalanceBudgetPolicy(settings, server_data(4, histograms=hist), 0)
    a = balance.build_supplements(0, {}, uploads([40]), None, gen, StageTimer())[0]
    b = balance.build_supplements(1, {}, uploads([40]), None, gen, StageTimer())[0]
    assert gen.calls == 1 and len(a.labels) == 20 and len(b.labels) == 10
    assert (b.images == 1.0).all()  # cut from the first draw
    restored = BalanceBudgetPolicy(settings, server_data(4, histograms=hist), 0)
    restored.load_state_dict(balance.state_dict())
    c = restored.build_supplements(2, {}, uploads([40]), None, gen, StageTimer())[0]
    assert gen.calls == 1 and len(c.labels) == 5


def test_oracle_draws_only_held_out_real_data_with_feddpd_budget():
    held_x = torch.arange(50, dtype=torch.float32).view(50, 1, 1, 1).expand(50, 1, 8, 8).clone()
    held_y = torch.tensor([0] * 30 + [1] * 15 + [2] * 5)
    policy = OraclePolicy(FedDPDSettings(supplement_ratio=0.5), server_data(3, oracle=(held_x, held_y)), 0)
    out = policy.build_supplements(0, {}, uploads([40, 200]), None, None, StageTimer())
    assert len(out[0].labels) == 20 and len(out[1].labels) == 100
    for sup in out.values():
        idx = sup.images[:, 0, 0, 0].long()
        assert torch.equal(held_y[idx], sup.labels)  # every sample is a held-out real one
    share = np.bincount(out[1].labels.numpy(), minlength=3) / 100
    assert share == pytest.approx([0.6, 0.3, 0.1], abs=0.12)  # follows the held-out (global) profile
    with pytest.raises(ValueError, match="oracle_fraction"):
        OraclePolicy(FedDPDSettings(), server_data(3, oracle=(held_x[:0], held_y[:0])), 0)


def test_oracle_without_held_out_data_is_a_config_error(config_dict):
    from fedml_feddpd.config import ConfigError, validate

    config_dict["train_args"]["federated_optimizer"] = "Oracle"
    with pytest.raises(ConfigError, match=r"^data_args.oracle_fraction: Oracle draws real held-out data"):
        validate(config_dict)
    config_dict["data_args"]["oracle_fraction"] = 0.2
    assert validate(config_dict)["federated_optimizer"] == "Oracle"


@pytest.mark.parametrize("method", ["Balance", "Oracle", "FedDiff"])
def test_baselines_run_inside_fedmls_round_loop(method, tmp_path, make_config):
    from fedml_feddpd.runner import run

    cfg = make_config(federated_optimizer=method, oracle_fraction=0.2, warmup_rounds=0, supplement_every=1,
                      pretrain_steps=3, sample_steps=2, cache_dir=str(tmp_path / "gen"))
    result = run(cfg, tmp_path / "out", show_progress=False)
    step = result["rounds"][0]["server_step"]
    hist = np.array(result["data"]["client_label_histograms"])
    for cid, sup in step["supplements"].items():
        classes = np.array(sup["classes"])
        if method == "Balance":
            assert len(set((hist[int(cid)] + classes).tolist())) == 1
        else:
            assert sup["size"] == sup["budget"] or method == "FedDiff"
    if method == "FedDiff":
        assert len({tuple(s["classes"]) for s in step["supplements"].values()}) == 1
    assert ("breaks" in result["privacy"]) == (method == "Balance")
    assert ("not deployable" in result["privacy"]) == (method == "Oracle")
    assert (result["generator"] is None) == (method == "Oracle")


def test_before_the_first_supplement_every_round_equals_fedavgs(tmp_path, make_config):
    """FedAvg underneath: a supplement method trains the same batches as FedAvg until it supplements
    (reading each client's data for later delivery must not advance its loader's shuffle)."""
    from fedml_feddpd.runner import run

    common = dict(comm_round=2, warmup_rounds=5, pretrain_steps=3, sample_steps=2, cache_dir=str(tmp_path / "gen"))
    fedavg = run(make_config(federated_optimizer="FedAvg", **common), tmp_path / "a", show_progress=False)
    feddiff = run(make_config(federated_optimizer="FedDiff", **common), tmp_path / "b", show_progress=False)
    keys = ("top1", "train_loss", "test_loss", "per_class_accuracy")
    assert [[r[k] for k in keys] for r in feddiff["rounds"]] == [[r[k] for k in keys] for r in fedavg["rounds"]]
