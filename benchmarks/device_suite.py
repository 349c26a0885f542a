"""A compare suite's twin for a GPU machine: the same settings, methods and seeds, with its output folder, the
Fashion-MNIST folder it carries (benchmarks/device_data.py) and the server step on the GPU.

    python -m benchmarks.device_suite SUITE.yaml --out DIR --data DIR [--server-device cuda] > twin.yaml

Its runs are other runs than the suite's own (data_cache_dir and server_device are part of a run's identity):
they are reported as run on the GPU machine, never mixed with CPU runs of the same suite.
"""
from __future__ import annotations

import argparse
import os
import sys

import yaml


def twin(suite_path: str, out: str, data: str, server_device: str) -> dict:
    with open(suite_path) as fh:
        suite = yaml.safe_load(fh)
    base = suite["base"]
    if not os.path.isfile(base):  # compare resolves `base` against the suite's folder too
        base = os.path.join(os.path.dirname(suite_path), base)
    common = suite.setdefault("common", {}) or {}
    common.setdefault("data_args", {})["data_cache_dir"] = data
    common.setdefault("run_args", {})["server_device"] = server_device
    suite.update(base=os.path.abspath(base), output_dir=out, common=common)
    return suite


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("suite")
    parser.add_argument("--out", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--server-device", default="cuda", choices=("cuda", "cpu", "auto"))
    opts = parser.parse_args(argv)
    yaml.safe_dump(twin(opts.suite, opts.out, opts.data, opts.server_device), sys.stdout, sort_keys=False)


if __name__ == "__main__":
    main()
