"""Generator: config checks, sampling, on-disk cache, LoRA adapters (no TRL here)."""
import glob
import json
import os
import shutil

import pytest
import torch
from diffusers import DDPMScheduler, UNet2DModel

from fedml_feddpd.generation import (
    DPOSettings, GeneratorConfig, active_adapter, adapter_names, adapter_parameters, adapter_size, adapters_disabled,
    add_adapter, build_sample_scheduler, build_train_scheduler, build_unet, delete_adapter, load_adapter,
    load_or_pretrain_generator, sample, save_adapter, set_active_adapter, using_adapter,
)
from fedml_feddpd.generation.pretrain import META_FILE, WEIGHTS_FILE

torch.set_num_threads(1)


def tiny_cfg(tmp_path, **kw):
    base = dict(block_out_channels=(8, 16), attention_head_dim=8, pretrain_steps=3, pretrain_batch_size=16,
                cache_dir=str(tmp_path / "cache"))
    base.update(kw)
    return GeneratorConfig(**base)


def tiny_data(n=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 8, 8, generator=g), torch.arange(n) % 10


def probe(unet):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(6, 1, 8, 8, generator=g)
    t = torch.tensor([0, 10, 250, 500, 750, 999])
    with torch.no_grad():
        return unet(x, t, class_labels=torch.tensor([0, 1, 2, 3, 9, 10])).sample


def plain_unet():
    return UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), norm_num_groups=8,
                       layers_per_block=1, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), attention_head_dim=8, num_class_embeds=11)


def snapshot(unet):
    return {k: v.detach().clone() for k, v in unet.state_dict().items()}


@pytest.mark.parametrize("kw, field", [
    (dict(sample_steps=0), "generator.sample_steps"),
    (dict(block_out_channels=(12, 64)), "generator.block_out_channels"),
    (dict(beta_schedule="cosine"), "generator.beta_schedule"),
    (dict(label_dropout=1.0), "generator.label_dropout"),
    (dict(sample_size=9), "generator.block_out_channels"),  # 9x9 cannot be halved by a second block
    (dict(sample_size=[8, "x"]), "generator.sample_size"),
    (dict(guidance_scale=0.5), "generator.guidance_scale"),
    (dict(guidance_scale=True), "generator.guidance_scale"),
    (dict(guidance_scale=float("nan")), "generator.guidance_scale"),
    (dict(guidance_scale="2"), "generator.guidance_scale"),
    (dict(guidance_scale=2.0, label_dropout=0.0), "generator.guidance_scale"),
])
def test_generator_config_rejects_bad_values(kw, field):
    with pytest.raises(ValueError, match=field) as err:
        GeneratorConfig(**kw)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("kw, field", [
    (dict(loss_type="kto"), "dpo_args.loss_type"), (dict(beta=0), "dpo_args.beta"),
    (dict(batch_size=0), "dpo_args.batch_size"), (dict(target_modules=["lm_head"]), "dpo_args.target_modules"),
])
def test_dpo_settings_reject_bad_values(kw, field):
    with pytest.raises(ValueError, match=field):
        DPOSettings(**kw)


def test_guidance_default_needs_label_dropout():
    assert GeneratorConfig().guidance_scale == 1.5  # chosen on validation data (CHANGELOG.md).py --guidance
    with pytest.raises(ValueError, match=r"^generator.guidance_scale: expected 1 when label_dropout is 0 .*got 1.5$"):
        GeneratorConfig(label_dropout=0.0)
    assert GeneratorConfig(label_dropout=0.0, guidance_scale=1.0).guidance_scale == 1.0


def test_config_accepts_yaml_lists():
    assert GeneratorConfig(block_out_channels=[32, 64]).block_out_channels == (32, 64)


def test_sampling_is_deterministic_with_right_shapes_and_labels(tmp_path):
    cfg = tiny_cfg(tmp_path)
    torch.manual_seed(0)
    unet = build_unet(cfg).eval()
    sched = build_train_scheduler(cfg)
    a, la = sample(unet, sched, [2, 0, 3] + [0] * 7, steps=5, seed=11, batch_size=4)
    b, lb = sample(unet, cfg, {2: 3, 0: 2}, steps=5, seed=11, batch_size=4)
    c, _ = sample(unet, sched, [2, 0, 3] + [0] * 7, steps=5, seed=12, batch_size=4)
    assert a.shape == (5, 1, 8, 8) and a.dtype == torch.float32
    assert la.tolist() == [0, 0, 2, 2, 2] and torch.equal(la, lb)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0
    with pytest.raises(ValueError, match="class 10"):
        sample(unet, cfg, {10: 1}, steps=2)


def old_sample(unet, scheduler_or_cfg, labels, steps, seed, batch_size):
    """The sampling loop before guidance: a fresh DDIM scheduler per batch, one UNet pass per step."""
    cfg = unet.config
    noise = torch.randn((len(labels), cfg.in_channels, cfg.sample_size, cfg.sample_size),
                        generator=torch.Generator().manual_seed(seed))
    out = torch.empty(noise.shape)
    with torch.no_grad():
        for start in range(0, len(labels), batch_size):
            sched = build_sample_scheduler(scheduler_or_cfg)
            sched.set_timesteps(steps)
            x, y = noise[start:start + batch_size], labels[start:start + batch_size]
            for t in sched.timesteps:
                x = sched.step(unet(x, t, class_labels=y).sample, t, x).prev_sample
            out[start:start + batch_size] = ((x + 1.0) / 2.0).clamp(0.0, 1.0)
    return out


def guided_reference(unet, cfg, labels, steps, seed, w):
    """Classifier-free guidance written out: separate class and null passes, one image batch."""
    noise = torch.randn((len(labels), 1, 8, 8), generator=torch.Generator().manual_seed(seed))
    sched = build_sample_scheduler(cfg)
    sched.set_timesteps(steps)
    x = noise
    with torch.no_grad():
        for t in sched.timesteps:
            e_c = unet(x, t, class_labels=labels).sample
            e_u = unet(x, t, class_labels=torch.full_like(labels, cfg.null_class)).sample
            x = sched.step(e_u + w * (e_c - e_u), t, x).prev_sample
    return ((x + 1.0) / 2.0).clamp(0.0, 1.0)


def distinct_class_unet(cfg):
    torch.manual_seed(0)
    unet = build_unet(cfg).eval()
    torch.nn.init.normal_(unet.class_embedding.weight, std=1.0)  # labels matter as they do after training
    return unet


def test_unguided_sampling_is_the_old_path_bit_for_bit_with_one_scheduler(tmp_path, monkeypatch):
    import fedml_feddpd.generation.sampling as sampling

    cfg = tiny_cfg(tmp_path)
    unet = distinct_class_unet(cfg)
    counts = [2, 0, 3, 1, 0, 0, 0, 0, 0, 1]  # 7 images in batches of 3, 3, 1
    labels = torch.tensor([0, 0, 2, 2, 2, 3, 9])
    calls = []

    def counting(arg, *rest):
        calls.append(arg)
        return build_sample_scheduler(arg, *rest)

    monkeypatch.setattr(sampling, "build_sample_scheduler", counting)
    for source in (cfg, build_train_scheduler(cfg)):
        calls.clear()
        for kw in (dict(), dict(guidance_scale=1.0), dict(guidance_scale=1)):
            imgs, lab = sample(unet, source, counts, steps=6, seed=5, batch_size=3, **kw)
            assert torch.equal(lab, labels)
            assert torch.equal(imgs, old_sample(unet, source, labels, steps=6, seed=5, batch_size=3))
        assert len(calls) == 3  # once per sample() call, not once per batch


def test_guidance_changes_images_as_the_formula_says(tmp_path):
    cfg = tiny_cfg(tmp_path)
    unet = distinct_class_unet(cfg)
    counts = [2, 0, 3, 1, 0, 0, 0, 0, 0, 1]
    plain, labels = sample(unet, cfg, counts, steps=6, seed=5)
    guided, _ = sample(unet, cfg, counts, steps=6, seed=5, guidance_scale=2.0)
    assert not torch.equal(guided, plain) and float((guided - plain).abs().max()) > 1e-3
    assert torch.allclose(guided, guided_reference(unet, cfg, labels, 6, 5, 2.0), atol=1e-5)
    again, _ = sample(unet, build_train_scheduler(cfg), counts, steps=6, seed=5, guidance_scale=2.0, null_class=10)
    assert torch.equal(again, guided)  # deterministic; a scheduler plus null_class equals the config
    batched, _ = sample(unet, cfg, counts, steps=6, seed=5, guidance_scale=2.0, batch_size=3)
    assert torch.allclose(batched, guided, atol=1e-5)
    stronger, _ = sample(unet, cfg, counts, steps=6, seed=5, guidance_scale=3.0)
    assert not torch.equal(stronger, guided)


def test_guidance_without_a_null_class_is_a_one_line_error(tmp_path):
    unet = distinct_class_unet(tiny_cfg(tmp_path))
    no_null = tiny_cfg(tmp_path, label_dropout=0.0, guidance_scale=1)
    for bad in (2.0, 1.5):
        with pytest.raises(ValueError, match="pretrained with label_dropout 0") as err:
            sample(unet, no_null, [1] * 10, steps=2, guidance_scale=bad)
        assert "\n" not in str(err.value) and str(bad) in str(err.value)
    assert torch.equal(sample(unet, no_null, [1] * 10, steps=2)[0], sample(unet, no_null, [1] * 10, steps=2,
                                                                             guidance_scale=1.0)[0])
    sched = build_train_scheduler(no_null)
    with pytest.raises(ValueError, match="needs null_class") as err:  # a scheduler says nothing about label dropout
        sample(unet, sched, [1] * 10, steps=2, guidance_scale=2.0)
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match=r"null_class must be a label of the UNet \(0..10\), got 11"):
        sample(unet, sched, [1] * 10, steps=2, guidance_scale=2.0, null_class=11)
    with pytest.raises(ValueError, match="sample: guidance_scale: expected a finite number >= 1"):
        sample(unet, tiny_cfg(tmp_path), [1] * 10, steps=2, guidance_scale=0.0)


def test_cache_second_call_loads(tmp_path):
    cfg = tiny_cfg(tmp_path)
    x, y = tiny_data()
    first = load_or_pretrain_generator(cfg, x, y, seed=1, progress=False)
    second = load_or_pretrain_generator(cfg, x, y, seed=1, progress=False)
    assert (first.source, second.source) == ("pretrained", "cache")
    assert first.path == second.path
    assert all(torch.equal(v, second.unet.state_dict()[k]) for k, v in first.unet.state_dict().items())
    assert not any(p.requires_grad for p in second.unet.parameters())
    # Another seed or other data is another generator; sample_steps does not change the weights.
    assert load_or_pretrain_generator(cfg, x, y, seed=2, progress=False).source == "pretrained"
    cfg_steps = tiny_cfg(tmp_path, sample_steps=10)
    assert load_or_pretrain_generator(cfg_steps, x, y, seed=1, progress=False).source == "cache"
    # guidance_scale is sampling-only too: it reuses the cached generator.
    guided = load_or_pretrain_generator(tiny_cfg(tmp_path, guidance_scale=3.0), x, y, seed=1, progress=False)
    assert guided.source == "cache" and guided.null_class == 10 == first.null_class
    no_null_cfg = tiny_cfg(tmp_path, label_dropout=0.0, guidance_scale=1.0)
    no_null = load_or_pretrain_generator(no_null_cfg, x, y, seed=1, progress=False)
    assert no_null.source == "pretrained" and no_null.null_class is None  # label_dropout changes the weights


def test_damaged_cache_entry_is_a_one_line_error(tmp_path):
    from fedml_feddpd.generation.pretrain import GeneratorFileError

    cfg = tiny_cfg(tmp_path)
    x, y = tiny_data()
    first = load_or_pretrain_generator(cfg, x, y, progress=False)
    weights = os.path.join(first.path, WEIGHTS_FILE)
    with open(weights, "r+b") as f:
        f.truncate(os.path.getsize(weights) // 2)
    with pytest.raises(GeneratorFileError) as err:
        load_or_pretrain_generator(cfg, x, y, progress=False)
    msg = str(err.value)
    assert msg.startswith(f"generator cache {first.path}: unusable (weights file missing or its checksum differs)")
    assert msg.endswith("delete that folder to retrain the generator") and "\n" not in msg
    assert os.path.isfile(weights)  # left for the user to inspect, not silently replaced
    shutil.rmtree(first.path)
    assert load_or_pretrain_generator(cfg, x, y, progress=False).source == "pretrained"
    assert load_or_pretrain_generator(cfg, x, y, progress=False).source == "cache"


def test_mismatched_cached_config_is_a_one_line_error(tmp_path):
    from fedml_feddpd.generation.pretrain import GeneratorFileError

    cfg = tiny_cfg(tmp_path)
    x, y = tiny_data()
    first = load_or_pretrain_generator(cfg, x, y, progress=False)
    path = os.path.join(first.path, "config.json")
    with open(path) as f:
        config = json.load(f)
    config["block_out_channels"] = [16, 32]
    with open(path, "w") as f:
        json.dump(config, f)
    with pytest.raises(GeneratorFileError, match="config.json does not match the generator config"):
        load_or_pretrain_generator(cfg, x, y, progress=False)
    os.remove(os.path.join(first.path, META_FILE))
    with pytest.raises(GeneratorFileError, match=r"unusable \(unreadable metadata \(FileNotFoundError\)\)"):
        load_or_pretrain_generator(cfg, x, y, progress=False)


def test_failed_save_leaves_no_partial_cache(tmp_path, monkeypatch):
    cfg = tiny_cfg(tmp_path)
    x, y = tiny_data()

    def killed(self, *a, **k):
        os.makedirs(a[0], exist_ok=True)
        open(os.path.join(a[0], WEIGHTS_FILE), "wb").close()
        raise KeyboardInterrupt

    monkeypatch.setattr(UNet2DModel, "save_pretrained", killed)
    with pytest.raises(KeyboardInterrupt):
        load_or_pretrain_generator(cfg, x, y, progress=False)
    assert glob.glob(str(tmp_path / "cache" / "*")) + glob.glob(str(tmp_path / "cache" / ".*")) == []


def test_pretrained_folder_loads_and_bad_paths_fail_clearly(tmp_path):
    torch.manual_seed(3)
    plain = plain_unet()
    plain.save_pretrained(tmp_path / "user_unet")
    gen = load_or_pretrain_generator(tiny_cfg(tmp_path, pretrained=str(tmp_path / "user_unet")), None, None)
    assert gen.source == "given" and gen.null_class == 10
    assert torch.equal(probe(gen.unet), probe(plain.eval()))
    add_adapter(gen.unet, "k", DPOSettings())  # a user's plain UNet2DModel still takes adapters
    # A pipeline folder: unet/ plus the scheduler it was trained with, which overrides the config's schedule.
    plain.save_pretrained(tmp_path / "pipe" / "unet")
    DDPMScheduler(num_train_timesteps=500, beta_schedule="linear").save_pretrained(tmp_path / "pipe" / "scheduler")
    piped = load_or_pretrain_generator(tiny_cfg(tmp_path, pretrained=str(tmp_path / "pipe")), None, None)
    assert piped.scheduler.config.num_train_timesteps == 500 and piped.scheduler.config.beta_schedule == "linear"
    assert torch.equal(probe(piped.unet), probe(plain))
    with pytest.raises(ValueError, match=r"generator.pretrained: .*\(no config.json\)"):
        load_or_pretrain_generator(tiny_cfg(tmp_path, pretrained=str(tmp_path / "missing")), None, None)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="generator.pretrained: cannot load"):
        load_or_pretrain_generator(tiny_cfg(tmp_path, pretrained=str(tmp_path / "broken")), None, None)
    with pytest.raises(ValueError, match="num_classes"):
        load_or_pretrain_generator(tiny_cfg(tmp_path, pretrained=str(tmp_path / "user_unet"), num_classes=12),
                                   None, None)


def test_adapters_isolated_disable_reproduces_base(tmp_path):
    cfg = tiny_cfg(tmp_path)
    torch.manual_seed(0)
    unet = build_unet(cfg).eval()
    base_out = probe(unet)
    add_adapter(unet, "A", DPOSettings())
    add_adapter(unet, "B", DPOSettings(lora_rank=2))
    assert adapter_names(unet) == ["A", "B"] and active_adapter(unet) == "B"
    assert torch.equal(probe(unet), base_out)  # lora_B starts at zero
    for p in adapter_parameters(unet, "B").values():
        torch.nn.init.normal_(p, std=0.05)
    before = snapshot(unet)
    set_active_adapter(unet, "A")
    trainable = {n for n, p in unet.named_parameters() if p.requires_grad}
    assert trainable == set(adapter_parameters(unet, "A")) and trainable
    opt = torch.optim.Adam([p for p in unet.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        x = torch.randn(4, 1, 8, 8)
        out = unet(x, torch.tensor([5, 50, 500, 900]), class_labels=torch.tensor([1, 2, 3, 4])).sample
        out.pow(2).mean().backward()
        opt.step()
    after = snapshot(unet)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(".A." in k for k in changed), changed
    with adapters_disabled(unet):
        assert active_adapter(unet) is None
        assert torch.equal(probe(unet), base_out)
    assert active_adapter(unet) == "A"
    assert {n for n, p in unet.named_parameters() if p.requires_grad} == trainable
    with using_adapter(unet, "B"):
        out_b = probe(unet)
    assert active_adapter(unet) == "A" and not torch.equal(out_b, base_out)
    n_params, n_bytes = adapter_size(unet, "A")
    assert n_params > 0 and n_bytes == 4 * n_params


def test_adapter_weights_copies_each_adapter_in_one_pass(tmp_path):
    from fedml_feddpd.generation.adapters import adapter_weights

    unet = build_unet(tiny_cfg(tmp_path)).eval()
    for name in ("client_1", "client_10"):  # one name a prefix of the other
        add_adapter(unet, name, DPOSettings())
        for p in adapter_parameters(unet, name).values():
            torch.nn.init.normal_(p, std=0.05)
    weights = adapter_weights(unet)
    assert list(weights) == ["client_1", "client_10"]
    a, b = set(weights["client_1"]), set(weights["client_10"])
    assert a and len(a) == len(b) and not a & b  # neither takes the other's weights
    for name, copy in weights.items():
        live = adapter_parameters(unet, name)
        assert set(copy) == set(live) and all(torch.equal(copy[k], p) for k, p in live.items())
        assert all(copy[k].data_ptr() != p.data_ptr() for k, p in live.items())  # copies, not the live weights


def test_adapter_save_load_round_trip_and_delete(tmp_path):
    cfg = tiny_cfg(tmp_path)
    torch.manual_seed(0)
    unet = build_unet(cfg).eval()
    torch.manual_seed(0)
    other = build_unet(cfg).eval()
    add_adapter(unet, "A", DPOSettings())
    add_adapter(unet, "B", DPOSettings())
    for name in ("A", "B"):
        for p in adapter_parameters(unet, name).values():
            torch.nn.init.normal_(p, std=0.05)
    set_active_adapter(unet, "A")
    out_a = probe(unet)
    path = save_adapter(unet, "A", str(tmp_path / "client_A"))
    from safetensors import safe_open
    with safe_open(path, framework="pt") as f:
        keys = list(f.keys())
    assert keys and len(keys) == len(adapter_parameters(unet, "A"))  # A alone, not B
    add_adapter(other, "B", DPOSettings())
    load_adapter(other, "A", str(tmp_path / "client_A"))
    assert active_adapter(other) == "A"
    assert torch.equal(probe(other), out_a)
    loaded = adapter_parameters(other, "A")
    assert all(torch.equal(p, loaded[n]) for n, p in adapter_parameters(unet, "A").items())
    with pytest.raises(ValueError, match="already exists"):
        load_adapter(other, "A", str(tmp_path / "client_A"))
    with pytest.warns(UserWarning, match="Adapter A was active"):  # PEFT falls back to B
        delete_adapter(unet, "A")
    assert adapter_names(unet) == ["B"] and not any(".A." in n for n, _ in unet.named_parameters())
    with pytest.raises(KeyError, match="no adapter named 'A'"):
        set_active_adapter(unet, "A")
    with pytest.raises(FileNotFoundError):
        load_adapter(other, "C", str(tmp_path / "nowhere"))
    with pytest.raises(TypeError, match="cannot hold LoRA adapters"):
        add_adapter(plain_unet(), "A", DPOSettings())


# A run that needs an uncached generator: signals "ready" once imported, waits for "go", then asks for it. Training
# starts with a short sleep so the other run surely arrives while this one holds the cache lock.
_CONCURRENT_RUN = r"""
import os, sys, time
import torch
torch.set_num_threads(1)
import fedml_feddpd.generation.pretrain as pretrain
from fedml_feddpd.generation import GeneratorConfig, load_or_pretrain_generator

tmp, name = sys.argv[1], sys.argv[2]
train = pretrain.train_unet
def slow_train(*a, **k):
    time.sleep(1.0)
    return train(*a, **k)
pretrain.train_unet = slow_train
cfg = GeneratorConfig(block_out_channels=(8, 16), attention_head_dim=8, pretrain_steps=30, pretrain_batch_size=16,
                      cache_dir=os.path.join(tmp, "cache"))
g = torch.Generator().manual_seed(0)
x, y = torch.rand(40, 1, 8, 8, generator=g), torch.arange(40) % 10
open(os.path.join(tmp, name + ".ready"), "w").close()
while not os.path.exists(os.path.join(tmp, "go")):
    time.sleep(0.005)
gen = load_or_pretrain_generator(cfg, x, y, seed=4, progress=False)
torch.save({k: v.clone() for k, v in gen.unet.state_dict().items()}, os.path.join(tmp, name + ".pt"))
print("SOURCE", gen.source, gen.path)
"""


def test_concurrent_runs_pretrain_an_uncached_generator_once(tmp_path):
    import subprocess
    import sys
    import time

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])),
               OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, "-c", _CONCURRENT_RUN, str(tmp_path), name], cwd=root, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for name in ("a", "b")]
    try:
        deadline = time.monotonic() + 45
        while not all((tmp_path / f"{n}.ready").exists() for n in ("a", "b")):
            assert all(p.poll() is None for p in procs), [p.communicate() for p in procs]
            assert time.monotonic() < deadline, "runs did not start"
            time.sleep(0.01)
        (tmp_path / "go").touch()  # both ask for the generator at the same moment
        outs = [p.communicate(timeout=45) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [0, 0], outs
    results = [next(line.split()[1:] for line in out.splitlines() if line.startswith("SOURCE")) for out, _ in outs]
    sources = [source for source, _ in results]
    # Exactly one pretrained; the other waited on the lock (and said why), then loaded that run's entry.
    assert sorted(sources) == ["cache", "pretrained"], outs
    waited = [("waiting for another process pretraining generator" in err) for _, err in outs]
    assert waited == [source == "cache" for source in sources], outs
    waiter_err = outs[sources.index("cache")][1]
    path = results[0][1]
    assert results[1][1] == path and f"(lock {path}.lock)" in waiter_err
    a, b = torch.load(tmp_path / "a.pt"), torch.load(tmp_path / "b.pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert os.listdir(tmp_path / "cache") == [os.path.basename(path)]  # no lock file or temp folder left


def test_cache_lock_is_released_when_pretraining_fails(tmp_path, monkeypatch):
    import fedml_feddpd.generation.pretrain as pretrain

    cfg = tiny_cfg(tmp_path)
    x, y = tiny_data()

    def broken(*a, **k):
        assert glob.glob(str(tmp_path / "cache" / "*.lock"))  # held while training
        raise RuntimeError("out of memory")

    monkeypatch.setattr(pretrain, "train_unet", broken)
    with pytest.raises(RuntimeError, match="out of memory"):
        load_or_pretrain_generator(cfg, x, y, progress=False)
    assert os.listdir(tmp_path / "cache") == []  # lock released and its file removed
    monkeypatch.undo()
    assert load_or_pretrain_generator(cfg, x, y, progress=False).source == "pretrained"
    assert load_or_pretrain_generator(cfg, x, y, progress=False).source == "cache"


def test_dpm_solver_sampling_is_deterministic_and_batch_independent():
    from fedml_feddpd.generation.unet import build_unet

    cfg = GeneratorConfig(block_out_channels=(8, 16), attention_head_dim=8)
    unet = build_unet(cfg)
    a, la = sample(unet, cfg, [3, 2], steps=4, seed=5, sampler="dpm", guidance_scale=1.0)
    b, lb = sample(unet, cfg, [3, 2], steps=4, seed=5, sampler="dpm", guidance_scale=1.0, batch_size=2)
    c, _ = sample(unet, cfg, [3, 2], steps=4, seed=5, sampler="ddim", guidance_scale=1.0)
    assert torch.equal(la, lb) and torch.allclose(a, b, atol=1e-5)  # multistep history reset per batch
    assert 0.0 <= float(a.min()) and float(a.max()) <= 1.0 and not torch.allclose(a, c)
    with pytest.raises(ValueError, match="generator.sampler: expected one of ddim, dpm, got 'euler'"):
        GeneratorConfig(sampler="euler")


@pytest.mark.parametrize("sampler", ["ddim", "dpm"])
def test_both_samplers_clip_the_predicted_image(sampler):
    """The training scheduler's clip_sample: DDIM clips each step's predicted x0 to [-1, 1]; DPM-Solver++ must too
    (without it, digits samples judged 6 points worse at 10 and 15 steps alike). A noise prediction that puts x0
    far above 1 must end at most at 1."""
    cfg = GeneratorConfig()
    sched = build_sample_scheduler(cfg, sampler)
    sched.set_timesteps(10)
    x = torch.randn((4, 1, 8, 8), generator=torch.Generator().manual_seed(0))
    for t in sched.timesteps:
        x = sched.step(torch.full_like(x, -5.0), t, x).prev_sample
    assert float(x.max()) <= 1.0 + 1e-5 and float(x.min()) >= -1.0 - 1e-5, (sampler, float(x.abs().max()))


def test_pretraining_on_the_cpu_is_a_plain_training_loop_bit_for_bit():
    """train_unet's GPU-minded loop (data on the device, draws moved over, loss read back rarely) takes on the CPU
    exactly the steps of the plain loop below: the same draws in the same order, the same updates, the same loss."""
    import torch.nn.functional as F
    from diffusers.optimization import get_cosine_schedule_with_warmup
    from diffusers.training_utils import EMAModel

    from fedml_feddpd.generation.pretrain import build_train_scheduler, build_unet, train_unet

    cfg = GeneratorConfig(num_classes=10, in_channels=1, sample_size=8, pretrain_steps=30, pretrain_batch_size=16)
    g = torch.Generator().manual_seed(1)
    images, labels = torch.rand(120, 1, 8, 8, generator=g), torch.randint(0, 10, (120,), generator=g)
    unet, _, final = train_unet(cfg, images, labels, seed=3, progress=False)

    torch.manual_seed(3)
    ref, sched = build_unet(cfg), build_train_scheduler(cfg)
    gen = torch.Generator().manual_seed(3)
    opt = torch.optim.AdamW(ref.parameters(), lr=cfg.pretrain_lr, weight_decay=0.0)
    lr_sched = get_cosine_schedule_with_warmup(opt, min(100, cfg.pretrain_steps // 10), cfg.pretrain_steps)
    ema, losses = EMAModel(ref.parameters(), decay=cfg.ema_decay), []
    ref.train()
    for _ in range(cfg.pretrain_steps):
        idx = torch.randint(len(images), (cfg.pretrain_batch_size,), generator=gen)
        x0, y = images[idx] * 2.0 - 1.0, labels[idx].clone()
        y[torch.rand(len(y), generator=gen) < cfg.label_dropout] = cfg.null_class
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, sched.config.num_train_timesteps, (len(x0),), generator=gen)
        loss = F.mse_loss(ref(sched.add_noise(x0, noise, t), t, class_labels=y).sample, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0)
        opt.step()
        lr_sched.step()
        ema.step(ref.parameters())
        losses.append(loss.item())
    ema.copy_to(ref.parameters())
    assert final == sum(losses[-100:]) / len(losses[-100:])
    assert all(torch.equal(a, b) for a, b in zip(unet.state_dict().values(), ref.state_dict().values()))
