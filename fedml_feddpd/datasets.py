"""The datasets a run can name, as plain data: image shape, classes, pixel normalisation, writers.

Every dataset reaches a run the same way (fedml_feddpd/data): one labelled pool of images in the
generator's space, float32 (N, C, H, W) in [0, 1], then one split and one partition. Models see the
images through `data.spaces.ModelSpace` (the dataset's normalisation, the model's input layout).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple


@dataclass(frozen=True)
class DatasetInfo:
    shape: Tuple[int, int, int]                 # (C, H, W) of one image
    classes: int
    source: str                                 # where the files come from (for messages and docs)
    mean: Optional[Tuple[float, ...]] = None    # per-channel normalisation models see (None: [0, 1] as is)
    std: Optional[Tuple[float, ...]] = None
    writers: bool = False                       # has a natural per-writer partition (partition_method: natural)
    fedml_loader: bool = False                  # read through FedML's own `fedml.data.load`


DATASETS = {
    "digits": DatasetInfo((1, 8, 8), 10, "scikit-learn's load_digits (embedded)"),
    "fashion_mnist": DatasetInfo((1, 28, 28), 10, "Fashion-MNIST IDX files (apt-get install dataset-fashion-mnist)"),
    "mnist": DatasetInfo((1, 28, 28), 10, "FedML's LEAF MNIST (MNIST.zip, MNIST/train|test/*.json)",
                         writers=True, fedml_loader=True),
    "femnist": DatasetInfo((1, 28, 28), 62, "FedML's Federated EMNIST (fed_emnist_train.h5, fed_emnist_test.h5)",
                           writers=True, fedml_loader=True),
    # FedML's CIFAR-10 normalisation (fedml/data/cifar10/data_loader.py:81-82)
    "cifar10": DatasetInfo((3, 32, 32), 10, "CIFAR-10 python batches (cifar-10-batches-py/)",
                           mean=(0.49139968, 0.48215827, 0.44653124), std=(0.24703233, 0.24348505, 0.26158768),
                           fedml_loader=True),
}
FEDML_DATASETS = tuple(name for name, info in DATASETS.items() if info.fedml_loader)


def check_data_args(data: dict, model: str) -> None:
    """The cross-key checks of data_args and the model (config.py calls them)."""
    from .errors import ConfigError
    from .models import MODELS

    name = data["dataset"]
    if data["partition_method"] == "natural" and not DATASETS[name].writers:
        raise ConfigError(f"data_args.partition_method: natural needs a dataset with writers "
                          f"({', '.join(n for n, i in DATASETS.items() if i.writers)}); '{name}' has none, "
                          "use hetero or homo")
    if data["partition_method"] == "natural" and data["max_per_class"]:
        raise ConfigError("data_args.max_per_class: expected 0 with partition_method natural (writers keep all "
                          f"their samples), got {data['max_per_class']}")
    if model not in MODELS:
        raise ConfigError(f"model_args.model: expected one of {', '.join(MODELS)}, got {model!r}")
    if name not in MODELS[model]:
        raise ConfigError(f"model_args.model: '{model}' does not fit dataset '{name}'; expected a model "
                          f"for it: {', '.join(m for m, d in MODELS.items() if name in d)}")
