"""Global-model evaluation: top-1, balanced accuracy, per-class accuracy, loss."""
from __future__ import annotations

import numpy as np
import torch
from torch.nn import functional as F


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches, num_classes: int) -> dict:
    """`batches` is any iterable of (x, y) — a DataLoader or FedML's list of batches."""
    was_training = model.training
    model.eval()
    correct = np.zeros(num_classes)
    total = np.zeros(num_classes)
    loss_sum, n = 0.0, 0
    for x, y in batches:
        logits = model(x)
        y = y.long()
        loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
        n += len(y)
        hit = (logits.argmax(1) == y).numpy()
        np.add.at(total, y.numpy(), 1)
        np.add.at(correct, y.numpy(), hit)
    model.train(was_training)
    present = total > 0
    per_class = np.where(present, correct / np.maximum(total, 1), np.nan)
    return {
        "top1": float(correct.sum() / max(n, 1)),
        "balanced_accuracy": float(np.mean(per_class[present])) if present.any() else float("nan"),
        "per_class_accuracy": [None if np.isnan(a) else float(a) for a in per_class],
        "loss": loss_sum / max(n, 1),
        "num_samples": n,
    }
