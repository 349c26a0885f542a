"""scikit-learn's real 8x8 handwritten digits (1,797 images, shipped inside scikit-learn)."""
from __future__ import annotations

import numpy as np
import torch


def load_digits_tensors() -> tuple[torch.Tensor, torch.Tensor]:
    """Images as float32 (N, 1, 8, 8) in [0, 1] and int64 labels (N,)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.from_numpy((digits.images / 16.0).astype(np.float32)).unsqueeze(1)
    return images, torch.from_numpy(digits.target.astype(np.int64))
