"""The client's training loop, without FedML: clients (trainer.SupplementedTrainer) and the server (training an
upload on its supplement under `feddpd.delivery: server`, or its own classifier on the public split) run the same
code, so a sample counts the same wherever it is trained on."""
from __future__ import annotations

import torch
from torch.nn import functional as F


def client_optimizer(model: torch.nn.Module, args):
    """FedML's choice of client optimizer (ModelTrainerCLS.train, ml/trainer/my_model_trainer_classification.py:27-39):
    SGD, or Adam with amsgrad; every client trainer of ours uses it."""
    params = [p for p in model.parameters() if p.requires_grad]
    if args.client_optimizer == "sgd":
        return torch.optim.SGD(params, lr=args.learning_rate)
    return torch.optim.Adam(params, lr=args.learning_rate, weight_decay=args.weight_decay, amsgrad=True)


def train_weighted(model: torch.nn.Module, batches, device, args, epochs: int) -> None:
    """`epochs` passes over batches of (x, y) or (x, y, weight): cross-entropy, each sample's loss times its weight."""
    model = model.to(device)
    model.train()
    optimizer = client_optimizer(model, args)
    for _ in range(epochs):
        for batch in batches:
            x, y = batch[0].to(device), batch[1].to(device).long()
            model.zero_grad()
            loss = F.cross_entropy(model(x), y, reduction="none")
            if len(batch) > 2:
                loss = loss * batch[2].to(device)
            loss.mean().backward()
            optimizer.step()
