"""Classifiers: small CNNs of ours, and FedML's own models where they fit.

MODELS and LAYOUTS are plain data (config.py checks a config's model against them); `create_model` builds
one. FedML's names follow fedml/model/model_hub.py:23-60.
"""
from __future__ import annotations

# model name -> datasets it works with
MODELS = {
    "cnn_digits": ("digits",),
    # ours for 28x28 and 32x32: FedML's `cnn` (CNN_DropOut, 1.2 M parameters, 62 outputs whatever the
    # classes, model_hub.py:34-39) costs ~10x the compute, too much for a 2-core compare suite
    "cnn_small": ("fashion_mnist", "mnist", "femnist", "cifar10"),
    "lr": ("mnist", "cifar10"),
    "cnn": ("mnist", "femnist", "fashion_mnist"),
    "resnet56": ("cifar10",),
}
# the input layout each model takes (data/spaces.py)
LAYOUTS = {"cnn_digits": "nchw", "cnn_small": "nchw", "lr": "flat", "cnn": "nhw", "resnet56": "nchw"}
PLUGIN_MODELS = ("cnn_digits", "cnn_small")  # built here; the rest by fedml.model.create


def create_model(args, output_dim: int, shape=None):
    """The model `args.model` for `output_dim` classes; our CNNs take the image shape (C, H, W)."""
    if args.model == "cnn_digits":
        from .cnn_digits import CNNDigits

        return CNNDigits(num_classes=output_dim)
    if args.model == "cnn_small":
        from .cnn_small import CNNSmall

        if shape is None:
            raise ValueError("create_model: cnn_small needs the image shape (C, H, W)")
        return CNNSmall(shape, num_classes=output_dim)
    import fedml

    create = getattr(fedml.model.create, "__wrapped__", fedml.model.create)  # FedML's own, not the plugin's hook
    if args.model == "cnn" and args.dataset == "fashion_mnist":
        # model_hub.py:34-39 builds CNN_DropOut only for mnist/femnist; the same network fits any 1x28x28 data
        from fedml.model.cv.cnn import CNN_DropOut

        return CNN_DropOut(only_digits=output_dim == 10)
    return create(args, output_dim)


__all__ = ["LAYOUTS", "MODELS", "PLUGIN_MODELS", "create_model"]
