import torch
from torch import nn


class CNNSmall(nn.Module):
    """Two 5x5 conv layers with pooling and a small head, for any (C, H, W) of at least 4x4 (about 0.1 M
    parameters at 1x28x28): FedAvg's MNIST CNN (McMahan et al. 2017) at half width, sized for 2 CPU cores."""

    def __init__(self, shape, num_classes: int = 10, width: int = 16):
        super().__init__()
        c, h, w = shape
        self.features = nn.Sequential(
            nn.Conv2d(c, width, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(2 * width * (h // 4) * (w // 4), 128), nn.ReLU(),
                                  nn.Linear(128, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))
