"""Diffusion-DPO of one client's LoRA adapter, with TRL's own DPO loss code.

TRL 1.x has no diffusion trainer, and DPOTrainer.__init__ requires a tokenizer and a causal-LM config. Its loss,
`DPOTrainer._compute_loss`, only needs a model returning per-token `log_probs` (plus three metric tensors) for a
batch laid out [chosen; rejected]. So the UNet is presented as a one-token policy whose log-probability of an image
is minus its denoising error at a timestep t and noise e shared by the pair:

    log pi(x) := -mean_pixels |e - e_theta(x_t, t)|^2

and DPOTrainer's sigmoid/hinge/ipo code then computes exactly the Diffusion-DPO loss (Wallace et al., 2023).
The reference is the same UNet with adapters disabled. `DiffusionDPOTrainer.__init__` runs transformers'
Trainer.__init__ and sets the attributes `_compute_loss` reads; tests/test_trl_contract.py checks the result
against the Diffusion-DPO formulas, and `_check_trl` fails in one line when those internals are gone.
"""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import contextlib  # noqa: E402
import inspect  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections import defaultdict  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from typing import Dict  # noqa: E402

import torch  # noqa: E402
from torch.utils.data import Dataset  # noqa: E402
from transformers import PrinterCallback  # noqa: E402
from trl import DPOConfig, DPOTrainer  # noqa: E402
from trl.trainer.base_trainer import _BaseTrainer  # noqa: E402

from ..errors import ConfigError  # noqa: E402
from .adapters import adapters_disabled, add_adapter, has_adapter, set_active_adapter  # noqa: E402
from .config import LOSS_TYPES, DPOSettings, image_shape_of  # noqa: E402

# The TRL releases whose DPOTrainer internals this module is written against; setup.py pins the same range.
SUPPORTED_TRL = "trl>=1.0,<1.17"

# (attribute, value taken from DPOConfig or fixed): what DPOTrainer.__init__ would set and _compute_loss reads.
_FIXED_DPO_OPTIONS = {"precompute_ref_log_probs": False, "f_divergence_type": "reverse_kl", "ld_alpha": None,
                      "use_weighting": False, "sync_ref_model": False, "loss_weights": None}


@dataclass
class PolicyOutput:
    """The fields DPOTrainer._compute_loss reads from a model output, each (batch, 1 token)."""

    log_probs: torch.Tensor
    entropy: torch.Tensor
    mean_logits: torch.Tensor
    is_top1: torch.Tensor


class DenoisingPolicy(torch.nn.Module):
    """The UNet seen by DPOTrainer: log-prob of x0 = minus its pixel-mean denoising error at (t, noise)."""

    is_gradient_checkpointing = False  # read by trl's disable_gradient_checkpointing()

    def __init__(self, unet, scheduler):
        super().__init__()
        self.unet = unet
        self.scheduler = scheduler

    def forward(self, x0, class_labels, timesteps, noise, **_lm_kwargs) -> PolicyOutput:
        # _lm_kwargs: input_ids, attention_mask, labels, use_cache, fused_lm_head of the one-token layout; unused.
        x_t = self.scheduler.add_noise(x0, noise, timesteps)
        eps = self.unet(x_t, timesteps, class_labels=class_labels).sample
        log_probs = -((eps - noise) ** 2).mean(dim=(1, 2, 3)).unsqueeze(1)
        zeros = torch.zeros_like(log_probs).detach()
        return PolicyOutput(log_probs, zeros, log_probs.detach(), zeros.bool())


class FrozenReference(torch.nn.Module):
    """The same policy with every adapter bypassed: the frozen base UNet, without a second copy."""

    def __init__(self, policy: DenoisingPolicy):
        super().__init__()
        self._policy = [policy]  # a list keeps the UNet out of this module's parameters

    def forward(self, **inputs) -> PolicyOutput:
        policy = self._policy[0]
        with adapters_disabled(policy.unet):
            return policy(**inputs)


class PreferencePairs(Dataset):
    """Item i is pair index i; the collator gathers the tensors, so nothing goes through `datasets`."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return i


class PairCollator:
    """Builds DPOTrainer's batch layout [chosen; rejected] with one shared (t, noise) per pair.

    input_ids/attention_mask/completion_mask describe a 2-token sequence whose second token is the "completion",
    so TRL's per-token sums and IPO's per-token averaging see exactly one value per image.
    """

    def __init__(self, chosen, rejected, labels, num_train_timesteps: int, seed: int):
        self.chosen, self.rejected, self.labels = chosen * 2.0 - 1.0, rejected * 2.0 - 1.0, labels
        self.num_train_timesteps = num_train_timesteps
        self.gen = torch.Generator().manual_seed(seed)

    def __call__(self, indices) -> Dict[str, torch.Tensor]:
        idx = torch.as_tensor(indices, dtype=torch.int64)
        n = len(idx)
        t = torch.randint(0, self.num_train_timesteps, (n,), generator=self.gen)
        noise = torch.randn((n,) + tuple(self.chosen.shape[1:]), generator=self.gen)
        y = self.labels[idx]
        return {
            "input_ids": torch.zeros(2 * n, 2, dtype=torch.int64),
            "attention_mask": torch.ones(2 * n, 2, dtype=torch.int64),
            "completion_mask": torch.tensor([[0, 1]] * (2 * n), dtype=torch.int64),
            "x0": torch.cat([self.chosen[idx], self.rejected[idx]]),
            "class_labels": torch.cat([y, y]),
            "timesteps": torch.cat([t, t]),
            "noise": torch.cat([noise, noise]),
        }


def _check_trl() -> None:
    """Fail before training, in one line, if the TRL internals this module reuses are missing or reshaped."""
    problems = []
    compute_loss = getattr(DPOTrainer, "_compute_loss", None)
    if compute_loss is None:
        problems.append("DPOTrainer._compute_loss not found")
    elif list(inspect.signature(compute_loss).parameters) != ["self", "model", "inputs", "return_outputs"]:
        problems.append("DPOTrainer._compute_loss(model, inputs, return_outputs) changed signature")
    if not hasattr(_BaseTrainer, "_send_telemetry"):
        problems.append("_BaseTrainer._send_telemetry not found")
    fields = getattr(DPOConfig, "__dataclass_fields__", {})
    missing = [f for f in dict.fromkeys(("beta", "loss_type", "f_divergence_type", "f_alpha_divergence_coef",
                                         "label_smoothing", *_FIXED_DPO_OPTIONS)) if f not in fields]
    if missing:
        problems.append(f"DPOConfig lacks {', '.join(missing)}")
    if problems:
        import trl

        raise ConfigError(f"trl {getattr(trl, '__version__', '?')}: {'; '.join(problems)}; fedml-feddpd supports "
                          f"{SUPPORTED_TRL} (pip install '{SUPPORTED_TRL}')")


class DiffusionDPOTrainer(DPOTrainer):
    """DPOTrainer whose policy is a DenoisingPolicy; training and loss code are TRL's, unchanged."""

    def __init__(self, policy: DenoisingPolicy, args: DPOConfig, train_dataset, data_collator):
        _check_trl()
        # Other TRL loss types read per-token statistics a one-token denoising "policy" does not have.
        if len(args.loss_type) != 1 or args.loss_type[0] not in LOSS_TYPES:
            raise ValueError(f"dpo_args.loss_type: expected one of {', '.join(LOSS_TYPES)}, got {args.loss_type}")
        for name, value in _FIXED_DPO_OPTIONS.items():
            if getattr(args, name) != value:
                raise ValueError(f"DPOConfig.{name}={getattr(args, name)!r} is not supported for diffusion "
                                 f"(use {value!r})")
        # Skip DPOTrainer.__init__ (tokenizer, LM config, fused LM head); keep transformers' Trainer setup.
        _BaseTrainer.__init__(self, model=policy, args=args, train_dataset=train_dataset, data_collator=data_collator)
        # The attributes DPOTrainer.__init__ would set from `args` and that _compute_loss/log/training_step read.
        self.beta = args.beta
        self.loss_types = list(args.loss_type)
        self.loss_weights = [1.0]
        self.precompute_ref_logps = False
        self.ld_alpha = None
        self.f_divergence_type = args.f_divergence_type
        self.f_alpha_divergence_coef = args.f_alpha_divergence_coef
        self.label_smoothing = args.label_smoothing
        self.use_weighting = False
        self.aux_loss_enabled = False
        self.router_aux_loss_coef = 0.0
        self.padding_free = False
        self._is_vlm = False
        self._is_vision_dataset = False
        self.ref_model = FrozenReference(policy)
        self.maybe_activation_offload_context = contextlib.nullcontext()
        self._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
        self._total_train_tokens = 0
        self._tp_size = 1
        self.history = []  # one dict per optimizer step: loss and TRL's metrics of that step

    def _send_telemetry(self):
        """Offline server: never ping the Hub (the base reads model.config.model_type, which a UNet lacks)."""

    def training_step(self, *args, **kwargs):
        loss = super().training_step(*args, **kwargs)
        # TRL's log() averages and clears _metrics; keep the per-step values for the caller's stats.
        step = {k: v[-1] for k, v in self._metrics["train"].items() if v and k.startswith(("rewards/", "logps/"))}
        self.history.append(dict(step, loss=float(loss.detach())))
        return loss


def dpo_config(settings: DPOSettings, output_dir: str, use_cpu: bool = True, progress: bool = False) -> DPOConfig:
    """The trl.DPOConfig of one adapter run: nothing saved, logged or reported; CPU-safe defaults."""
    # transformers >= 5.2x renamed gradient_checkpointing (TRL defaults it to True) and warns on the old name.
    renamed = "activation_checkpointing" in DPOConfig.__dataclass_fields__
    return DPOConfig(
        output_dir=output_dir, beta=settings.beta, loss_type=[settings.loss_type],
        learning_rate=settings.learning_rate, max_steps=settings.max_steps,
        per_device_train_batch_size=settings.batch_size, seed=settings.seed, data_seed=settings.seed,
        bf16=False, fp16=False, use_cpu=use_cpu, remove_unused_columns=False,
        **({"activation_checkpointing": False} if renamed else {"gradient_checkpointing": False}),
        report_to=[], save_strategy="no", logging_strategy="no", eval_strategy="no", disable_tqdm=not progress,
        optim="adamw_torch", weight_decay=0.0, warmup_steps=0, dataloader_num_workers=0,
        dataloader_pin_memory=False, log_level="warning",
    )


def _check_pairs(chosen, rejected, labels, unet) -> None:
    c = unet.config
    shape = image_shape_of(c)
    for name, t in (("chosen", chosen), ("rejected", rejected)):
        if not torch.is_tensor(t) or t.ndim != 4 or tuple(t.shape[1:]) != shape:
            raise ValueError(f"train_dpo_adapter: {name} must be a (N, {', '.join(map(str, shape))}) tensor, "
                             f"got {tuple(t.shape) if torch.is_tensor(t) else type(t).__name__}")
    if not torch.is_tensor(labels) or labels.ndim != 1:
        raise ValueError("train_dpo_adapter: labels must be a 1-D int64 tensor")
    if not len(chosen) == len(rejected) == len(labels) or len(labels) == 0:
        raise ValueError(f"train_dpo_adapter: chosen, rejected and labels need the same non-zero length, "
                         f"got {len(chosen)}, {len(rejected)}, {len(labels)}")
    if int(labels.min()) < 0 or int(labels.max()) >= c.num_class_embeds:
        raise ValueError(f"train_dpo_adapter: labels must lie in 0..{c.num_class_embeds - 1}")


def build_dpo_trainer(unet, scheduler, adapter_name: str, chosen, rejected, labels, settings: DPOSettings,
                      output_dir: str, progress: bool = False) -> DiffusionDPOTrainer:
    """Trainer for `adapter_name` (added if missing, then made the only trainable weights)."""
    _check_pairs(chosen, rejected, labels, unet)
    if not has_adapter(unet, adapter_name):
        add_adapter(unet, adapter_name, settings)
    set_active_adapter(unet, adapter_name)
    device = next(unet.parameters()).device
    # Batches are built on the CPU; Trainer moves them to the UNet's device.
    collator = PairCollator(chosen.float().cpu(), rejected.float().cpu(), labels.long().cpu(),
                            scheduler.config.num_train_timesteps, settings.seed)
    args = dpo_config(settings, output_dir, use_cpu=device.type == "cpu", progress=progress)
    trainer = DiffusionDPOTrainer(DenoisingPolicy(unet, scheduler), args, PreferencePairs(len(labels)), collator)
    trainer.remove_callback(PrinterCallback)  # with tqdm off, Trainer would print the final metrics dict to stdout
    return trainer


def train_dpo_adapter(unet, scheduler, adapter_name: str, chosen, rejected, labels, settings: DPOSettings,
                      progress: bool = False) -> dict:
    """Fit client `adapter_name`'s LoRA adapter with Diffusion-DPO; the base UNet and other adapters stay unchanged.

    chosen/rejected: float32 (N, C, H, W) in [0, 1]; labels: int64 (N,), the class of both images of a pair.
    Returns stats; the adapter is left active (use adapters.using_adapter/adapters_disabled to route sampling).
    """
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="feddpd-dpo-") as out:
        trainer = build_dpo_trainer(unet, scheduler, adapter_name, chosen, rejected, labels, settings, out, progress)
        was_training = unet.training
        try:
            trainer.train()
        finally:
            unet.train(was_training)
    seconds = time.perf_counter() - start
    hist = trainer.history

    def last(key, n=10):
        vals = [h[key] for h in hist[-n:] if key in h]
        return sum(vals) / len(vals) if vals else float("nan")

    return {
        "adapter": adapter_name, "pairs": int(len(labels)), "steps": int(trainer.state.global_step),
        "seconds": seconds, "steps_per_second": trainer.state.global_step / seconds if seconds > 0 else float("nan"),
        "loss_first": hist[0]["loss"] if hist else float("nan"), "loss_final": last("loss"),
        "reward_accuracy": last("rewards/accuracies"), "reward_margin": last("rewards/margins"),
    }
