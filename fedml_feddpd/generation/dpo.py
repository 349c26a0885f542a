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
from dataclasses import dataclass, replace  # noqa: E402
from typing import Dict  # noqa: E402

import torch  # noqa: E402
from torch.utils.data import Dataset  # noqa: E402
from transformers import PrinterCallback  # noqa: E402
from trl import DPOConfig, DPOTrainer  # noqa: E402
from trl.trainer.base_trainer import _BaseTrainer  # noqa: E402

from ..errors import ConfigError  # noqa: E402
from .adapters import (  # noqa: E402
    adapter_parameters, adapters_disabled, add_adapter, has_adapter, set_active_adapter, set_trainable_adapters,
)
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

    def take(self, rows: torch.Tensor) -> "PolicyOutput":
        return PolicyOutput(self.log_probs[rows], self.entropy[rows], self.mean_logits[rows], self.is_top1[rows])


class DenoisingPolicy(torch.nn.Module):
    """The UNet seen by DPOTrainer: log-prob of x0 = minus its pixel-mean denoising error at (t, noise)."""

    is_gradient_checkpointing = False  # read by trl's disable_gradient_checkpointing()

    def __init__(self, unet, scheduler):
        super().__init__()
        self.unet = unet
        self.scheduler = scheduler
        self.joint = None  # {"policy": PolicyOutput, "reference": PolicyOutput} of the current joint step

    def forward(self, x0=None, class_labels=None, timesteps=None, noise=None, rows=None, **_lm_kwargs) -> PolicyOutput:
        # _lm_kwargs: input_ids, attention_mask, labels, use_cache, fused_lm_head of the one-token layout; unused.
        if rows is not None:  # one client's rows of the joint pass (DiffusionDPOTrainer.compute_loss)
            return self.joint["policy"].take(rows)
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
        if inputs.get("rows") is not None:
            return policy.joint["reference"].take(inputs["rows"])
        with adapters_disabled(policy.unet):
            return policy(**inputs)


class Steps(Dataset):
    """Item i is optimizer step i: JointPairs draws each client's batch itself, so nothing goes through
    `datasets` and Trainer's sampler order does not matter."""

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

    def next_indices(self, batch_size: int) -> torch.Tensor:
        """The next min(batch_size, N) pairs of the current epoch (a permutation drawn from this client's
        generator; the epoch's last batch may be smaller, as with a DataLoader without drop_last)."""
        if getattr(self, "_order", None) is None or self._pos >= len(self._order):
            self._order, self._pos = torch.randperm(len(self.labels), generator=self.gen), 0
        idx = self._order[self._pos:self._pos + batch_size]
        self._pos += len(idx)
        return idx

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


class JointPairs:
    """One optimizer step of every client's adapter in one batch: client k's pairs ([chosen; rejected], its own
    (t, noise), from its own seed) occupy rows `groups[k]` of the joint tensors, routed through adapter k.

    Each client draws exactly what it would draw alone (its own PairCollator, generator and epochs), so training
    K adapters together equals training each alone on the same pairs, up to float rounding."""

    def __init__(self, clients: Dict[str, PairCollator], batch_size: int):
        self.clients, self.batch_size = clients, batch_size

    def __call__(self, _steps) -> Dict[str, object]:
        parts, groups, names, offset = [], [], [], 0
        for name, pairs in self.clients.items():
            batch = pairs(pairs.next_indices(self.batch_size))
            n2 = len(batch["x0"])
            parts.append(batch)
            # the one-token layout TRL's _compute_loss reads, plus this client's rows of the joint pass
            layout = {k: batch[k] for k in ("input_ids", "attention_mask", "completion_mask")}
            groups.append((name, dict(layout, rows=torch.arange(offset, offset + n2))))
            names += [name] * n2
            offset += n2
        joint = {k: torch.cat([b[k] for b in parts]) for k in ("x0", "class_labels", "timesteps", "noise")}
        return dict(joint, adapters=names, groups=groups)


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
        try:
            total = 0.0
            for name, sub in inputs["groups"]:
                loss = super()._compute_loss(model, sub, False)
                total = total + loss
                mode = "train" if self.model.training else "eval"
                step = {k: v[-1] for k, v in self._metrics[mode].items() if v and k.startswith(("rewards/", "logps/"))}
                self.history.setdefault(name, []).append(dict(step, loss=float(loss.detach())))
        finally:
            policy.joint = None
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
