"""FedDPD's policy with a scorer and a generator the test controls: the bank, the gates, DPO's rounds and pairs;
and dpo_args.warm_start and the generator threads of the DPO step."""
import os
from dataclasses import replace

import pytest
import torch

from fedml_feddpd.feddpd import FedDPDSettings
from fedml_feddpd.feddpd.policy import FedDPDPolicy
from fedml_feddpd.supplement import ClientUpload, StageTimer

C = 3


class LinearScorer:
    """probs = softmax(x_flat @ state['w']); `fit` returns a state the test chose (the public classifier)."""

    def __init__(self, fitted=None):
        self.fitted, self.initial_state, self.fits = fitted, {"w": torch.zeros(16, C)}, 0

    def probs(self, state, images):
        return torch.softmax(images.reshape(len(images), -1) @ state["w"], dim=1).numpy()

    def fit(self, state, images, labels, weight, seed, epochs=None):
        self.fits += 1
        return self.fitted


class FakeGenerator:
    """Class c's images hold the value c + 1 in pixel c (noise elsewhere); an adapter's samples are marked 9."""

    def __init__(self):
        self.trained, self.sampled_with = [], []

    def _images(self, class_counts, seed, mark=0.0):
        g = torch.Generator().manual_seed(seed)
        labels = torch.cat([torch.full((int(n),), c) for c, n in enumerate(class_counts)]).long()
        x = torch.rand(len(labels), 1, 4, 4, generator=g) * 0.1
        x.view(len(labels), -1)[torch.arange(len(labels)), labels] = labels.float() + 1
        x.view(len(labels), -1)[:, -1] = mark
        return x, labels

    def sample(self, class_counts, seed, adapter=None):
        return self._images(class_counts, seed)

    def train_adapters(self, jobs):
        self.trained.append({name: len(job[0]) for name, job in jobs.items()})
        return {name: {"loss_final": 0.5} for name in jobs}

    def sample_many(self, jobs):
        self.sampled_with.append({k: adapter for k, (_, _, adapter) in jobs.items()})
        return {k: self._images(counts, seed, mark=9.0) for k, (counts, seed, adapter) in jobs.items()}


class Data:
    class_num = C
    public = (torch.zeros(6, 1, 4, 4), torch.tensor([0, 0, 1, 1, 2, 2]))


def knows(classes, sure=8.0):
    """A state whose model recognises exactly `classes` (pixel c -> logit c), and predicts class 0 otherwise."""
    w = torch.zeros(16, C)
    for c in classes:
        w[c, c] = sure
    return {"w": w}


def only(c: int) -> dict:
    """A client that saw class c alone: it predicts c for every image, confidently."""
    w = torch.zeros(16, C)
    w[:, c] = 8.0
    return {"w": w}


def policy(**settings):
    base = dict(warmup_rounds=0, supplement_ratio=1.0, bank_per_class=8, decay=1.0, adapter_samples=6)
    return FedDPDPolicy(FedDPDSettings(**{**base, **settings}), Data(), seed=0)


def test_loss_gap_supplies_what_the_client_lacks_and_the_public_gate_admits_the_tail():
    """The global model never predicts class 2 (a steep tail); the server's public classifier does. A client that
    saw only class 0 gets classes 1 and 2 through the public gate, and only class 1 through the global gate."""
    upload = ClientUpload(0, 12, only(0))
    global_state = knows([0, 1])
    public = policy(gate="public", dpo=False)
    scorer = LinearScorer(fitted=knows([0, 1, 2]))
    sup = public.build_supplements(0, global_state, [upload], scorer, FakeGenerator(), StageTimer())[0]
    assert sup.stats["classes"][0] == 0 and sup.stats["classes"][1] > 0 and sup.stats["classes"][2] > 0
    assert scorer.fits == 1  # trained once, then kept
    public.build_supplements(1, global_state, [upload], scorer, FakeGenerator(), StageTimer())
    assert scorer.fits == 1
    glob = policy(gate="global", dpo=False)
    sup = glob.build_supplements(0, global_state, [upload], LinearScorer(), FakeGenerator(), StageTimer())[0]
    assert sup.stats["classes"][0] == sup.stats["classes"][2] == 0 and sup.stats["classes"][1] == 8  # all there is


class TableScorer:
    """p(label | candidate) looked up by the candidate's index, which IndexGenerator writes into pixel 0."""

    def probs(self, state, images):
        idx = images.reshape(len(images), -1)[:, 0].round().long()
        conf = state["conf"][idx]
        p = ((1 - conf) / (C - 1)).unsqueeze(1).repeat(1, C)
        labels = images.reshape(len(images), -1)[:, 1].round().long()
        p[torch.arange(len(p)), labels] = conf
        return p.numpy()


class IndexGenerator(FakeGenerator):
    def sample(self, class_counts, seed, adapter=None):
        labels = torch.cat([torch.full((int(n),), c) for c, n in enumerate(class_counts)]).long()
        x = torch.zeros(len(labels), 1, 4, 4)
        x.view(len(labels), -1)[:, 0] = torch.arange(len(labels)).float()
        x.view(len(labels), -1)[:, 1] = labels.float()
        return x, labels


def test_the_loss_gap_rule_never_supplies_what_the_client_does_as_well_on():
    """Candidates 0-3 are class 0, 4-7 class 1, 8-11 class 2. The global model gives every one p = 0.6; the client
    knows class 0 (0.9), knows class 1 but candidate 4 (0.1 there, 0.9 else) and lacks class 2 (0.1). Class 1 gets 2
    of the budget of 10 by its loss-gap mass, but only candidate 4 has l_k > l_g: it is supplied alone."""
    global_state = {"conf": torch.full((12,), 0.6)}
    client = {"conf": torch.tensor([0.9] * 4 + [0.1, 0.9, 0.9, 0.9] + [0.1] * 4)}
    p = policy(gate="global", dpo=False, bank_per_class=4, supplement_ratio=1.0)
    sup = p.build_supplements(0, global_state, [ClientUpload(0, 10, client)], TableScorer(), IndexGenerator(),
                              StageTimer())[0]
    assert sup.stats["allocation"] == [0, 2, 8]
    picked = sorted(sup.images.reshape(len(sup.images), -1)[:, 0].round().long().tolist())
    assert picked == [4, 8, 9, 10, 11] and sup.stats["size"] == 5
    older = policy(gate="global", dpo=False, bank_per_class=4, supplement_ratio=1.0, selection="discrepancy",
                   discrepancy="ce_gap", tau=0.0)  # the older rule fills a class's share from its best candidates
    sup = older.build_supplements(0, global_state, [ClientUpload(0, 10, client)], TableScorer(), IndexGenerator(),
                                  StageTimer())[0]
    assert sup.stats["size"] == 6 and sup.stats["classes"] == [0, 2, 4]


def test_dpo_runs_in_the_first_rounds_only_and_its_samples_keep_serving():
    gen, scorer = FakeGenerator(), LinearScorer(fitted=knows([0, 1, 2]))
    p = policy(dpo_rounds=1)
    uploads = [ClientUpload(0, 12, only(0)), ClientUpload(1, 12, knows([0, 1, 2], sure=12.0))]
    global_state = knows([0, 1, 2], sure=4.0)
    first = p.build_supplements(0, global_state, uploads, scorer, gen, StageTimer())
    assert list(gen.trained[0]) == ["client_0"]  # client 1 lacks nothing: no positive gap, no pairs
    assert gen.sampled_with[0] == {0: "client_0"}
    assert first[0].stats["dpo_pairs"] > 0 and "dpo_pairs" not in first[1].stats
    x, y, source = p.bank.candidates()
    assert (source == 0).sum() == 6 and (x[source == 0].reshape(6, -1)[:, -1] == 9.0).all()
    second = p.build_supplements(1, global_state, uploads, scorer, gen, StageTimer())
    assert len(gen.trained) == 1  # no DPO after dpo_rounds
    assert len(p.bank) == C * 8 + 6  # the adapter's samples stay in the bank
    assert second[0].stats["size"] == 12 and "dpo_pairs" not in second[0].stats


def test_median_pairs_prefer_samples_hard_for_the_client_and_easy_for_the_global_model():
    gen = FakeGenerator()
    p = policy(dpo_rounds=1, gate="global")
    captured = {}

    def train_adapters(jobs):
        captured.update(jobs)
        return {name: {} for name in jobs}

    gen.train_adapters = train_adapters
    client, global_state = only(0), knows([0, 1, 2])
    p.build_supplements(0, global_state, [ClientUpload(0, 12, client)], LinearScorer(), gen, StageTimer())
    chosen, rejected, labels, _ = captured["client_0"]
    scorer = LinearScorer()
    from fedml_feddpd.feddpd import dpo_reward

    r_chosen = dpo_reward(scorer.probs(client, chosen), scorer.probs(global_state, chosen), labels.numpy(), 1.0)
    r_rejected = dpo_reward(scorer.probs(client, rejected), scorer.probs(global_state, rejected), labels.numpy(), 1.0)
    assert len(chosen) == len(rejected) > 0
    for c in labels.unique().tolist():
        mine = (labels == c).numpy()
        assert r_chosen[mine].min() > r_rejected[mine].max()


def test_random_selection_and_a_zero_budget():
    p = policy(selection="random")
    sup = p.build_supplements(0, knows([0]), [ClientUpload(0, 10, only(0)), ClientUpload(1, 0, only(0))],
                              LinearScorer(), FakeGenerator(), StageTimer())
    assert sup[0].stats["size"] == 10 and sup[1].stats["size"] == 0


def test_the_policy_state_restores_the_bank_and_the_public_classifier():
    gen, scorer = FakeGenerator(), LinearScorer(fitted=knows([0, 1, 2]))
    uploads = [ClientUpload(0, 12, only(0))]
    a = policy()
    a.build_supplements(0, knows([0, 1]), uploads, scorer, gen, StageTimer())
    b = policy()
    b.load_state_dict(a.state_dict())
    sa = a.build_supplements(1, knows([0, 1]), uploads, scorer, gen, StageTimer())[0]
    sb = b.build_supplements(1, knows([0, 1]), uploads, LinearScorer(), gen, StageTimer())[0]
    assert torch.equal(sa.images, sb.images) and torch.equal(sa.labels, sb.labels)
    with pytest.raises(ValueError, match="expected \\['bank', 'gate_state'\\]"):
        b.load_state_dict({})


def test_warm_start_continues_from_the_saved_adapter(monkeypatch):
    from fedml_feddpd.generation import DPOSettings, GeneratorConfig, adapter_parameters
    from fedml_feddpd.generation.pretrain import ServerGenerator
    from fedml_feddpd.generation.unet import build_train_scheduler, build_unet
    from fedml_feddpd.supplement import GeneratorService

    cfg = GeneratorConfig(block_out_channels=(8, 16), attention_head_dim=8)
    torch.manual_seed(0)
    unet = build_unet(cfg)
    from fedml_feddpd.generation import dpo

    started = []
    real_build = dpo.build_joint_trainer

    def spy(unet, scheduler, jobs, *a, **k):  # the adapter's weights when its training starts
        trainer = real_build(unet, scheduler, jobs, *a, **k)
        started.append({n: p.detach().clone() for n, p in adapter_parameters(unet, "client_0").items()})
        return trainer

    monkeypatch.setattr(dpo, "build_joint_trainer", spy)
    x = torch.rand(8, 1, 8, 8)
    labels = torch.zeros(8, dtype=torch.long)
    for warm in (True, False):
        started.clear()
        gen = ServerGenerator(build_unet(cfg).requires_grad_(False), build_train_scheduler(cfg), "test", None, 0.0)
        gen.unet.load_state_dict(unet.state_dict())
        settings = DPOSettings(max_steps=2, batch_size=4, learning_rate=1e-2, warm_start=warm)
        service = GeneratorService(gen, settings, replace(cfg, sample_steps=2))
        service.train_adapter("client_0", x, x.flip(-1), labels, seed=1)
        saved = service.adapter_states()["client_0"]
        service.train_adapter("client_0", x, x.flip(-1), labels, seed=2)
        second = started[1]
        same = all(torch.equal(second[k], saved[k]) for k in saved)
        assert same == warm, f"warm_start={warm}: the second round started from the saved weights: {same}"
        now = service.adapter_states()["client_0"]  # the checkpoint's copy follows the adapter it trained again
        assert set(now) == set(saved) == set(adapter_parameters(gen.unet, "client_0"))
        assert all(torch.equal(now[k], p) for k, p in adapter_parameters(gen.unet, "client_0").items())
        assert not all(torch.equal(now[k], saved[k]) for k in saved)


def test_dpo_and_sampling_run_on_the_generator_threads(monkeypatch):
    """run_args.generator_threads sets the torch threads of sampling and of a round's joint DPO (1.5x faster on 2
    threads than on 1 at 10 clients), while the rest of the server step keeps the run's torch_threads."""
    import fedml_feddpd.generation as generation
    from fedml_feddpd.generation import DPOSettings, GeneratorConfig
    from fedml_feddpd.generation.pretrain import ServerGenerator
    from fedml_feddpd.generation.unet import build_train_scheduler, build_unet
    from fedml_feddpd.supplement import GeneratorService

    seen = {}
    monkeypatch.setattr(generation, "train_dpo_adapters",
                        lambda *a, **k: seen.setdefault("dpo", torch.get_num_threads()) and {})
    monkeypatch.setattr(generation, "sample_jobs",
                        lambda unet, sched, jobs, **k: seen.setdefault("sample", torch.get_num_threads()) and [
                            (torch.zeros(0), torch.zeros(0)) for _ in jobs])
    cfg = GeneratorConfig(block_out_channels=(8, 16), attention_head_dim=8)
    gen = ServerGenerator(build_unet(cfg).requires_grad_(False), build_train_scheduler(cfg), "test", None, 0.0)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        service = GeneratorService(gen, DPOSettings(), cfg, threads=2)
        service.train_adapters({"client_0": (torch.rand(2, 1, 8, 8), torch.rand(2, 1, 8, 8), torch.zeros(2), 0)})
        service.sample_many({0: ([1] * 10, 0, None)})
        assert seen == {"dpo": 2, "sample": 2}
        assert torch.get_num_threads() == 1  # put back afterwards
    finally:
        torch.set_num_threads(before)


def test_the_sample_cache_reads_back_exactly_what_a_base_draw_gives(tmp_path, monkeypatch):
    """run_args.sample_cache: a lone base draw is kept on disk and read back by the next run with the same generator,
    draw, device and threads, instead of sampled again; never with adapters in the UNet or another seed."""
    from fedml_feddpd.generation import DPOSettings, GeneratorConfig, add_adapter
    from fedml_feddpd.generation.pretrain import ServerGenerator
    from fedml_feddpd.generation.unet import build_train_scheduler, build_unet
    from fedml_feddpd.supplement import GeneratorService

    cfg = GeneratorConfig(block_out_channels=(8, 16), attention_head_dim=8, sample_steps=2, guidance_scale=1.0,
                          cache_dir=str(tmp_path / "gens"))
    torch.manual_seed(0)
    gen = ServerGenerator(build_unet(cfg).requires_grad_(False), build_train_scheduler(cfg), "cache",
                          str(tmp_path / "gens" / "abc123"), 0.0)
    plain = GeneratorService(gen, DPOSettings(), cfg, threads=1).sample([2, 1, 0], seed=5)
    cached = GeneratorService(gen, DPOSettings(), cfg, threads=1, sample_cache=True)
    first = cached.sample([2, 1, 0], seed=5)
    assert len(os.listdir(tmp_path / "gens" / "samples")) == 1
    monkeypatch.setattr(GeneratorService, "sample_many", lambda *a, **k: pytest.fail("sampled again"))
    again = cached.sample([2, 1, 0], seed=5)
    for x, y, z in zip(plain, first, again):
        assert torch.equal(x, y) and torch.equal(y, z)
    with pytest.raises(pytest.fail.Exception):
        cached.sample([2, 1, 0], seed=6)  # another draw: sampled
    monkeypatch.undo()
    add_adapter(gen.unet, "client_0", DPOSettings())
    cached.sample([2, 1, 0], seed=7)
    assert len(os.listdir(tmp_path / "gens" / "samples")) == 1  # with adapters in the UNet: nothing kept
