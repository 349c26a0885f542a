"""Fashion-MNIST for a machine without it, small enough to carry: the images a `max_per_class` config uses, the rest
blanked.

    python -m benchmarks.device_data .device/data/fashion-mnist-1000 [--max-per-class 1000] [--public-seed 0]

A run with `data_args.max_per_class` uses, of each class, the images `data.partition.class_subsample` draws by
`public_seed`, and that draw depends only on the labels. This writes Debian's IDX files (or those in
--source) with every label and every used image kept and every other image set to zero: gzip shrinks the blanks
to almost nothing (about 5 MB in all), and a run that points `data_args.data_cache_dir` at the folder gets the
same public split, splits and generator cache key as with the full files, bit for bit. For any other
`max_per_class` or `public_seed` the files are wrong: make them for those values.
"""
from __future__ import annotations

import argparse
import gzip
import os

import numpy as np

from fedml_feddpd.data.partition import class_subsample
from fedml_feddpd.data.sources import FASHION_FILES, _idx_file, fashion_mnist_folder, read_idx


def _write_idx(path: str, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb", compresslevel=9) as f:
        f.write(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes())


def blanked(source: str, max_per_class: int, public_seed: int) -> dict[str, np.ndarray]:
    """The four IDX arrays of `source` with every image outside the max_per_class draw set to zero."""
    folder = fashion_mnist_folder(source)
    arrays = {stem: read_idx(_idx_file(folder, stem)) for stem in FASHION_FILES}
    labels = np.concatenate([arrays["train-labels-idx1-ubyte"], arrays["t10k-labels-idx1-ubyte"]]).astype(np.int64)
    kept, _ = class_subsample(labels, int(labels.max()) + 1, public_seed, max_per_class)
    used = np.zeros(len(labels), bool)
    used[np.concatenate(kept)] = True
    n_train = len(arrays["train-labels-idx1-ubyte"])
    for stem, mask in (("train-images-idx3-ubyte", used[:n_train]), ("t10k-images-idx3-ubyte", used[n_train:])):
        images = arrays[stem].copy()
        images[~mask] = 0
        arrays[stem] = images
    return arrays


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--source", default="/usr/share/datasets/fashion-mnist")
    parser.add_argument("--max-per-class", type=int, default=1000)
    parser.add_argument("--public-seed", type=int, default=0)
    opts = parser.parse_args(argv)
    os.makedirs(opts.out, exist_ok=True)
    for stem, array in blanked(opts.source, opts.max_per_class, opts.public_seed).items():
        _write_idx(os.path.join(opts.out, stem + ".gz"), array)
    size = sum(os.path.getsize(os.path.join(opts.out, f)) for f in os.listdir(opts.out))
    print(f"{opts.out}: {size / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
