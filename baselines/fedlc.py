"""FedLC (Zhang et al., "Federated Learning with Label Distribution Skew via Logits Calibration", ICML 2022):
FedAvg whose clients train with a logit-calibrated cross-entropy.

Client side only. Each client counts the labels of its own `train_data` inside `train`; the counts are a
local variable there and never leave the client: what FedML uploads is the (sample_count, state_dict) of
FedAvg (methods.WITHIN).
"""
from __future__ import annotations

import torch
from fedml.ml.trainer.my_model_trainer_classification import ModelTrainerCLS
from torch.nn import functional as F
from torch.utils.data import TensorDataset

from fedml_feddpd.local_training import client_optimizer
from fedml_feddpd.trainer import tensors_of

# A class the client does not hold counts as this many samples (the official code's convention,
# label_distrib[c] = max(1e-8, n_c)): its logit drops by tau * 1e-8 ** -0.25 = 100 * tau, which all but
# removes it from the client's softmax. Finite, so the loss stays finite for any tau.
MIN_COUNT = 1e-8


def local_labels(train_data) -> torch.Tensor:
    """Every label of the client's own loader. Read without drawing from the loader's shuffle generator,
    so the client trains on the batches FedAvg's client would."""
    dataset = getattr(train_data, "dataset", None)
    if isinstance(dataset, TensorDataset):
        return dataset.tensors[1].long().flatten()
    return tensors_of(train_data)[1].long().flatten()


def label_counts(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """n_c for c < num_classes (float)."""
    return torch.bincount(labels, minlength=num_classes)[:num_classes].float()


def calibrated_logits(logits: torch.Tensor, counts: torch.Tensor, tau: float) -> torch.Tensor:
    """z_c - tau * n_c ** (-1/4), with n_c = max(n_c, MIN_COUNT) (FedLC's calibrated logit)."""
    shift = tau * counts.to(logits).clamp_min(MIN_COUNT).pow(-0.25)
    return logits - shift


def calibrated_loss(logits: torch.Tensor, labels: torch.Tensor, counts: torch.Tensor, tau: float) -> torch.Tensor:
    """Mean cross-entropy of the calibrated logits; tau = 0 is plain cross-entropy."""
    return F.cross_entropy(calibrated_logits(logits, counts, tau), labels.long())


class LabelSkewTrainer(ModelTrainerCLS):
    """`ModelTrainerCLS.train` with its cross-entropy replaced by `loss(logits, labels, counts, args)`,
    where `counts` are the client's own label counts, computed here from `train_data` on every call (sp
    shares one trainer among all clients, so nothing about a client may outlive its call)."""

    def loss(self, logits, labels, counts, args):
        raise NotImplementedError

    def train(self, train_data, device, args):
        model = self.model
        model.to(device)
        model.train()
        labels_here, counts = local_labels(train_data), None  # local variables: never leave this call
        optimizer = client_optimizer(model, args)
        for _ in range(args.epochs):
            for batch in train_data:
                x, labels = batch[0].to(device), batch[1].to(device).long()
                model.zero_grad()
                logits = model(x)
                if counts is None:  # the class count is the model's output width
                    counts = label_counts(labels_here, logits.shape[1]).to(device)
                self.loss(logits, labels, counts, args).backward()
                optimizer.step()


class FedLCTrainer(LabelSkewTrainer):
    """FedLC's client: cross-entropy over z_c - fedlc_tau * n_c^(-1/4) (paper default tau = 1.0)."""

    def loss(self, logits, labels, counts, args):
        return calibrated_loss(logits, labels, counts, float(getattr(args, "fedlc_tau", 1.0)))
