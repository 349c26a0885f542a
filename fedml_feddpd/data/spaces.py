"""Between the generator's space and a model's input space, one named transform per dataset and model.

The generator, the public split, supplements and every tensor the data module holds live in generator
space: float32 (N, C, H, W) in [0, 1]. A model sees `ModelSpace.to_model(x)`: the dataset's per-channel
normalisation (CIFAR-10's mean/std, as FedML's loader applies it), then the model's input layout
("nchw"; "flat" for FedML's logistic regression; "nhw" for FedML's CNN_DropOut, which unsqueezes the
channel itself, fedml/model/cv/cnn.py:129). Client loaders, scoring, supplement delivery and the Oracle
all convert through it, so a supplement travels (and is checkpointed) in generator space.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch

LAYOUTS = ("nchw", "flat", "nhw")


@dataclass(frozen=True)
class ModelSpace:
    shape: Tuple[int, int, int]
    layout: str = "nchw"
    mean: Optional[Tuple[float, ...]] = None
    std: Optional[Tuple[float, ...]] = None

    def __post_init__(self):
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout: expected one of {', '.join(LAYOUTS)}, got {self.layout!r}")
        if self.layout == "nhw" and self.shape[0] != 1:
            raise ValueError(f"layout nhw needs one channel, got shape {self.shape}")

    @property
    def name(self) -> str:
        norm = "mean/std" if self.mean is not None else "[0,1]"
        return f"{'x'.join(map(str, self.shape))} {norm} {self.layout}"

    def _stats(self, x: torch.Tensor):
        view = (1, -1, 1, 1)
        return (torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(view),
                torch.tensor(self.std, dtype=x.dtype, device=x.device).view(view))

    def to_model(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) in [0, 1] -> what the model takes."""
        if tuple(x.shape[1:]) != tuple(self.shape):
            raise ValueError(f"expected images of shape (N, {', '.join(map(str, self.shape))}), got {tuple(x.shape)}")
        if self.mean is not None:
            mean, std = self._stats(x)
            x = (x - mean) / std
        if self.layout == "flat":
            return x.reshape(len(x), -1)
        if self.layout == "nhw":
            return x[:, 0]
        return x

    def to_generator(self, x: torch.Tensor) -> torch.Tensor:
        """The inverse of to_model."""
        x = x.reshape(len(x), *self.shape)
        if self.mean is not None:
            mean, std = self._stats(x)
            x = x * std + mean
        return x
