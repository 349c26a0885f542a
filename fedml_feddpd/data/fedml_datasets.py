"""FedML's own loaders, guarded so that a missing file fails here instead of starting a download."""
from __future__ import annotations

import glob
import os

# Files each FedML loader reads under data_cache_dir (fedml/data/data_loader.py:262-300, 448).
EXPECTED_FILES = {
    # data/MNIST/data_loader.py:24-25 downloads whenever MNIST.zip is missing.
    "mnist": ["MNIST.zip", "MNIST/train/*.json", "MNIST/test/*.json"],
    "femnist": ["fed_emnist_train.h5", "fed_emnist_test.h5"],
    # torchvision's CIFAR10(download=True) layout.
    "cifar10": ["cifar-10-batches-py/data_batch_1", "cifar-10-batches-py/test_batch"],
}


def check_files(dataset: str, cache_dir: str) -> None:
    cache_dir = os.path.expanduser(cache_dir)
    missing = [p for p in EXPECTED_FILES[dataset] if not glob.glob(os.path.join(cache_dir, p))]
    if missing:
        raise FileNotFoundError(
            f"data_args.data_cache_dir: dataset '{dataset}' needs {', '.join(missing)} under {cache_dir} "
            "(this run is offline and will not download them)")


def load_fedml_dataset(args):
    """FedML's 8-tuple from `fedml.data.load`, after the file check."""
    import fedml

    check_files(args.dataset, args.data_cache_dir)
    args.data_cache_dir = os.path.expanduser(args.data_cache_dir)
    dataset, class_num = fedml.data.load(args)
    return dataset, class_num
