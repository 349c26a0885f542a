"""Pins the TRL internals that fedml_feddpd.generation.dpo relies on.

DiffusionDPOTrainer skips DPOTrainer.__init__ and runs DPOTrainer._compute_loss on a UNet presented as a one-token
policy. If a TRL release renames, adds or reshapes any of what that needs, these tests fail with a message saying
what moved, instead of the Diffusion-DPO step silently computing something else.
"""
import inspect
import re
import tempfile

import pytest
import torch

from fedml_feddpd.generation import DPOSettings, GeneratorConfig, build_train_scheduler, build_unet
from fedml_feddpd.generation.dpo import (
    _FIXED_DPO_OPTIONS, DiffusionDPOTrainer, PairCollator, PolicyOutput, _check_trl, build_dpo_trainer,
)

trl = pytest.importorskip("trl")
from trl import DPOConfig, DPOTrainer  # noqa: E402
from trl.trainer.base_trainer import _BaseTrainer  # noqa: E402

torch.set_num_threads(1)
FIX = "update fedml_feddpd/generation/dpo.py (DiffusionDPOTrainer) for this TRL version"


def src(fn):
    return inspect.getsource(fn)


@pytest.fixture(scope="module")
def trainer():
    cfg = GeneratorConfig(block_out_channels=(8, 16), attention_head_dim=8)
    torch.manual_seed(0)
    unet = build_unet(cfg).eval()
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 1, 8, 8, generator=g)
    with tempfile.TemporaryDirectory() as out:
        yield build_dpo_trainer(unet, build_train_scheduler(cfg), "c", x, x.flip(0), torch.arange(4),
                                DPOSettings(max_steps=1, batch_size=2), out)


def test_version_in_supported_range():
    major, minor = (int(v) for v in trl.__version__.split(".")[:2])
    assert (1, 0) <= (major, minor) < (1, 17), f"trl {trl.__version__} is outside trl>=1.0,<1.17; {FIX}"
    _check_trl()  # the trainer's own start-up check agrees


def test_compute_loss_signatures():
    assert list(inspect.signature(DPOTrainer._compute_loss).parameters) == ["self", "model", "inputs",
                                                                            "return_outputs"], FIX
    params = list(inspect.signature(DPOTrainer.compute_loss).parameters)
    assert params[:4] == ["self", "model", "inputs", "return_outputs"], FIX
    assert "_compute_loss(model, inputs, return_outputs)" in src(DPOTrainer.compute_loss), FIX


def test_every_self_attribute_read_by_the_loss_is_set(trainer):
    used = set()
    for fn in (DPOTrainer._compute_loss, DPOTrainer.compute_loss, DPOTrainer.training_step, DPOTrainer.log):
        used |= set(re.findall(r"self\.(\w+)", src(fn)))
    missing = sorted(a for a in used if not hasattr(trainer, a))
    assert not missing, f"DPOTrainer now reads {missing}, which DiffusionDPOTrainer does not set; {FIX}"


def test_model_outputs_and_inputs_the_loss_reads():
    body = src(DPOTrainer._compute_loss)
    read = set(re.findall(r"(?<!ref_)outputs\.(\w+)", body)) - {"aux_loss", "log_sum_sq_probs", "logits"}
    provided = set(PolicyOutput.__dataclass_fields__)
    assert read <= provided, f"_compute_loss reads model outputs {sorted(read - provided)}; {FIX}"
    assert "fused_lm_head=True" in body and "outputs.log_probs[:, -seq_len:]" in body, FIX
    keys = set(re.findall(r'inputs\["(\w+)"\]', body)) - {"ref_chosen_logps", "ref_rejected_logps"}
    batch = PairCollator(torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 8, 8), torch.zeros(1, dtype=torch.long), 10, 0)([0])
    assert keys <= set(batch), f"_compute_loss reads batch keys {sorted(keys - set(batch))}; {FIX}"
    assert "chunk(2, dim=0)" in body, f"the [chosen; rejected] batch layout changed; {FIX}"


def test_loss_types_still_defined_on_delta_score():
    body = src(DPOTrainer._compute_loss)
    assert 'loss_type == "sigmoid"' in body and "-F.logsigmoid(self.beta * delta_score)" in body, FIX
    assert 'loss_type == "hinge"' in body and "torch.relu(1 - self.beta * delta_score)" in body, FIX
    assert 'loss_type == "ipo"' in body and "(ipo_delta - 1 / (2 * self.beta)) ** 2" in body, FIX
    assert "completion_mask.chunk(2, dim=0)" in body, f"IPO's per-token normalisation changed; {FIX}"


def test_reference_path_uses_ref_model_when_not_a_peft_model():
    body = src(DPOTrainer._compute_loss)
    assert "self.ref_model(**ref_model_kwargs" in body, FIX
    assert "is_peft_model(self.model) and self.ref_model is None" in body, FIX
    from trl.models.utils import disable_gradient_checkpointing
    assert set(re.findall(r"model\.(\w+)", src(disable_gradient_checkpointing))) <= {
        "is_gradient_checkpointing", "gradient_checkpointing_disable", "gradient_checkpointing_enable"}, FIX


def test_base_trainer_init_and_telemetry_hooks():
    assert "_send_telemetry" in src(_BaseTrainer.__init__), FIX
    assert DiffusionDPOTrainer._send_telemetry is not _BaseTrainer._send_telemetry
    for name in ("beta", "loss_type", "f_divergence_type", "f_alpha_divergence_coef", "label_smoothing",
                 *_FIXED_DPO_OPTIONS):
        assert name in DPOConfig.__dataclass_fields__, f"DPOConfig.{name} is gone; {FIX}"


def test_trainer_runs_one_step_through_trl(trainer):
    trainer.train()
    assert trainer.state.global_step == 1
    assert len(trainer.history) == 1 and torch.isfinite(torch.tensor(trainer.history[0]["loss"]))
    assert {"rewards/accuracies", "rewards/margins"} <= set(trainer.history[0])
