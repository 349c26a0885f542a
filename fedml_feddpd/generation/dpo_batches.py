"""What DiffusionDPOTrainer trains on: the UNet presented as a one-token policy (its log-probability of an
image is minus its denoising error), the frozen reference, and the batches of preference pairs, one client's
(PairCollator) or every client's of a supplement round in one joint batch (JointPairs). See generation/dpo.py."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict

import torch
from torch.utils.data import Dataset

from .adapters import adapters_disabled
from .config import image_shape_of


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


class JointRows(torch.nn.Module):
    """The policy as TRL's `_compute_loss` sees it for one client of a joint step: the step's outputs, taken by
    rows, without the UNet as a submodule. `_compute_loss` walks every module of `trainer.model` on each call
    (accelerate's is_peft_model, trl/trainer/dpo_trainer.py:1328 in TRL 1.16), which with the UNet and its adapters
    cost 2.6 ms per client per step at 10 adapters and 6.6 ms at 40: a cost growing with clients squared."""

    is_gradient_checkpointing = False

    def __init__(self, policy: DenoisingPolicy):
        super().__init__()
        self._policy = [policy]  # a list keeps the UNet out of this module's modules
        self.train(policy.training)

    def forward(self, rows=None, **_lm_kwargs) -> PolicyOutput:
        return self._policy[0].joint["policy"].take(rows)


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
