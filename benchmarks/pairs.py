"""Paired differences between any two methods of a finished compare suite, per setting (compare's report pairs every
method with FedAvg and FedDPD only).

    python -m benchmarks.pairs runs/compare_fmnist "FedDPD + FedOpt" FedOpt [--metric top1]

Per setting: a - b in points, mean with its 95% t CI over the seeds both have, and the paired t and Wilcoxon p.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from fedml_feddpd.stats import paired

from .common import fmt_diff


def pairs(results: dict, a: str, b: str, metric: str) -> dict:
    out = {}
    for setting, methods in results["settings"].items():
        if any(m not in methods or metric not in methods[m] for m in (a, b)):  # not in the suite, or no run yet
            continue
        va, vb = (dict(zip(methods[m]["seeds"], methods[m][metric]["values"])) for m in (a, b))
        seeds = sorted(set(va) & set(vb))
        out[setting] = paired([100 * va[s] for s in seeds], [100 * vb[s] for s in seeds])
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dir")
    parser.add_argument("a")
    parser.add_argument("b")
    parser.add_argument("--metric", default="top1")
    opts = parser.parse_args(argv)
    results = json.loads((Path(opts.dir) / "results.json").read_text())
    for setting, p in pairs(results, opts.a, opts.b, opts.metric).items():
        print(f"{setting}: {opts.a} - {opts.b} {opts.metric} {fmt_diff(p)} (n {p['n']}, t p {p['t_p']}, "
              f"Wilcoxon p {p['wilcoxon_p']})")


if __name__ == "__main__":
    main()
