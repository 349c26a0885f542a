"""Client side: FedML's classification trainer, extended to train on local data plus a supplement.

Clients only train. Batches are (x, y) or (x, y, weight); synthetic samples carry the weight
`feddpd.supplement_weight`, real ones 1.
"""
from __future__ import annotations

import torch
from fedml.ml.trainer.my_model_trainer_classification import ModelTrainerCLS
from torch.utils.data import DataLoader, TensorDataset

from .local_training import train_weighted


class SupplementedTrainer(ModelTrainerCLS):
    """`ModelTrainerCLS.train` (ml/trainer/my_model_trainer_classification.py:21) with a per-sample
    loss weight; FedML's loop only unpacks (x, y). Optimizer choice is FedML's."""

    def train(self, train_data, device, args):
        train_weighted(self.model, train_data, device, args, args.epochs)


def tensors_of(batches) -> tuple[torch.Tensor, torch.Tensor]:
    """All (x, y) of a client's loader, leaving its shuffle generator where it was: reading a shuffled
    DataLoader draws from its generator, which would give this client other batches than under FedAvg."""
    generator = getattr(batches, "generator", None)
    state = generator.get_state() if generator is not None else None
    xs, ys = zip(*[(b[0], b[1]) for b in batches])
    if state is not None:
        generator.set_state(state)
    return torch.cat(xs), torch.cat(ys)


def with_supplement(real: tuple[torch.Tensor, torch.Tensor], supplement, weight: float, batch_size: int,
                    seed: int, space=None) -> DataLoader:
    """A client's loader over its real data plus the supplement (generator space, converted to the model's
    input by `space`, data.spaces.ModelSpace), yielding (x, y, weight); (x, y) when synthetic samples weigh as
    much as real ones, so that FedML's own client trainers (FedProx, FedNova, SCAFFOLD) read it as they read
    FedML's loaders. Both give SupplementedTrainer the same losses, and the same shuffle."""
    x, y = real
    w = torch.ones(len(y))
    if supplement is not None and len(supplement.labels):
        images = supplement.images.to(x.dtype)
        x = torch.cat([x, space.to_model(images) if space is not None else images])
        y = torch.cat([y, supplement.labels.to(y.dtype)])
        w = torch.cat([w, torch.full((len(supplement.labels),), float(weight))])
    tensors = (x, y) if float(weight) == 1.0 else (x, y, w)
    return DataLoader(TensorDataset(*tensors), batch_size=batch_size, shuffle=True,
                      generator=torch.Generator().manual_seed(seed))


class SupplementDelivery:
    """Hands a client its supplement: replaces the client's entry in `loaders`, the dict FedML's trainers
    read (sp: FedAvgAPI.train_data_local_dict, fedavg_api.py:90-95; MPI and gRPC: the client party's
    train_data_local_dict), with a loader over its real data plus the supplement. Every backend delivers
    through this one class, so a client trains on the same batches wherever it runs.

    The real tensors are read once, when it is made (tensors_of leaves each loader's shuffle stream as
    it was)."""

    def __init__(self, loaders: dict, weight: float, batch_size: int, seed: int, space=None):
        self.loaders, self.weight, self.batch_size, self.seed = loaders, float(weight), batch_size, seed
        self.space = space
        self.real = {cid: tensors_of(loader) for cid, loader in loaders.items()}
        self.holding: dict[int, object] = {}  # client id -> the supplement it trains with

    def __call__(self, cid: int, supplement) -> None:
        cid = int(cid)
        self.holding[cid] = supplement
        self.loaders[cid] = with_supplement(self.real[cid], supplement, self.weight, self.batch_size,
                                            seed=self.seed * 1000 + cid, space=self.space)
