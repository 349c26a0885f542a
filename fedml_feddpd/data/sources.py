"""Each dataset as one labelled pool in generator space: float32 (N, C, H, W) in [0, 1], int64 labels.

A dataset's own train and test files are pooled; data.partition cuts the pool into the server's public
split, the long-tailed train and test sets and the hold-outs the same way for every dataset. Nothing
downloads: a missing file is a one-line error naming what is expected.
"""
from __future__ import annotations

import gzip
import os
from typing import Optional

import numpy as np
import torch

from ..datasets import DATASETS
from ..errors import ConfigError
from .pool import ImagePool

DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"
FASHION_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                 "t10k-labels-idx1-ubyte")


def load_pool(args) -> ImagePool:
    name = args.dataset
    if name == "digits":
        from .digits import load_digits_tensors

        pool = ImagePool(*load_digits_tensors())
    elif name == "fashion_mnist":
        pool = load_fashion_mnist(args.data_cache_dir)
    else:
        from .fedml_datasets import load_fedml_pool

        pool = load_fedml_pool(args)
    shape = DATASETS[name].shape
    if tuple(pool.images.shape[1:]) != shape:
        raise ConfigError(f"data_args.data_cache_dir: dataset '{name}' gave images of shape "
                          f"{tuple(pool.images.shape[1:])}, expected {shape}")
    return pool


def _idx_file(folder: str, stem: str) -> Optional[str]:
    for name in (stem, stem + ".gz"):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            return path
    return None


def fashion_mnist_folder(cache_dir: str) -> str:
    """data_cache_dir (or its fashion-mnist/ subfolder) when it holds the IDX files, else Debian's copy."""
    cache_dir = os.path.expanduser(cache_dir)
    for folder in (cache_dir, os.path.join(cache_dir, "fashion-mnist"), DEBIAN_FASHION_MNIST):
        if all(_idx_file(folder, stem) for stem in FASHION_FILES):
            return folder
    raise ConfigError(f"data_args.dataset: fashion_mnist needs {', '.join(f + '[.gz]' for f in FASHION_FILES)} in "
                      f"data_args.data_cache_dir ({cache_dir}) or {DEBIAN_FASHION_MNIST} "
                      "(sudo apt-get install dataset-fashion-mnist)")


def read_idx(path: str) -> np.ndarray:
    """An IDX file (raw or gzipped) as a numpy array: big-endian magic, dims, then unsigned bytes."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        raw = f.read()
    magic = int.from_bytes(raw[:4], "big")
    if magic >> 8 != 0x08:  # 0x08 = unsigned byte data
        raise ConfigError(f"data_args.data_cache_dir: {path} is not an unsigned-byte IDX file (magic {magic:#x})")
    ndim = magic & 0xFF
    dims = [int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise ConfigError(f"data_args.data_cache_dir: {path} holds {data.size} values, its header says {dims}")
    return data.reshape(dims)


def load_fashion_mnist(cache_dir: str) -> ImagePool:
    folder = fashion_mnist_folder(cache_dir)
    images, labels = [], []
    for part in ("train", "t10k"):
        x = read_idx(_idx_file(folder, f"{part}-images-idx3-ubyte"))
        y = read_idx(_idx_file(folder, f"{part}-labels-idx1-ubyte"))
        if len(x) != len(y):
            raise ConfigError(f"data_args.data_cache_dir: {folder}: {len(x)} {part} images but {len(y)} labels")
        images.append(x)
        labels.append(y)
    x = torch.from_numpy(np.concatenate(images)).unsqueeze(1).to(torch.float32) / 255.0
    return ImagePool(x, torch.from_numpy(np.concatenate(labels).astype(np.int64)))
