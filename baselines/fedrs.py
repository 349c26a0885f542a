"""FedRS (Li & Zhan, "FedRS: Federated Learning with Restricted Softmax for Label Distribution Non-IID Data",
KDD 2021): FedAvg whose clients train with a restricted softmax.

Client side only. Which classes a client holds is read from its own `train_data` inside `train` and never
leaves the client (methods.WITHIN).
"""
from __future__ import annotations

import torch
from torch.nn import functional as F

from .fedlc import LabelSkewTrainer


def restricted_logits(logits: torch.Tensor, counts: torch.Tensor, alpha: float) -> torch.Tensor:
    """Logits of classes the client holds (n_c > 0) times 1, of the others times alpha.

    The whole logit (bias included) is scaled: the paper writes the logit as w_c^T h; the official code
    scales the classifier's output without its bias. The same for a bias-free head."""
    scale = torch.where(counts.to(logits.device) > 0, torch.ones((), dtype=logits.dtype, device=logits.device),
                        torch.full((), float(alpha), dtype=logits.dtype, device=logits.device))
    return logits * scale


def restricted_loss(logits: torch.Tensor, labels: torch.Tensor, counts: torch.Tensor, alpha: float) -> torch.Tensor:
    """Mean cross-entropy of the restricted logits; alpha = 1 is plain cross-entropy."""
    return F.cross_entropy(restricted_logits(logits, counts, alpha), labels.long())


class FedRSTrainer(LabelSkewTrainer):
    """FedRS's client: cross-entropy over alpha-scaled logits of absent classes (paper default alpha = 0.5)."""

    def loss(self, logits, labels, counts, args):
        return restricted_loss(logits, labels, counts, float(getattr(args, "fedrs_alpha", 0.5)))
