"""Classifiers: a small CNN for 8x8 digits, and FedML's own models for FedML's datasets.

MODELS is plain data (config.py checks a config's model against it); `create_model` builds one.
"""
from __future__ import annotations

# model name -> datasets it works with. FedML's names follow fedml/model/model_hub.py:23-60.
MODELS = {
    "cnn_digits": ("digits",),
    "lr": ("mnist", "cifar10"),
    "cnn": ("mnist", "femnist"),
    "resnet56": ("cifar10",),
}


def create_model(args, output_dim: int):
    if args.model == "cnn_digits":
        from .cnn_digits import CNNDigits

        return CNNDigits(num_classes=output_dim)
    import fedml

    return fedml.model.create(args, output_dim)


__all__ = ["MODELS", "create_model"]
