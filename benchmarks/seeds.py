"""Run one config over several seeds (optionally with `--set section.key=value` overrides) and print
final top-1 / balanced accuracy as mean ± std, plus wall, client and server seconds.

    python -m benchmarks.seeds --cf configs/digits_feddpd.yaml --seeds 0 1 2 --set feddpd.dpo=false
"""
import argparse
import json
import sys
import warnings

import numpy as np
import yaml

warnings.filterwarnings("ignore")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--cf", required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--set", action="append", default=[], help="section.key=value (YAML value)")
    parser.add_argument("--out", default="runs/seeds")
    parser.add_argument("--metric", default="top1", help="final metric to summarise (e.g. val_top1)")
    opts = parser.parse_args()
    from fedml_feddpd.config import validate
    from fedml_feddpd.runner import run

    raw = yaml.safe_load(open(opts.cf))
    for item in opts.set:
        key, value = item.split("=", 1)
        section, name = key.split(".")
        raw.setdefault(section, {})[name] = yaml.safe_load(value)
    raw.setdefault("run_args", {})["baseline"] = "none"
    tag = "_".join([opts.cf.split("/")[-1].rsplit(".", 1)[0]] + [s.replace("=", "-").replace(".", "-") for s in opts.set])
    rows = []
    for seed in opts.seeds:
        raw["common_args"]["random_seed"] = seed
        res = run(validate(raw, opts.cf), f"{opts.out}/{tag}_seed{seed}", show_progress=False)
        rows.append(res)
        f = res["final"]
        print(f"seed {seed}: top1 {f['top1']:.4f} bal {f['balanced_accuracy']:.4f} "
              f"{opts.metric} {f.get(opts.metric, float('nan')):.4f} wall {res['wall_seconds']:.0f}s "
              f"clients {res['client_seconds_total']:.0f}s server {res['server_seconds_total']:.0f}s", flush=True)
    summary = {}
    for key in ("top1", "balanced_accuracy", opts.metric):
        vals = np.array([r["final"].get(key, np.nan) for r in rows])
        summary[key] = (float(vals.mean()), float(vals.std()))
    summary["wall_seconds"] = float(np.mean([r["wall_seconds"] for r in rows]))
    summary["server_seconds"] = float(np.mean([r["server_seconds_total"] for r in rows]))
    summary["client_seconds"] = float(np.mean([r["client_seconds_total"] for r in rows]))
    print(tag, json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
