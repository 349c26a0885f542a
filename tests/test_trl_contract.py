"""What fedml_feddpd.generation.dpo gets from TRL, checked by behaviour (no reading of TRL's source).

DiffusionDPOTrainer skips DPOTrainer.__init__ and runs DPOTrainer's own loss code on a UNet presented as a
one-token policy whose log-probability of an image is minus its denoising MSE. If a TRL release changes what that
loss computes, what it reads or how it trains, these tests fail: the loss and rewards are compared with the
Diffusion-DPO formulas written out here, and one training step must move the named adapter and nothing else.
"""
import ast
import copy
import os

import pytest
import torch
import torch.nn.functional as F
from packaging.requirements import InvalidRequirement, Requirement

from fedml_feddpd.errors import ConfigError
from fedml_feddpd.generation import (
    DPOSettings, GeneratorConfig, adapter_parameters, add_adapter, build_train_scheduler, build_unet,
)
from fedml_feddpd.generation.config import LOSS_TYPES

trl = pytest.importorskip("trl")
from trl import DPOConfig, DPOTrainer  # noqa: E402
from trl.trainer.base_trainer import _BaseTrainer  # noqa: E402

from fedml_feddpd.generation.dpo import (  # noqa: E402
    SUPPORTED_TRL, PairCollator, _check_trl, build_dpo_trainer, train_dpo_adapter,
)

torch.set_num_threads(1)
EXACT = {"rtol": 1e-9, "atol": 1e-12}  # float64, same values summed in another order
SETUP_PY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "setup.py")

# Diffusion-DPO (Wallace et al., 2023) per pair, on d = (l_w - l_l) - (ref_w - ref_l) where l = log pi = -MSE.
FORMULAS = {
    "sigmoid": lambda d, beta: -F.logsigmoid(beta * d),
    "hinge": lambda d, beta: torch.relu(1 - beta * d),
    "ipo": lambda d, beta: (d - 1 / (2 * beta)) ** 2,  # one completion "token" per image: IPO's per-token mean is d
}


def parse_requirement(text):
    try:
        return Requirement(text)
    except InvalidRequirement:
        return None


def tiny():
    cfg = GeneratorConfig(block_out_channels=(8, 16), attention_head_dim=8)
    torch.manual_seed(0)
    return build_unet(cfg).eval(), build_train_scheduler(cfg)


def pairs(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 1, 8, 8, generator=g), torch.rand(n, 1, 8, 8, generator=g),
            torch.randint(0, 10, (n,), generator=g))


def perturb(unet, name, seed, std=0.05):
    """Non-zero lora_A and lora_B, so the adapter changes the output and every LoRA weight has a gradient."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter_parameters(unet, name).values():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)


def neg_mse(unet, scheduler, x0, y, t, e):
    """log pi(x0) = -mean_pixels |e - e_theta(sqrt(a_t) x0 + sqrt(1 - a_t) e, t, y)|^2, written out."""
    a = scheduler.alphas_cumprod.to(x0.dtype)[t].view(-1, 1, 1, 1)
    with torch.no_grad():
        eps = unet(a.sqrt() * x0 + (1 - a).sqrt() * e, t, class_labels=y).sample
    return -((e - eps) ** 2).mean(dim=(1, 2, 3))


def test_formulas_cover_every_supported_loss_type():
    assert set(FORMULAS) == set(LOSS_TYPES), "add the formula of each DPOSettings loss_type to FORMULAS"


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_trl_loss_and_rewards_equal_diffusion_dpo_formula(tmp_path, loss_type):
    unet, sched = tiny()
    unet = unet.double()  # float64 end to end: the comparison below is exact up to rounding
    base = copy.deepcopy(unet)  # the reference, independently of adapters_disabled
    add_adapter(unet, "c", DPOSettings())
    perturb(unet, "c", seed=3)
    chosen, rejected, labels = pairs(6)
    batch = PairCollator(chosen, rejected, labels, sched.config.num_train_timesteps, seed=5)(list(range(6)))
    batch = {k: v.double() if v.is_floating_point() else v for k, v in batch.items()}

    # Pair i is (chosen[i], rejected[i]) with label labels[i], scaled to [-1, 1]; the collator draws one (t, noise)
    # per pair. Only (t, noise) are taken from its batch: images, labels and their order are the test's own.
    n = len(labels)
    t, e = batch["timesteps"][:n], batch["noise"][:n]
    assert torch.equal(batch["timesteps"][n:], t) and torch.equal(batch["noise"][n:], e)

    def logp_of(model, images):
        return neg_mse(model, sched, images.double() * 2 - 1, labels, t, e)

    l_w, l_l = logp_of(unet, chosen), logp_of(unet, rejected)
    ref_w, ref_l = logp_of(base, chosen), logp_of(base, rejected)
    d = (l_w - l_l) - (ref_w - ref_l)
    assert d.abs().min() > 1e-6, "degenerate fixture: the adapter does not change the pair margins"
    beta = 1.5 / d.abs().max().item()  # beta * d within [-1.5, 1.5]: O(1), so no formula saturates
    expected = FORMULAS[loss_type](d, beta).mean()
    flipped = FORMULAS[loss_type](-d, beta).mean()  # log pi = +MSE, or chosen/rejected swapped
    assert (expected - flipped).abs() > 0.05 * max(expected.abs(), flipped.abs()), \
        "degenerate fixture: it cannot tell the Diffusion-DPO sign convention apart"

    trainer = build_dpo_trainer(unet, sched, "c", chosen, rejected, labels,
                                DPOSettings(loss_type=loss_type, beta=beta, batch_size=6, max_steps=1), str(tmp_path))
    trainer.model.eval()
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, batch)
    torch.testing.assert_close(loss, expected, **EXACT)

    # TRL's _compute_loss returns the loss only; the rewards it derives from the same logps go to its metrics.
    metrics = {k: torch.tensor(v[-1], dtype=torch.float64) for k, v in trainer._metrics["eval"].items()}
    r_w, r_l = beta * (l_w - ref_w), beta * (l_l - ref_l)
    want = {"rewards/chosen": r_w.mean(), "rewards/rejected": r_l.mean(), "rewards/margins": (r_w - r_l).mean(),
            "rewards/accuracies": (r_w > r_l).double().mean(), "logps/chosen": l_w.mean(), "logps/rejected": l_l.mean()}
    for key, value in want.items():
        assert key in metrics, f"TRL no longer reports {key}"
        tol = {"rtol": 0, "atol": 1e-6} if key == "rewards/accuracies" else EXACT  # TRL averages it in float32
        torch.testing.assert_close(metrics[key], value, **tol, msg=lambda m, key=key: f"{key}: {m}")


def test_one_train_step_moves_only_the_named_adapter():
    unet, sched = tiny()
    for i, name in enumerate(("a", "b")):
        add_adapter(unet, name, DPOSettings())
        perturb(unet, name, seed=10 + i)
    a_names, b_names = set(adapter_parameters(unet, "a")), set(adapter_parameters(unet, "b"))
    assert any("lora_A" in n for n in a_names) and any("lora_B" in n for n in a_names)
    before = {k: v.detach().clone() for k, v in [*unet.named_parameters(), *unet.named_buffers()]}

    chosen, rejected, labels = pairs(4)
    stats = train_dpo_adapter(unet, sched, "a", chosen, rejected, labels,
                              DPOSettings(max_steps=1, batch_size=4, learning_rate=1e-3))
    assert stats["steps"] == 1 and torch.isfinite(torch.tensor(stats["loss_first"]))

    after = dict([*unet.named_parameters(), *unet.named_buffers()])
    assert set(after) == set(before)
    unchanged_a = sorted(n for n in a_names if torch.equal(before[n], after[n]))
    assert not unchanged_a, f"one DPO step left {len(unchanged_a)}/{len(a_names)} weights of adapter a unchanged, " \
                            f"e.g. {unchanged_a[:3]}"
    changed_b = sorted(n for n in b_names if not torch.equal(before[n], after[n]))
    assert not changed_b, f"training adapter a changed adapter b: {changed_b[:3]}"
    changed_base = sorted(n for n in set(before) - a_names - b_names if not torch.equal(before[n], after[n]))
    assert not changed_base, f"training adapter a changed the base UNet: {changed_base[:3]}"


def test_installed_trl_is_in_the_range_setup_py_declares():
    with open(SETUP_PY) as f:
        strings = [n.value for n in ast.walk(ast.parse(f.read())) if isinstance(n, ast.Constant)
                   and isinstance(n.value, str) and n.value.replace(" ", "").startswith("trl")]
    reqs = [r for r in map(parse_requirement, strings) if r is not None and r.name == "trl"]
    assert len(reqs) == 1, f"expected one trl requirement in setup.py, found {[str(r) for r in reqs]}"
    assert str(reqs[0]) == str(Requirement(SUPPORTED_TRL)), "setup.py and dpo.SUPPORTED_TRL disagree"
    assert reqs[0].specifier.contains(trl.__version__, prereleases=True), \
        f"trl {trl.__version__} is installed; the tests accept {reqs[0]}"
    _check_trl()  # the trainer's start-up check accepts it too


@pytest.mark.parametrize("owner, attr", [(DPOTrainer, "_compute_loss"), (_BaseTrainer, "_send_telemetry")])
def test_missing_trl_internal_is_a_one_line_error(monkeypatch, tmp_path, owner, attr):
    assert attr in vars(owner), f"{owner.__name__}.{attr} is defined elsewhere now; point this test there"
    monkeypatch.delattr(owner, attr)
    with pytest.raises(ConfigError) as err:
        _check_trl()
    msg = str(err.value)
    assert "\n" not in msg and f"trl {trl.__version__}:" in msg and f"{owner.__name__}.{attr} not found" in msg, msg
    assert f"supports {SUPPORTED_TRL} (pip install '{SUPPORTED_TRL}')" in msg, msg
    # ... and it is raised where the trainer is built, before any TRL internal is used.
    unet, sched = tiny()
    chosen, rejected, labels = pairs(2)
    with pytest.raises(ConfigError, match=f"{owner.__name__}.{attr} not found"):
        build_dpo_trainer(unet, sched, "c", chosen, rejected, labels, DPOSettings(max_steps=1), str(tmp_path))


def test_missing_dpo_config_field_is_a_one_line_error(monkeypatch):
    fields = {k: v for k, v in DPOConfig.__dataclass_fields__.items() if k != "f_divergence_type"}
    monkeypatch.setattr(DPOConfig, "__dataclass_fields__", fields)
    with pytest.raises(ConfigError, match=r"^trl \S+: DPOConfig lacks f_divergence_type; fedml-feddpd supports"):
        _check_trl()
