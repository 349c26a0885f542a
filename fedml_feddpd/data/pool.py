"""One labelled image pool in generator space, and the copy of FedML's args its loader may rewrite."""
from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch


@dataclass
class ImagePool:
    images: torch.Tensor                 # float32 (N, C, H, W) in [0, 1]
    labels: torch.Tensor                 # int64 (N,)
    writers: Optional[np.ndarray] = None  # per-sample writer id (datasets with a natural partition)


@contextlib.contextmanager
def fedml_args(args, **overrides):
    """A copy of args for FedML's loader, which rewrites client_num_in_total (data_loader.py:285,300)."""
    local = copy.copy(args)
    for key, value in overrides.items():
        setattr(local, key, value)
    yield local
