"""Diffusion-DPO through TRL: loss equals the formula, only the named adapter moves, preferences steer samples."""
import os
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from sklearn.svm import SVC

from fedml_feddpd.generation import (
    DPOSettings, GeneratorConfig, active_adapter, adapter_parameters, adapters_disabled, add_adapter,
    build_train_scheduler, build_unet, load_or_pretrain_generator, sample, using_adapter,
)
from fedml_feddpd.generation.dpo import PairCollator, build_dpo_trainer, train_dpo_adapter, train_dpo_adapters

torch.set_num_threads(1)


def tiny():
    cfg = GeneratorConfig(block_out_channels=(8, 16), attention_head_dim=8)
    torch.manual_seed(0)
    return build_unet(cfg).eval(), build_train_scheduler(cfg)


def random_pairs(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 8, 8, generator=g), torch.rand(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,),
                                                                                                      generator=g)


def hand_loss(unet, scheduler, batch, beta, loss_type):
    """docs/DESIGN.md, "The server step", step 5, written out independently of TRL."""
    x0, y, t, e = batch["x0"], batch["class_labels"], batch["timesteps"], batch["noise"]
    x_t = scheduler.add_noise(x0, e, t)
    with torch.no_grad():
        err = ((e - unet(x_t, t, class_labels=y).sample) ** 2).mean(dim=(1, 2, 3))
        with adapters_disabled(unet):
            err_ref = ((e - unet(x_t, t, class_labels=y).sample) ** 2).mean(dim=(1, 2, 3))
    n = len(x0) // 2
    m = (err[:n] - err_ref[:n]) - (err[n:] - err_ref[n:])
    if loss_type == "sigmoid":
        return -F.logsigmoid(-beta * m).mean(), m
    if loss_type == "hinge":
        return torch.relu(1 + beta * m).mean(), m
    return ((-m - 1 / (2 * beta)) ** 2).mean(), m


@pytest.mark.parametrize("loss_type, beta", [("sigmoid", 2000.0), ("hinge", 2000.0), ("ipo", 2000.0),
                                             ("sigmoid", 5.0)])
def test_trl_loss_equals_diffusion_dpo_formula(tmp_path, loss_type, beta):
    unet, sched = tiny()
    chosen, rejected, labels = random_pairs(8)
    settings = DPOSettings(loss_type=loss_type, beta=beta, batch_size=8, max_steps=1)
    trainer = build_dpo_trainer(unet, sched, "c", chosen, rejected, labels, settings, str(tmp_path))
    g = torch.Generator().manual_seed(3)
    for p in adapter_parameters(unet, "c").values():
        p.data.normal_(0.0, 0.02, generator=g)
    batch = PairCollator(chosen, rejected, labels, 1000, seed=5)(list(range(8)))
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, batch)
    expected, margin = hand_loss(unet, sched, batch, beta, loss_type)
    assert margin.abs().max() > 1e-5  # a non-trivial adapter, so the check is not log(2) == log(2)
    assert abs(loss.item() - expected.item()) <= 1e-6 * max(1.0, abs(expected.item()))


def test_training_changes_only_the_named_adapter(tmp_path):
    unet, sched = tiny()
    add_adapter(unet, "B", DPOSettings())
    for p in adapter_parameters(unet, "B").values():
        torch.nn.init.normal_(p, std=0.05)
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    chosen, rejected, labels = random_pairs(12)
    stats = train_dpo_adapter(unet, sched, "A", chosen, rejected, labels,
                              DPOSettings(max_steps=4, batch_size=4, learning_rate=1e-2))
    after = unet.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "base UNet or adapter B changed"
    assert any(not torch.equal(p, torch.zeros_like(p)) for n, p in adapter_parameters(unet, "A").items()
               if "lora_B" in n), "adapter A did not train"
    assert active_adapter(unet) == "A"
    assert stats["steps"] == 4 and stats["pairs"] == 12 and stats["seconds"] > 0
    assert {"loss_first", "loss_final", "reward_accuracy", "reward_margin", "steps_per_second"} <= set(stats)


def test_adapters_trained_together_equal_each_trained_alone():
    """one routed UNet pass per step for every client's adapter gives each adapter the same per-step loss
    and the same final weights as training it alone on the same pairs and seed (float rounding only). Clients
    differ in pair counts (one has fewer pairs than the batch), so each keeps its own epochs and batch sizes."""
    settings = DPOSettings(max_steps=5, batch_size=4, learning_rate=3e-2, beta=50.0)
    jobs = {name: (*random_pairs(n, seed=10 + i), 100 + i) for i, (name, n) in enumerate([("a", 9), ("b", 3),
                                                                                        ("c", 6)])}
    unet, sched = tiny()
    together = train_dpo_adapters(unet, sched, jobs, settings)
    joint_weights = {n: {k: v.detach().clone() for k, v in adapter_parameters(unet, n).items()} for n in jobs}
    for name, (chosen, rejected, labels, seed) in jobs.items():
        alone_unet, _ = tiny()
        alone = train_dpo_adapters(alone_unet, sched, {name: (chosen, rejected, labels, seed)},
                                   replace(settings, seed=7))[name]  # TRL's own seed plays no part
        for key in ("loss_first", "loss_final", "reward_accuracy", "reward_margin"):
            # rewards are beta x log-ratios: batched-conv rounding (~1e-7) shows up amplified
            assert together[name][key] == pytest.approx(alone[key], rel=1e-3, abs=1e-5), (name, key)
        # Adam's normalised steps carry that rounding into single weights, so compare each adapter as a whole
        alone_w = adapter_parameters(alone_unet, name)
        a = torch.cat([alone_w[k].detach().flatten() for k in sorted(alone_w)])
        j = torch.cat([joint_weights[name][k].flatten() for k in sorted(alone_w)])
        assert float((j - a).norm() / a.norm()) < 1e-3, name
    assert together["a"]["clients_together"] == 3 and together["b"]["pairs"] == 3
    # the adapters really moved and moved apart: the test is not comparing zeros
    moved = [w for n in jobs for k, w in joint_weights[n].items() if "lora_B" in k]
    assert all(float(w.abs().max()) > 0 for w in moved)
    assert not torch.equal(*[next(w for k, w in joint_weights[n].items() if "lora_B" in k) for n in ("a", "b")])


def test_routed_pass_equals_each_row_through_its_own_adapter():
    """`routed` computes every adapter's LoRA update at once (gathered weights, grouped convolution): each row's
    output and each adapter's gradient equal running the UNet with that adapter alone (BASE rows: the base), and
    a LoRA layer the batched path does not cover (here: dropout) still routes through PEFT's mixed batch."""
    from fedml_feddpd.generation.adapters import BASE, routed, set_trainable_adapters

    unet, _ = tiny()
    g = torch.Generator().manual_seed(5)
    for name in ("a", "b", "c"):
        add_adapter(unet, name, DPOSettings())
        for p in adapter_parameters(unet, name).values():
            p.data.normal_(0.0, 0.3, generator=g)
    set_trainable_adapters(unet, ["a", "b", "c"])
    names = ["b", BASE, "a", "b", "c", "a", BASE]
    x, t, y = torch.randn(7, 1, 8, 8, generator=g), torch.randint(0, 1000, (7,), generator=g), torch.arange(7)

    def grads(out):
        unet.zero_grad()
        out.pow(2).sum().backward()
        return {n: p.grad.clone() for n, p in unet.named_parameters() if p.grad is not None}

    with routed(unet, names):
        out = unet(x, t, class_labels=y).sample
    joint = grads(out)
    for name in ("a", "b", "c", BASE):
        rows = [i for i, n in enumerate(names) if n == name]
        with adapters_disabled(unet) if name == BASE else using_adapter(unet, name):
            alone = unet(x[rows], t[rows], class_labels=y[rows]).sample
        torch.testing.assert_close(out[rows].detach(), alone.detach(), rtol=1e-5, atol=1e-5)
        if name != BASE:
            own = grads(alone)
            for key, grad in own.items():
                torch.testing.assert_close(joint[key], grad, rtol=1e-3, atol=1e-5)
    with torch.no_grad():  # the adapters matter: the comparison is not between equal outputs
        assert float(out[2:4].detach().sub(unet(x[2:4], t[2:4], class_labels=y[2:4]).sample).abs().max()) > 1e-3
    # a layer with LoRA dropout keeps PEFT's path (in eval mode dropout is off, so the outputs still agree)
    layer = next(m for m in unet.modules() if hasattr(m, "lora_dropout"))
    layer.lora_dropout["a"] = torch.nn.Dropout(0.5).eval()
    with torch.no_grad(), routed(unet, names):
        assert "forward" not in vars(layer)
        torch.testing.assert_close(unet(x, t, class_labels=y).sample, out.detach(), rtol=1e-5, atol=1e-5)
    assert "forward" not in vars(next(m for m in unet.modules() if hasattr(m, "lora_A") and m is not layer))


def test_routed_gradients_are_the_same_from_run_to_run_on_two_threads():
    """A joint DPO step on 2 threads gave different adapter gradients from one run to the next (the backward of
    a[rows] adds with atomics when torch runs several threads), and so did same-seed runs (test_determinism):
    clients of uneven sizes, 2 threads, the same pass 60 times, equal gradients (the race showed in 1 to 10 of 10
    passes of this test's setup before index_select)."""
    from fedml_feddpd.generation.adapters import routed, set_trainable_adapters
    from fedml_feddpd.threads import torch_threads

    unet, _ = tiny()
    g = torch.Generator().manual_seed(3)
    for name in ("a", "b", "c", "d"):
        add_adapter(unet, name, DPOSettings())
        for p in adapter_parameters(unet, name).values():
            p.data.normal_(0.0, 0.05, generator=g)
    set_trainable_adapters(unet, ["a", "b", "c", "d"])
    names = ["a"] * 19 + ["b"] * 11 + ["c"] * 23 + ["d"] * 11  # uneven: the threads split an adapter's rows
    x, t, y = torch.randn(64, 1, 8, 8, generator=g), torch.randint(0, 1000, (64,), generator=g), torch.arange(64) % 10

    def grads():
        unet.zero_grad()
        with routed(unet, names):
            unet(x, t, class_labels=y).sample.pow(2).mean().backward()
        return [p.grad.clone() for p in unet.parameters() if p.grad is not None]

    with torch_threads(2):
        first = grads()
        for _ in range(59):
            assert all(torch.equal(a, b) for a, b in zip(first, grads()))


def test_sampling_many_adapters_in_shared_batches_equals_sampling_each_alone():
    """sample_jobs routes each job's rows through its own adapter (or the base) in shared UNet batches;
    each job's images equal a lone `sample` with that adapter active and the job's seed."""
    from fedml_feddpd.generation import GeneratorConfig, sample_jobs
    from fedml_feddpd.generation.adapters import BASE

    cfg = GeneratorConfig(block_out_channels=(8, 16), attention_head_dim=8, sample_steps=3)
    unet, _ = tiny()
    g = torch.Generator().manual_seed(4)
    for name in ("a", "b"):
        add_adapter(unet, name, DPOSettings())
        for p in adapter_parameters(unet, name).values():
            p.data.normal_(0.0, 0.3, generator=g)
    jobs = [("a", [2, 0, 1], 11), (BASE, [0, 3], 12), ("b", [1, 1], 13), ("a", [0, 0, 2], 14)]
    together = sample_jobs(unet, cfg, jobs, steps=3, batch_size=5)  # batches cut across jobs
    for (name, counts, seed), (x, y) in zip(jobs, together):
        route = adapters_disabled(unet) if name == BASE else using_adapter(unet, name)
        with route:
            x1, y1 = sample(unet, cfg, counts, steps=3, seed=seed)
        assert torch.equal(y, y1)
        torch.testing.assert_close(x, x1, rtol=0, atol=1e-5)
    # the adapters matter: a's and b's images of the same seed differ from the base's
    with using_adapter(unet, "a"):
        xa, _ = sample(unet, cfg, [0, 3], steps=3, seed=12)
    assert (xa - together[1][0]).abs().max() > 1e-2


def test_bad_pairs_are_rejected():
    unet, sched = tiny()
    chosen, rejected, labels = random_pairs(6)
    with pytest.raises(ValueError, match="same non-zero length"):
        train_dpo_adapter(unet, sched, "A", chosen, rejected[:5], labels, DPOSettings(max_steps=1))
    with pytest.raises(ValueError, match="chosen must be a"):
        train_dpo_adapter(unet, sched, "A", chosen[:, :, :4], rejected, labels, DPOSettings(max_steps=1))
    with pytest.raises(ValueError, match="labels must lie"):
        train_dpo_adapter(unet, sched, "A", chosen, rejected, labels + 20, DPOSettings(max_steps=1))


# --- direction: preferring more ink makes the adapter draw more ink, and the reverse -------------------------------

def digits():
    d = load_digits()
    return torch.tensor(d.images / 16.0, dtype=torch.float32).unsqueeze(1), torch.tensor(d.target, dtype=torch.int64)


def ink_pairs(x, y, seed=0):
    """Within each class: chosen = an image with more ink than the class median, rejected = one with less."""
    ink, g = x.mean(dim=(1, 2, 3)), torch.Generator().manual_seed(seed)
    chosen, rejected, labels = [], [], []
    for c in range(10):
        idx = (y == c).nonzero().squeeze(1)
        med = ink[idx].median()
        hi, lo = idx[ink[idx] > med], idx[ink[idx] < med]
        n = min(len(hi), len(lo))
        chosen.append(x[hi[torch.randperm(len(hi), generator=g)[:n]]])
        rejected.append(x[lo[torch.randperm(len(lo), generator=g)[:n]]])
        labels.append(torch.full((n,), c))
    return torch.cat(chosen), torch.cat(rejected), torch.cat(labels)


def run_direction(gen_cfg, x_pub, y_pub, x_eval, y_eval, settings, per_class, steps):
    gen = load_or_pretrain_generator(gen_cfg, x_pub, y_pub, seed=0, progress=False)
    svc = SVC().fit(x_eval.reshape(len(x_eval), -1).numpy(), y_eval.numpy())
    chosen, rejected, labels = ink_pairs(x_pub, y_pub)

    def measure(adapter=None):
        # Same seed => same starting noise for every model, so the ink shift is a paired comparison.
        if adapter is None:
            with adapters_disabled(gen.unet):
                imgs, lab = sample(gen.unet, gen.scheduler, [per_class] * 10, steps=steps, seed=123)
        else:
            with using_adapter(gen.unet, adapter):
                imgs, lab = sample(gen.unet, gen.scheduler, [per_class] * 10, steps=steps, seed=123)
        agree = float(np.mean(svc.predict(imgs.reshape(len(imgs), -1).numpy()) == lab.numpy()))
        return float(imgs.mean()), agree

    base = measure()
    train_dpo_adapter(gen.unet, gen.scheduler, "more_ink", chosen, rejected, labels, settings)
    train_dpo_adapter(gen.unet, gen.scheduler, "less_ink", rejected, chosen, labels, settings)
    return base, measure("more_ink"), measure("less_ink")


def test_dpo_direction_small(tmp_path_factory):
    """Default-suite version: a small generator pretrained here on all digits, short DPO runs."""
    x, y = digits()
    cfg = GeneratorConfig(block_out_channels=(16, 32), attention_head_dim=16, pretrain_steps=600,
                          pretrain_batch_size=64, pretrain_lr=3e-3, cache_dir=str(tmp_path_factory.mktemp("gen")))
    settings = DPOSettings(max_steps=40, batch_size=16, learning_rate=5e-4, seed=0)
    (ink0, agree0), (ink_up, agree_up), (ink_dn, agree_dn) = run_direction(cfg, x, y, x, y, settings, 20, 25)
    print(f"ink base {ink0:.4f} up {ink_up:.4f} down {ink_dn:.4f}; "
          f"agreement {agree0:.2f} {agree_up:.2f} {agree_dn:.2f}")
    assert ink_up > ink0 + 0.005, (ink0, ink_up)
    assert ink_dn < ink0 - 0.005, (ink0, ink_dn)
    assert min(agree0, agree_up, agree_dn) >= 0.85, (agree0, agree_up, agree_dn)


@pytest.mark.slow
def test_dpo_direction_full_size(tmp_path_factory):
    """Default generator and DPO settings; public split = stratified 20% of digits, SVC fit on the rest."""
    x, y = digits()
    idx_pub, idx_rest = train_test_split(np.arange(len(y)), train_size=0.2, stratify=y.numpy(), random_state=0)
    cache = os.environ.get("FEDDPD_TEST_GENERATOR_CACHE") or str(tmp_path_factory.mktemp("gen_full"))
    cfg = GeneratorConfig(cache_dir=cache)
    base, up, down = run_direction(cfg, x[idx_pub], y[idx_pub], x[idx_rest], y[idx_rest], DPOSettings(seed=0),
                                   30, 50)
    print(f"ink base {base[0]:.4f} up {up[0]:.4f} down {down[0]:.4f}; "
          f"agreement {base[1]:.2f} {up[1]:.2f} {down[1]:.2f}")
    assert up[0] > base[0] + 0.01 and down[0] < base[0] - 0.01
    assert min(base[1], up[1], down[1]) >= 0.85
