"""`python -m fedml_feddpd run --cf CONFIG.yaml [--out DIR]` (also installed as `feddpd`)."""
from __future__ import annotations

import argparse
import sys

from .config import ConfigError, load_config


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="feddpd", description="FedDPD and baselines on FedML, offline.")
    verbs = parser.add_subparsers(dest="verb", required=True)
    run = verbs.add_parser("run", help="run one YAML configuration")
    run.add_argument("--cf", "--yaml_config_file", dest="cf", required=True, help="FedML-style YAML config")
    run.add_argument("--out", default=None, help="output folder (default: <output_dir>/<config>_seed<seed>)")
    run.add_argument("--seed", type=int, default=None, help="override common_args.random_seed")
    run.add_argument("--no-progress", action="store_true", help="hide the tqdm bar")
    compare = verbs.add_parser("compare", help="run a suite of methods x settings x seeds (resumable)")
    compare.add_argument("--cf", required=True, help="compare suite YAML (see configs/compare_digits.yaml)")
    compare.add_argument("--out", default=None, help="output folder (default: the suite's output_dir)")
    compare.add_argument("--workers", type=int, default=1,
                         help="runs at once, each in its own process (default 1; 2 suits a 2-core machine)")
    compare.add_argument("--no-progress", action="store_true")
    report = verbs.add_parser("report", help="rebuild report.md and curves from a compare folder's results.json")
    report.add_argument("dir")
    return parser


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    if args.verb != "run":
        return _compare_or_report(args)
    try:
        cfg = load_config(args.cf)
        if args.seed is not None:
            cfg.sections["common_args"]["random_seed"] = args.seed
            cfg = type(cfg)(cfg.sections, cfg.source)
        from .runner import run

        result = run(cfg, args.out, show_progress=not args.no_progress)
    except (ConfigError, FileNotFoundError) as exc:
        print(f"feddpd: error: {exc}", file=sys.stderr)
        return 2
    for res in filter(None, (result, result.get("baseline"))):
        final = res["final"]
        print(f"{res['method']} on {res['dataset']} (seed {res['seed']}): final top-1 {final['top1']:.4f}, "
              f"balanced accuracy {final['balanced_accuracy']:.4f}, {res['wall_seconds']:.1f} s "
              f"(clients {res['client_seconds_total']:.1f} s, server {res['server_seconds_total']:.1f} s)")
    print(f"results -> {result['out_dir']}")
    return 0


def _compare_or_report(args) -> int:
    from .compare import rebuild_report, run_suite

    try:
        out = run_suite(args.cf, args.out, not args.no_progress, args.workers) if args.verb == "compare" else rebuild_report(args.dir)
    except (ConfigError, FileNotFoundError) as exc:
        print(f"feddpd: error: {exc}", file=sys.stderr)
        return 2
    print((out / "report.md").read_text())
    print(f"report -> {out / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
