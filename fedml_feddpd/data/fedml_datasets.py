"""FedML's own datasets through FedML's own loader (`fedml.data.load`), as one pool in generator space.

The file check runs first, so a missing file fails here in one line instead of starting a download.
FedML's loader is asked for the global data only; its partition and its rewrite of client_num_in_total
(fedml/data/data_loader.py:285,300) stay on a copy of args, and data.partition splits the pool.
"""
from __future__ import annotations

import contextlib
import glob
import os

import numpy as np
import torch

from ..errors import ConfigError
from .pool import ImagePool, fedml_args

# Files each FedML loader reads under data_cache_dir (fedml/data/data_loader.py:262-300, 448).
EXPECTED_FILES = {
    # data/MNIST/data_loader.py:24-25 downloads whenever MNIST.zip is missing.
    "mnist": ["MNIST.zip", "MNIST/train/*.json", "MNIST/test/*.json"],
    "femnist": ["fed_emnist_train.h5", "fed_emnist_test.h5"],
    # torchvision's CIFAR10(download=True) layout (torchvision/datasets/cifar.py: train_list, test_list, meta).
    "cifar10": [f"cifar-10-batches-py/{f}" for f in ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4",
                                                     "data_batch_5", "test_batch", "batches.meta")],
}


def check_files(dataset: str, cache_dir: str) -> None:
    cache_dir = os.path.expanduser(cache_dir)
    missing = [p for p in EXPECTED_FILES[dataset] if not glob.glob(os.path.join(cache_dir, p))]
    if missing:
        raise ConfigError(
            f"data_args.data_cache_dir: dataset '{dataset}' needs {', '.join(missing)} under {cache_dir} "
            "(this run is offline and will not download them)")


def fedml_load(args):
    """FedML's own `fedml.data.load` (not the plugin's hook), after the file check."""
    import fedml

    check_files(args.dataset, args.data_cache_dir)
    load = getattr(fedml.data.load, "__wrapped__", fedml.data.load)
    with fedml_args(args, data_cache_dir=os.path.expanduser(args.data_cache_dir)) as local, _cifar_files_trusted():
        if args.dataset == "cifar10":  # the global sets only: FedML's hetero loop needs >= 10 per client (:142)
            local.partition_method, local.client_num_in_total = "homo", 1
        return load(local)


@contextlib.contextmanager
def _cifar_files_trusted():
    """FedML builds torchvision's CIFAR10 with download=True (fedml/data/cifar10/datasets.py:47), which
    downloads when a file's MD5 differs from the official one (torchvision/datasets/cifar.py, check_integrity).
    Offline, the files present are used as they are (check_files has made sure they exist)."""
    from torchvision.datasets import cifar

    original = cifar.check_integrity
    cifar.check_integrity = lambda path, md5=None: os.path.isfile(path)
    try:
        yield
    finally:
        cifar.check_integrity = original


def _batches(batches) -> tuple[torch.Tensor, torch.Tensor]:
    """All (x, y) of a FedML client entry: a list of batches (LEAF MNIST) or a DataLoader, whose dataset is
    read directly (FedEMNIST's train loaders drop the last batch, FederatedEMNIST/data_loader.py:60)."""
    dataset = getattr(batches, "dataset", None)
    if dataset is not None and hasattr(dataset, "tensors"):
        x, y = dataset.tensors[:2]
    else:
        pairs = list(batches or [])
        if not pairs:
            return torch.zeros(0), torch.zeros(0, dtype=torch.int64)
        x, y = torch.cat([torch.as_tensor(b[0]) for b in pairs]), torch.cat([torch.as_tensor(b[1]) for b in pairs])
    return x.to(torch.float32), y.to(torch.int64).reshape(-1)


def _to_unit(x: torch.Tensor, shape) -> torch.Tensor:
    x = x.reshape(len(x), *shape)
    return x / 255.0 if len(x) and float(x.max()) > 1.0 else x


def load_fedml_pool(args) -> ImagePool:
    from ..datasets import DATASETS

    shape = DATASETS[args.dataset].shape
    dataset, _ = fedml_load(args)
    if args.dataset == "cifar10":  # FedML's datasets keep the raw uint8 HWC arrays (cifar10/without_reload.py:87)
        sets = [d.dataset for d in (dataset[2], dataset[3])]
        xs = [torch.from_numpy(np.asarray(d.data)) for d in sets]
        ys = [torch.as_tensor(np.asarray(getattr(d, "targets", getattr(d, "target", None))), dtype=torch.int64)
              for d in sets]
        x = torch.cat(xs).permute(0, 3, 1, 2).to(torch.float32) / 255.0
        return ImagePool(x, torch.cat(ys))
    # mnist and femnist: every writer's train and test samples, with the writer's id
    images, labels, writers = [], [], []
    train_local, test_local = dataset[5], dataset[6]
    for cid in sorted(train_local):
        for part in (train_local[cid], test_local.get(cid)):
            x, y = _batches(part)
            if len(y):
                images.append(_to_unit(x, shape))
                labels.append(y)
                writers.append(np.full(len(y), cid))
    if not labels:
        raise ConfigError(f"data_args.data_cache_dir: FedML's '{args.dataset}' loader found no samples")
    return ImagePool(torch.cat(images), torch.cat(labels), np.concatenate(writers))
