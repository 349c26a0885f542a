"""Classifiers: a small CNN for 8x8 digits, and FedML's own models for FedML's datasets."""
from __future__ import annotations

from .cnn_digits import CNNDigits

# model name -> datasets it works with. FedML's names follow fedml/model/model_hub.py:23-60.
MODELS = {
    "cnn_digits": ("digits",),
    "lr": ("mnist", "cifar10"),
    "cnn": ("mnist", "femnist"),
    "resnet56": ("cifar10",),
}


def check_model_name(model: str, dataset: str) -> None:
    from ..config import ConfigError

    if model not in MODELS:
        raise ConfigError(f"model_args.model: expected one of {', '.join(MODELS)}, got {model!r}")
    if dataset not in MODELS[model]:
        raise ConfigError(f"model_args.model: '{model}' does not fit dataset '{dataset}'; expected a model "
                          f"for it: {', '.join(m for m, d in MODELS.items() if dataset in d)}")


def create_model(args, output_dim: int):
    if args.model == "cnn_digits":
        return CNNDigits(num_classes=output_dim)
    import fedml

    return fedml.model.create(args, output_dim)


__all__ = ["CNNDigits", "MODELS", "check_model_name", "create_model"]
