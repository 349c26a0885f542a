"""FedDPD's DPO options: candidates: union (the adapter can only add) and dpo_args.warm_start."""
from dataclasses import replace

import numpy as np
import pytest
import torch

from fedml_feddpd.algorithm import FedDPDSettings, discrepancy, quality_gate, select_top
from fedml_feddpd.supplement import ClientUpload, FedDPDPolicy, StageTimer


class LinearScorer:
    """probs = softmax(x_flat @ state['w']): a model the test controls."""

    def probs(self, state, images):
        return torch.softmax(images.reshape(len(images), -1) @ state["w"], dim=1).numpy()


class FakeGenerator:
    """Random images per class; adapter samples are random too (their scores decide, not their origin)."""

    def __init__(self):
        self.adapters = []

    def sample(self, class_counts, seed, adapter=None):
        g = torch.Generator().manual_seed(seed)
        labels = torch.cat([torch.full((int(n),), c) for c, n in enumerate(class_counts)]).long()
        return torch.rand(len(labels), 1, 4, 4, generator=g), labels

    def train_adapter(self, name, chosen, rejected, labels, seed):
        self.adapters.append(name)
        return {"loss": 0.5}

    def sample_many(self, jobs):
        return {k: self.sample(counts, seed, adapter) for k, (counts, seed, adapter) in jobs.items()}

    def train_adapters(self, jobs):
        return {name: self.train_adapter(name, *job) for name, job in jobs.items()}


class Data:
    class_num = 3


def _run(candidates, seed):
    settings = FedDPDSettings(tau=0.0, pool_per_class=12, supplement_ratio=1.0, oversample=1.0, candidates=candidates)
    policy = FedDPDPolicy(settings, Data(), seed)
    g = torch.Generator().manual_seed(seed)
    global_state, local_state = {"w": torch.randn(16, 3, generator=g) * 3}, {"w": torch.randn(16, 3, generator=g) * 3}
    uploads = [ClientUpload(0, 12, local_state)]
    sup = policy.build_supplements(0, global_state, uploads, LinearScorer(), FakeGenerator(), StageTimer())[0]
    scorer = LinearScorer()
    d = discrepancy(scorer.probs(global_state, sup.images), scorer.probs(local_state, sup.images),
                    sup.labels.numpy(), settings.discrepancy)
    return sup, d, policy, global_state, local_state, settings


@pytest.mark.parametrize("seed", range(6))
def test_union_never_scores_below_the_best_pool_only_choice(seed):
    sup, d, _, global_state, local_state, settings = _run("union", seed)
    # the best pool-only choice of the same counts, on the same pool (the policy's first draw)
    rng = np.random.default_rng([seed, 0])
    pool_x, pool_y = FakeGenerator().sample([settings.pool_per_class] * 3, seed=int(rng.integers(2**31)))
    scorer = LinearScorer()
    p_g = scorer.probs(global_state, pool_x)
    d_pool = discrepancy(p_g, scorer.probs(local_state, pool_x), pool_y.numpy(), settings.discrepancy)
    counts = np.asarray(sup.stats["allocation"])
    pick = select_top(d_pool, pool_y.numpy(), quality_gate(p_g, pool_y.numpy(), settings.tau), counts)
    for c in range(3):
        assert d[sup.labels.numpy() == c].sum() >= d_pool[pick][pool_y.numpy()[pick] == c].sum() - 1e-9


def test_adapter_only_can_fall_below_the_pool_choice_union_cannot():
    worse = 0
    for seed in range(12):
        a, d_a = _run("adapter", seed)[:2]
        u, d_u = _run("union", seed)[:2]
        assert d_u.sum() >= d_a.sum() - 1e-9  # the union also contains the adapter's candidates
        worse += d_u.sum() > d_a.sum() + 1e-9
    assert worse > 0, "the union never beat adapter-only picks: the test cannot tell them apart"


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
