"""Diffusion-DPO of the clients' LoRA adapters (a supplement round's together), with TRL's own DPO loss code.

TRL 1.x has no diffusion trainer, and DPOTrainer.__init__ requires a tokenizer and a causal-LM config. Its loss,
`DPOTrainer._compute_loss`, only needs a model returning per-token `log_probs` (plus three metric tensors) for a
batch laid out [chosen; rejected]. So the UNet is presented as a one-token policy whose log-probability of an image
is minus its denoising error at a timestep t and noise e shared by the pair:

    log pi(x) := -mean_pixels |e - e_theta(x_t, t)|^2

and DPOTrainer's sigmoid/hinge/ipo code then computes exactly the Diffusion-DPO loss (Wallace et al., 2023).
The reference is the same UNet with adapters disabled (policy, reference and batches: dpo_batches.py). `DiffusionDPOTrainer.__init__` runs transformers'
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
from dataclasses import replace  # noqa: E402
from typing import Dict  # noqa: E402

import torch  # noqa: E402
from transformers import PrinterCallback  # noqa: E402
from trl import DPOConfig, DPOTrainer  # noqa: E402
from trl.trainer.base_trainer import _BaseTrainer  # noqa: E402

from ..errors import ConfigError  # noqa: E402
from .adapters import (  # noqa: E402
    adapter_parameters, adapters_disabled, add_adapter, has_adapter, set_active_adapter, set_trainable_adapters,
)
from .config import LOSS_TYPES, DPOSettings  # noqa: E402
from .dpo_batches import (  # noqa: E402
    DenoisingPolicy, FrozenReference, JointPairs, JointRows, PairCollator, Steps, _check_pairs,
)

__all__ = ["DiffusionDPOTrainer", "PairCollator", "build_dpo_trainer", "build_joint_trainer", "dpo_config",
           "train_dpo_adapter", "train_dpo_adapters"]

# The TRL releases whose DPOTrainer internals this module is written against; setup.py pins the same range.
SUPPORTED_TRL = "trl>=1.0,<1.17"

# (attribute, value taken from DPOConfig or fixed): what DPOTrainer.__init__ would set and _compute_loss reads.
_FIXED_DPO_OPTIONS = {"precompute_ref_log_probs": False, "f_divergence_type": "reverse_kl", "ld_alpha": None,
                      "use_weighting": False, "sync_ref_model": False, "loss_weights": None}


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
        self.history: Dict[str, list] = {}  # per adapter, one dict per optimizer step: its loss and TRL's metrics
        self.adapter_params: Dict[str, list] = {}  # per adapter, its LoRA weights (clipped separately)

    def _send_telemetry(self):
        """Offline server: never ping the Hub (the base reads model.config.model_type, which a UNet lacks)."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """A JointPairs batch: one UNet pass routes each client's rows through its adapter (and one pass through
        the frozen base), then TRL's `_compute_loss` computes each client's loss on its own rows; the step
        minimises their sum, so each adapter gets exactly the gradient of its own TRL loss. Any other batch
        (PairCollator's layout, one client, the active adapter): TRL's loss as it is."""
        if "groups" not in inputs:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        from .adapters import routed

        policy = self.accelerator.unwrap_model(model)
        joint = {k: inputs[k] for k in ("x0", "class_labels", "timesteps", "noise")}
        with routed(policy.unet, inputs["adapters"]):
            out = policy(**joint)
        with torch.no_grad(), adapters_disabled(policy.unet):
            ref = policy(**joint)
        policy.joint = {"policy": out, "reference": ref}
        # TRL reads self.model per call (its mode, is_peft_model): the rows view answers as the policy would
        view, trained = JointRows(policy), self.model
        self.model = view
        try:
            total = 0.0
            for name, sub in inputs["groups"]:
                loss = super()._compute_loss(view, sub, False)
                total = total + loss
                mode = "train" if view.training else "eval"
                step = {k: v[-1] for k, v in self._metrics[mode].items() if v and k.startswith(("rewards/", "logps/"))}
                self.history.setdefault(name, []).append(dict(step, loss=float(loss.detach())))
        finally:
            self.model, policy.joint = trained, None
        return total

    def _clip_grad_norm(self, model):
        """Clip each adapter's gradient to max_grad_norm on its own, as if it trained alone (Trainer clips the
        norm of all trainable weights together, which would couple the clients of a joint step)."""
        norms = [torch.nn.utils.clip_grad_norm_(params, self.args.max_grad_norm)
                 for params in self.adapter_params.values()]
        return torch.stack(norms).norm() if norms else torch.tensor(0.0)


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


def build_dpo_trainer(unet, scheduler, adapter_name: str, chosen, rejected, labels, settings: DPOSettings,
                      output_dir: str, progress: bool = False) -> DiffusionDPOTrainer:
    """Trainer for `adapter_name` alone (added if missing, then made the only trainable and active weights)."""
    return build_joint_trainer(unet, scheduler, {adapter_name: (chosen, rejected, labels, settings.seed)}, settings,
                               output_dir, progress)


def build_joint_trainer(unet, scheduler, jobs: Dict[str, tuple], settings: DPOSettings, output_dir: str,
                        progress: bool = False) -> DiffusionDPOTrainer:
    """One trainer for every adapter in `jobs` {name: (chosen, rejected, labels, seed)}: added if missing (initial
    weights from its seed), made the only trainable weights, trained together (JointPairs); `settings.seed` seeds
    TRL/transformers only, which draw nothing here."""
    if not jobs:
        raise ValueError("train_dpo_adapters: no adapters to train")
    for chosen, rejected, labels, _ in jobs.values():
        _check_pairs(chosen, rejected, labels, unet)
    for name, (_, _, _, seed) in jobs.items():
        if not has_adapter(unet, name):  # a new adapter's initial weights depend on (its seed, its name) only
            add_adapter(unet, name, replace(settings, seed=seed))
    set_active_adapter(unet, next(iter(jobs)))  # adapters on; a one-client PairCollator batch uses this one
    set_trainable_adapters(unet, list(jobs))
    device = next(unet.parameters()).device
    # Batches are built on the CPU; Trainer moves them to the UNet's device.
    clients = {name: PairCollator(chosen.float().cpu(), rejected.float().cpu(), labels.long().cpu(),
                                  scheduler.config.num_train_timesteps, seed)
               for name, (chosen, rejected, labels, seed) in jobs.items()}
    args = dpo_config(settings, output_dir, use_cpu=device.type == "cpu", progress=progress)
    trainer = DiffusionDPOTrainer(DenoisingPolicy(unet, scheduler), args, Steps(settings.max_steps),
                                  JointPairs(clients, settings.batch_size))
    trainer.adapter_params = {name: list(adapter_parameters(unet, name).values()) for name in jobs}
    trainer.remove_callback(PrinterCallback)  # with tqdm off, Trainer would print the final metrics dict to stdout
    return trainer


def train_dpo_adapter(unet, scheduler, adapter_name: str, chosen, rejected, labels, settings: DPOSettings,
                      progress: bool = False) -> dict:
    """Fit client `adapter_name`'s LoRA adapter with Diffusion-DPO; the base UNet and other adapters stay unchanged.

    chosen/rejected: float32 (N, C, H, W) in [0, 1]; labels: int64 (N,), the class of both images of a pair.
    Returns stats; the adapter is left active (use adapters.using_adapter/adapters_disabled to route sampling).
    """
    stats = train_dpo_adapters(unet, scheduler, {adapter_name: (chosen, rejected, labels, settings.seed)}, settings,
                               progress)[adapter_name]
    set_active_adapter(unet, adapter_name)
    return stats


def train_dpo_adapters(unet, scheduler, jobs: Dict[str, tuple], settings: DPOSettings,
                       progress: bool = False) -> Dict[str, dict]:
    """Fit several clients' adapters together: jobs {name: (chosen, rejected, labels, seed)}, one optimizer step of
    `settings.batch_size` pairs per client at a time, all in one routed UNet pass per step (adapters.routed).

    Each adapter's loss is TRL's DPO loss on its own pairs, its gradient is clipped on its own and AdamW's state is
    per weight, so each adapter ends where training it alone with the same pairs and seed ends (up to float
    rounding: tests/test_dpo.py). `steps_per_second` counts joint steps; `seconds` is the joint run's."""
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="feddpd-dpo-") as out:
        trainer = build_joint_trainer(unet, scheduler, jobs, settings, out, progress)
        was_training = unet.training
        try:
            trainer.train()
        finally:
            unet.train(was_training)
    seconds = time.perf_counter() - start
    steps = int(trainer.state.global_step)
    result = {}
    for name, (_, _, labels, _) in jobs.items():
        hist = trainer.history.get(name, [])

        def last(key, n=10):
            vals = [h[key] for h in hist[-n:] if key in h]
            return sum(vals) / len(vals) if vals else float("nan")

        result[name] = {
            "adapter": name, "pairs": int(len(labels)), "steps": steps, "seconds": seconds,
            "clients_together": len(jobs), "steps_per_second": steps / seconds if seconds > 0 else float("nan"),
            "loss_first": hist[0]["loss"] if hist else float("nan"), "loss_final": last("loss"),
            "reward_accuracy": last("rewards/accuracies"), "reward_margin": last("rewards/margins"),
        }
    return result
