"""FedDPD inside FedML's sp round loop: delivery, privacy boundary, clients never generate."""
import collections
import os

import numpy as np
import pytest
import torch
import yaml

from conftest import ROOT, shrink


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    """2 rounds, 4 clients, 2 per round; a supplement after round 0, delivered to the clients. The generator is
    tiny (a few pretraining steps) and the gate is open (tau 0), so every client gets samples to check."""
    from fedml_feddpd.config import validate
    from fedml_feddpd.runner import prepare

    raw = shrink(yaml.safe_load(open(os.path.join(ROOT, "configs", "digits_feddpd.yaml"))))
    raw["train_args"].update(client_num_per_round=2)
    raw["feddpd"].update(dpo_rounds=1, warmup_rounds=0, supplement_every=1, tau=0.0, bank_per_class=8, supplement_ratio=0.5,
                         delivery="client")
    raw["generator"].update(pretrain_steps=20, sample_steps=5, cache_dir=str(tmp_path_factory.mktemp("gen")))
    raw["dpo_args"].update(max_steps=2, batch_size=4)
    return prepare(validate(raw, "feddpd-test.yaml"), show_progress=False)


@pytest.fixture(scope="module")
def traced(experiment):
    """Run it while recording what crosses into the server step and what each client trains on."""
    api, step = experiment.api, experiment.recorder.server_step
    seen = {"uploads": [], "global": [], "trained": [], "generator_in_client": 0}
    in_client = {"now": False}

    original_call = step.__class__.__call__

    def spy_step(self, round_idx, global_state, uploads):
        seen["uploads"].append((round_idx, list(uploads)))
        seen["global"].append(global_state)
        return original_call(self, round_idx, global_state, uploads)

    step.__call__ = spy_step.__get__(step)
    api._after_aggregation = step.__call__

    trainer = api.model_trainer
    original_train = trainer.train

    def spy_train(train_data, device, args):
        in_client["now"] = True
        try:
            seen["trained"].append((trainer.id, train_data))
            return original_train(train_data, device, args)
        finally:
            in_client["now"] = False

    trainer.train = spy_train
    for name in ("sample", "sample_many", "train_adapters"):
        method = getattr(step.generator, name)

        def guarded(*a, _m=method, **k):
            seen["generator_in_client"] += in_client["now"]
            return _m(*a, **k)

        setattr(step.generator, name, guarded)
    from fedml_feddpd.runner import execute

    result = execute(experiment)
    return seen, result


def test_supplements_reach_the_clients_sampled_that_round(experiment, traced):
    seen, result = traced
    step = experiment.recorder.server_step
    round0_clients = result["rounds"][0]["clients"]
    assert len(round0_clients) == 2 and len(set(round0_clients)) == 2
    log = step.log[0]["supplements"]
    assert sorted(int(c) for c in log) == sorted(round0_clients)
    local_num = experiment.data.fedml_dataset[4]
    for cid in range(4):
        dataset = experiment.api.train_data_local_dict[cid].dataset
        if cid in round0_clients:
            stats = log[str(cid)]
            assert stats["budget"] == round(0.5 * local_num[cid])
            assert 0 < stats["size"] <= stats["budget"]
            x, y = dataset.tensors[:2]  # (x, y, weight) only when synthetic samples weigh otherwise than 1
            assert len(y) == local_num[cid] + stats["size"]
            assert len(dataset.tensors) == (2 if experiment.cfg.sections["feddpd"]["supplement_weight"] == 1.0 else 3)
            synthetic = torch.arange(len(y)) >= local_num[cid]  # real data first
            assert np.bincount(y[synthetic].numpy(), minlength=10).tolist() == stats["classes"]
            assert stats["bytes"] == x[synthetic].numel() * 4 + y[synthetic].numel() * 8
        else:
            assert len(dataset) == local_num[cid]  # its own data only
    assert 1 not in step.log  # nothing after the last round


def test_each_client_trains_on_its_own_supplement(experiment, traced):
    seen, result = traced
    round1 = [(cid, data) for cid, data in seen["trained"][2:4]]
    assert [cid for cid, _ in round1] == result["rounds"][1]["clients"]
    for cid, data in round1:
        assert data is experiment.api.train_data_local_dict[cid]
        if str(cid) in experiment.recorder.server_step.log[0]["supplements"]:
            assert len(data.dataset) > experiment.data.fedml_dataset[4][cid]


def test_server_step_sees_only_parameters_and_sample_counts(experiment, traced):
    from fedml_feddpd.supplement import ClientUpload

    seen, _ = traced
    keys = set(experiment.model.state_dict())
    local_num = experiment.data.fedml_dataset[4]
    assert [r for r, _ in seen["uploads"]] == [0, 1]
    for round_idx, uploads in seen["uploads"]:
        for up in uploads:
            assert isinstance(up, ClientUpload)
            assert set(vars(up)) == {"client_id", "num_samples", "state_dict"}
            assert up.num_samples == local_num[up.client_id]
            assert isinstance(up.state_dict, collections.OrderedDict) and set(up.state_dict) == keys
            assert all(isinstance(v, torch.Tensor) for v in up.state_dict.values())
    assert all(set(g) == keys for g in seen["global"])


def test_clients_never_call_the_generator(traced):
    seen, result = traced
    assert seen["generator_in_client"] == 0
    stages = result["rounds"][0]["server_step"]["server_stage_seconds"]
    assert {"pool", "scoring", "dpo", "generation"} <= set(stages)


def test_anything_but_parameters_is_refused_at_the_boundary(experiment, traced):
    """The step checks every upload: client data smuggled into a state dict, a missing parameter or
    another kind of object stops it before the policy runs (and nothing is delivered)."""
    from fedml_feddpd.supplement import ClientUpload, PrivacyBoundaryError

    step = experiment.recorder.server_step
    _, result = traced
    state = collections.OrderedDict((k, v.clone()) for k, v in experiment.model.state_dict().items())
    before = dict(step.delivered)
    leaky = collections.OrderedDict(state, labels=torch.tensor([3, 3, 1]))
    with pytest.raises(PrivacyBoundaryError, match="client 1's upload carries 'labels', which is not a model parameter"):
        step(0, state, [ClientUpload(1, 10, leaky)])
    partial = collections.OrderedDict(list(state.items())[1:])
    with pytest.raises(PrivacyBoundaryError, match="client 2's upload does not match the model"):
        step(0, state, [ClientUpload(2, 10, partial)])
    with pytest.raises(PrivacyBoundaryError, match="received a dict"):
        step(0, state, [{"client_id": 0, "num_samples": 10, "state_dict": state, "histogram": [1, 2]}])
    assert step.delivered == before
    # what the policy keeps: settings, seeds, its bank of generated samples, its own classifier and the server's own
    # public split; never client data (Balance/Oracle are the marked exceptions)
    assert set(vars(step.policy)) == {"settings", "num_classes", "seed", "tau", "bank", "public", "gate_state",
                                     "_gate_probs"}
    assert step.policy.public[0] is experiment.data.public[0]


def _sup(label: int, n: int):
    from fedml_feddpd.supplement import Supplement

    return Supplement(torch.full((n, 1, 2, 2), float(label)) + torch.arange(n).view(n, 1, 1, 1) / 100,
                      torch.full((n,), label), {"size": n})


def test_a_new_supplement_keeps_a_random_share_of_the_previous_one():
    from fedml_feddpd.supplement import with_kept

    new, previous = _sup(1, 4), _sup(7, 10)
    mixed = with_kept(new, previous, 0.5, np.random.default_rng(0))
    assert torch.equal(mixed.images[:4], new.images) and mixed.stats == {"size": 4, "kept": 5}
    kept = mixed.images[4:]
    assert len(kept) == 5 and len({tuple(x.flatten().tolist()) for x in kept}) == 5   # 5 distinct old images
    assert all(any(torch.equal(x, y) for y in previous.images) for x in kept) and (mixed.labels[4:] == 7).all()
    again = with_kept(new, previous, 0.5, np.random.default_rng(0))
    assert torch.equal(again.images, mixed.images)
    assert with_kept(new, _sup(7, 1), 0.4, np.random.default_rng(0)) is new   # round(0.4) = 0 images
    held = _sup(0, 10)
    for r in range(40):   # kept at every switch: bounded by B / (1 - share)
        held = with_kept(_sup(r % 9, 10), held, 0.5, np.random.default_rng(r))
        assert len(held.labels) <= 20


def test_server_step_keeps_part_of_what_a_client_held(experiment):
    """feddpd.keep_previous: at a client's second supplement, the step delivers the policy's new one plus
    the share of what that client held; a client's first supplement is the policy's own."""
    import dataclasses

    from fedml_feddpd.supplement import ClientUpload, ServerStep

    class Fixed:
        settings = dataclasses.replace(experiment.recorder.server_step.policy.settings, warmup_rounds=0,
                                       supplement_every=1, keep_previous=0.5, delivery="client")
        seed = 3

        def build_supplements(self, round_idx, global_state, uploads, scorer, generator, timer):
            return {up.client_id: _sup(round_idx, 6) for up in uploads}

    got = []
    step = ServerStep(Fixed(), experiment.recorder.server_step.scorer, None, last_round=5,
                      deliver=lambda cid, sup: got.append((cid, sup)))
    state = experiment.model.state_dict()
    step(0, state, [ClientUpload(1, 10, state)])
    step(1, state, [ClientUpload(1, 10, state), ClientUpload(2, 10, state)])
    (_, first), (_, second), (_, fresh) = got
    assert len(first.labels) == 6 and "kept" not in first.stats
    assert second.labels.tolist() == [1] * 6 + [0] * 3 and second.stats["kept"] == 3
    assert len(fresh.labels) == 6   # client 2 held nothing
    assert step.log[1]["supplements"]["1"]["kept"] == 3


@pytest.fixture(scope="module")
def server_delivery(tmp_path_factory):
    """delivery: server, 3 rounds (supplements after rounds 0 and 1), recording what FedML's average receives."""
    from fedml.simulation.sp.fedavg.fedavg_api import FedAvgAPI

    from fedml_feddpd.config import validate
    from fedml_feddpd.runner import execute, prepare

    raw = shrink(yaml.safe_load(open(os.path.join(ROOT, "configs", "digits_feddpd.yaml"))))
    raw["train_args"].update(client_num_per_round=2, comm_round=3, epochs=1)
    raw["feddpd"].update(delivery="server", warmup_rounds=0, tau=0.0, bank_per_class=8, dpo_rounds=0)
    raw["generator"].update(pretrain_steps=20, sample_steps=5, cache_dir=str(tmp_path_factory.mktemp("gen")))
    exp = prepare(validate(raw, "feddpd-server.yaml"), show_progress=False)
    step, averaged, before = exp.recorder.server_step, [], []
    original_before, original_average = step.before_aggregation, FedAvgAPI._aggregate

    def spy_before(round_idx, uploads, average):
        trained = original_before(round_idx, uploads, average)  # FedML then averages into the first one in place
        before.append((round_idx, uploads, trained and {c: {k: v.clone() for k, v in w.items()}
                                                        for c, w in trained.items()}))
        return trained

    def spy_average(self, w_locals):  # a due round averages twice: the uploads (for selection), then the round's
        averaged.append([(n, {k: v.clone() for k, v in w.items()}) for n, w in w_locals])
        return original_average(self, w_locals)

    step.before_aggregation = spy_before
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(FedAvgAPI, "_aggregate", spy_average)
        result = execute(exp)
    return exp, before, averaged, result


def test_server_delivery_trains_each_upload_on_the_server_and_sends_clients_nothing(server_delivery):
    exp, before, averaged, result = server_delivery
    step = exp.recorder.server_step
    assert [r for r, _, _ in before] == [0, 1, 2] and before[2][2] is None  # nothing after the last round
    assert len(averaged) == 5
    assert not step.delivered
    for cid, loader in exp.api.train_data_local_dict.items():  # clients train on their own data only
        assert len(loader.dataset) == exp.data.fedml_dataset[4][cid]
    for round_idx in (0, 1):
        _, uploads, trained = before[round_idx]
        log = step.log[round_idx]
        assert "server_training" in log["server_stage_seconds"]
        fed_to_average = dict(zip(result["rounds"][round_idx]["clients"], averaged[2 * round_idx + 1]))
        for up in uploads:
            stats = log["supplements"][str(up.client_id)]
            assert stats["sent_bytes"] == 0 and stats["bytes"] > 0 and stats["size"] > 0
            n, params = fed_to_average[up.client_id]
            assert n == up.num_samples
            assert all(torch.equal(params[k], trained[up.client_id][k]) for k in params)  # FedML averages them
            assert any(not torch.equal(params[k], up.state_dict[k]) for k in params)  # and they moved
