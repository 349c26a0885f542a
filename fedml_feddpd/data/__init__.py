"""Data for a run, every dataset through one split and partition, as FedML's 8-tuple plus the server's splits."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from .partition import (Splits, dirichlet_partition, homogeneous_partition, imbalanced_class_sizes,
                        class_subsample, label_histograms, natural_partition, split_by_writers,
                        split_public_train_test)
from .spaces import ModelSpace


@dataclass
class FederatedData:
    """What a run needs. `fedml_dataset` is the 8-tuple FedML's APIs take:
    [train_num, test_num, train_global, test_global, local_num_dict, local_train_dict,
    local_test_dict, class_num]."""

    fedml_dataset: list
    class_num: int
    test_batches: object                       # iterable of (x, y): the global (imbalanced) test set
    train_batches: object                      # all clients' training data pooled
    public: Optional[tuple[torch.Tensor, torch.Tensor]] = None   # server-only split
    validation_batches: object = None          # held-out pool samples for tuning (optional)
    oracle: Optional[tuple[torch.Tensor, torch.Tensor]] = None  # held-out real data for the Oracle baseline
    client_histograms: Optional[np.ndarray] = None               # for reports only
    # generator space <-> model input (data/spaces.py); public, oracle and supplements are in generator space
    space: Optional[ModelSpace] = None


def _loader(x: torch.Tensor, y: torch.Tensor, batch_size: int, shuffle: bool, seed: int) -> DataLoader:
    gen = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=shuffle, generator=gen)


def build_federated(args) -> FederatedData:
    """Every dataset the same way: its pool (data.sources), the balanced public split and the long-tailed
    train/test/hold-outs (public split drawn by data_args.public_seed, the rest by the run seed), then
    FedML's Dirichlet partitioner ('hetero'), an IID split ('homo') or the writers ('natural')."""
    from ..datasets import DATASETS
    from ..errors import ConfigError
    from ..models import LAYOUTS
    from .sources import load_pool

    info = DATASETS[args.dataset]
    pool = load_pool(args)
    images, labels, num_classes = pool.images, pool.labels, info.classes
    seed = int(args.random_seed)
    public_seed = getattr(args, "public_seed", None)
    space = ModelSpace(info.shape, LAYOUTS.get(args.model, "nchw"), info.mean, info.std)
    fractions = (args.public_fraction, args.test_fraction, args.imbalance_factor, seed,
                 args.validation_fraction, args.oracle_fraction)
    try:
        if args.partition_method == "natural":
            splits = split_by_writers(labels.numpy(), pool.writers, num_classes, *fractions, public_seed=public_seed)
        else:
            splits = split_public_train_test(labels.numpy(), num_classes, *fractions, public_seed=public_seed,
                                             max_per_class=getattr(args, "max_per_class", 0))
        train_labels = labels[splits.train].numpy()
        if args.partition_method == "natural":
            parts = natural_partition(pool.writers[splits.train], args.client_num_in_total,
                                      args.min_client_size, seed)
        elif args.partition_method == "hetero":
            parts = dirichlet_partition(train_labels, args.client_num_in_total, num_classes,
                                        args.partition_alpha, args.min_client_size, seed)
        else:
            parts = homogeneous_partition(len(train_labels), args.client_num_in_total, seed)
    except ValueError as exc:  # sizes that cannot be met: a config problem, reported in one line
        raise ConfigError(str(exc)) from None
    x_train, y_train = space.to_model(images[splits.train]), labels[splits.train]
    x_test, y_test = space.to_model(images[splits.test]), labels[splits.test]
    local_train, local_num = {}, {}
    for cid, idx in parts.items():
        idx_t = torch.from_numpy(idx)
        local_train[cid] = _loader(x_train[idx_t], y_train[idx_t], args.batch_size, True, seed * 1000 + cid)
        local_num[cid] = len(idx)
    train_global = _loader(x_train, y_train, 256, False, seed)
    test_global = _loader(x_test, y_test, 256, False, seed)
    dataset = [len(y_train), len(y_test), train_global, test_global, local_num, local_train,
               {cid: None for cid in parts}, num_classes]
    validation = None
    if len(splits.validation):
        validation = _loader(space.to_model(images[splits.validation]), labels[splits.validation], 256, False, seed)
    return FederatedData(dataset, num_classes, test_global, train_global,
                         public=(images[splits.public], labels[splits.public]), validation_batches=validation,
                         oracle=(images[splits.oracle], labels[splits.oracle]),
                         client_histograms=label_histograms(train_labels, parts, num_classes), space=space)


def load_federated_data(args) -> FederatedData:
    return build_federated(args)


def from_fedml(dataset, class_num: int) -> FederatedData:
    """A run's data from FedML's 8-tuple alone (FedML's own datasets: no public split, no hold-outs)."""
    return FederatedData(list(dataset), class_num, test_batches=dataset[3], train_batches=dataset[2])


__all__ = ["FederatedData", "ModelSpace", "Splits", "build_federated", "from_fedml", "load_federated_data", "dirichlet_partition",
           "homogeneous_partition", "imbalanced_class_sizes", "class_subsample", "label_histograms", "natural_partition", "split_by_writers", "split_public_train_test"]
