"""`python -m fedml_feddpd run --cf CONFIG.yaml [--out DIR]` (also installed as `feddpd`)."""
from __future__ import annotations

import argparse
import os
import sys

from .config import load_config
from .errors import ConfigError, PartyError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="feddpd", description="FedDPD and baselines on FedML, offline.")
    verbs = parser.add_subparsers(dest="verb", required=True)
    run = verbs.add_parser("run", help="run one YAML configuration")
    run.add_argument("--cf", "--yaml_config_file", dest="cf", required=True, help="FedML-style YAML config")
    run.add_argument("--out", default=None, help="output folder (default: <output_dir>/<config>_seed<seed>)")
    run.add_argument("--seed", type=int, default=None, help="override common_args.random_seed")
    run.add_argument("--no-progress", action="store_true", help="hide the tqdm bar")
    run.add_argument("--resume", action="store_true",
                     help="continue the unfinished run in the output folder from its last checkpoint")
    compare = verbs.add_parser("compare", help="run a suite of methods x settings x seeds (resumable)")
    compare.add_argument("--cf", required=True, help="compare suite YAML (see configs/compare_digits.yaml)")
    compare.add_argument("--out", default=None, help="output folder (default: the suite's output_dir)")
    compare.add_argument("--workers", type=int, default=1,
                         help="runs at once, each in its own process (default 1; 2 suits a 2-core machine)")
    compare.add_argument("--collect-only", action="store_true",
                         help="start no run: write the report from the runs that have finished")
    compare.add_argument("--settings", default=None,
                         help="comma-separated setting names: run and report only these (default: all)")
    compare.add_argument("--methods", default=None,
                         help="comma-separated method names of the suite: run and report only these (default: all)")
    compare.add_argument("--no-progress", action="store_true")
    pretrain = verbs.add_parser("pretrain", help="the config's generator: shipped, cached, or pretrained now and cached")
    pretrain.add_argument("--cf", required=True, help="FedML-style YAML config of a method that uses the generator")
    pretrain.add_argument("--no-progress", action="store_true")
    report = verbs.add_parser("report", help="rebuild report.md and curves from a compare folder's results.json")
    report.add_argument("dir")
    _add_silo_verbs(verbs)
    return parser


def _add_silo_verbs(verbs) -> None:
    silo = verbs.add_parser("silo", help="one party of a gRPC cross-silo run (comm_args.backend: GRPC)")
    silo.add_argument("--role", choices=("server", "client"), required=True)
    silo.add_argument("--rank", type=int, required=True, help="0 for the server, 1..client_num_per_round for clients")
    silo.add_argument("--cf", required=True, help="FedML-style YAML config (training_type: cross_silo)")
    silo.add_argument("--ipconfig", default=None, help="ip config CSV (overrides comm_args.grpc_ipconfig_path)")
    silo.add_argument("--out", default=None, help="server: output folder (default: <output_dir>/<config>_seed<seed>)")
    silo.add_argument("--no-progress", action="store_true")
    silo.add_argument("--resume", action="store_true",
                      help="server: continue the unfinished run in the output folder from its last checkpoint "
                           "(clients need no flag: it is accepted and ignored)")
    local = verbs.add_parser("silo-local", help="a gRPC cross-silo run: server and clients as processes on 127.0.0.1")
    local.add_argument("--cf", required=True)
    local.add_argument("--out", default=None)
    local.add_argument("--no-progress", action="store_true")
    local.add_argument("--resume", action="store_true",
                       help="continue the unfinished run in the output folder from its last checkpoint")
    certs = verbs.add_parser("certs", help="a CA and one TLS certificate + key per gRPC party (comm_args.tls)")
    certs.add_argument("--out", help="folder to write ca.pem, ca.key, rank<r>.pem, rank<r>.key into")
    certs.add_argument("--parties", help="number of parties: the server (rank 0) + client_num_per_round clients")
    certs.add_argument("--days", default="365", help="validity in days (default 365)")


def main(argv=None) -> int:
    from .fedml_compat import quiet_fedml_imports

    quiet_fedml_imports()
    args = _parser().parse_args(argv)
    if args.verb == "certs":
        return _certs(args)
    if args.verb in ("silo", "silo-local"):
        return _silo(args)
    if args.verb == "pretrain":
        return _pretrain(args)
    if args.verb != "run":
        return _compare_or_report(args)
    try:
        cfg = load_config(args.cf)
        if args.seed is not None:
            cfg.sections["common_args"]["random_seed"] = args.seed
            cfg = type(cfg)(cfg.sections, cfg.source)
        from .runner import run

        result = run(cfg, args.out, show_progress=not args.no_progress, resume=args.resume)
    except (ConfigError, FileNotFoundError) as exc:
        print(f"feddpd: error: {exc}", file=sys.stderr)
        return 2
    except PartyError as exc:  # a distributed run (fedml_feddpd/distributed/) stopped
        print(f"feddpd: error: {exc}", file=sys.stderr)
        return 1
    if result is None:  # an MPI client rank: the server rank reports
        return 0
    for res in filter(None, (result, result.get("baseline"))):
        final = res["final"]
        print(f"{res['method']} on {res['dataset']} (seed {res['seed']}): final top-1 {final['top1']:.4f}, "
              f"balanced accuracy {final['balanced_accuracy']:.4f}, {res['wall_seconds']:.1f} s "
              f"(clients {res['client_seconds_total']:.1f} s, server {res['server_seconds_total']:.1f} s)")
    print(f"results -> {result['out_dir']}")
    return 0


def _pretrain(args) -> int:
    """The generator a run of the config uses, made ready before any run: prints where it came from."""
    try:
        cfg = load_config(args.cf)
        from .experiment import open_party, server_device
        from .generation import GeneratorConfig, load_or_pretrain_generator
        from .threads import torch_threads

        party = open_party(cfg)
        with torch_threads(cfg["generator_threads"] or os.cpu_count() or 1):
            gen = load_or_pretrain_generator(GeneratorConfig(**cfg.sections["generator"]), *party.data.public,
                                             seed=int(cfg["public_seed"]), progress=not args.no_progress,
                                             device=server_device(cfg["server_device"], party.device))
    except (ConfigError, FileNotFoundError) as exc:
        print(f"feddpd: error: {exc}", file=sys.stderr)
        return 2
    print(f"generator: {gen.source} ({gen.seconds:.1f} s) at {gen.path}")
    return 0


def _silo(args) -> int:
    """`silo` (one party) and `silo-local` (all parties here); see fedml_feddpd/distributed/silo.py."""
    code, result = 0, None
    try:
        cfg = load_config(args.cf)
        if cfg["backend"] != "GRPC":
            raise ConfigError(f"comm_args.backend: {args.verb} runs backend GRPC (training_type: cross_silo), "
                              f"got {cfg['backend']!r}")
        if args.verb == "silo":  # before FedML's 10 s import
            from .distributed.ipconfig import check_party

            check_party(args.role, args.rank, cfg["client_num_per_round"])
        if args.verb == "silo":
            from .distributed.silo import run_silo_party

            result = run_silo_party(cfg, args.role, args.rank, args.out, args.ipconfig, not args.no_progress,
                                    resume=args.resume)
        else:
            from .distributed.silo_local import run_silo_local

            result = run_silo_local(cfg, args.out, not args.no_progress, resume=args.resume)
    except (ConfigError, FileNotFoundError) as exc:
        print(f"feddpd: error: {exc}", file=sys.stderr)
        code = 2
    except (PartyError, KeyboardInterrupt) as exc:
        print(f"feddpd: error: {exc or 'interrupted'}", file=sys.stderr)
        code = 1
    if result:
        final = result["final"]
        print(f"{result['method']} on {result['dataset']} (seed {result['seed']}, backend GRPC): final top-1 "
              f"{final['top1']:.4f}, balanced accuracy {final['balanced_accuracy']:.4f}, "
              f"{result['wall_seconds']:.1f} s")
        print(f"results -> {result['out_dir']}")
    if args.verb == "silo":
        # gRPC's threads can keep a party alive after its run ends or fails (docs/DESIGN.md, "gRPC"): leave now.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def _certs(args) -> int:
    """`certs --out DIR --parties N`: see fedml_feddpd/distributed/tls.py."""
    def positive(flag, value, most):
        if value is None:
            raise ConfigError(f"{flag}: missing; usage: feddpd certs --out DIR --parties N")
        if not value.isdigit() or not 1 <= int(value) <= most:
            raise ConfigError(f"{flag}: expected an integer in 1..{most}, got {value!r}")
        return int(value)

    try:
        parties = positive("--parties", args.parties, 100_000)
        days = positive("--days", args.days, 36_500)
        if not args.out:
            raise ConfigError("--out: missing; usage: feddpd certs --out DIR --parties N")
        if os.path.exists(args.out) and not os.path.isdir(args.out):
            raise ConfigError(f"--out {args.out}: exists and is not a folder")
        taken = [n for n in ("ca.pem", "ca.key", "rank0.pem") if os.path.exists(os.path.join(args.out, n))]
        if taken:
            raise ConfigError(f"--out {args.out}: already holds {taken[0]}; choose an empty folder (certificates "
                              f"from another CA would not trust each other)")
        from .distributed.tls import make_certs

        make_certs(args.out, parties, days)
    except ConfigError as exc:
        print(f"feddpd: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"feddpd: error: --out {args.out}: {exc.strerror}", file=sys.stderr)
        return 2
    out = os.path.abspath(args.out)
    print(f"CA and {parties} certificates (CN=feddpd-rank-0..{parties - 1}) -> {out}")
    print(f"party r: comm_args.tls: {{ca_cert: {out}/ca.pem, cert: {out}/rank<r>.pem, key: {out}/rank<r>.key}}; "
          f"keep ca.key off the parties")
    return 0


def _compare_or_report(args) -> int:
    from .compare import rebuild_report, run_suite

    try:
        if args.verb == "compare":
            split = (lambda v: [x.strip() for x in v.split(",") if x.strip()] if v else None)
            out = run_suite(args.cf, args.out, not args.no_progress, args.workers, args.collect_only,
                            split(args.settings), split(args.methods))
        else:
            out = rebuild_report(args.dir)
    except (ConfigError, FileNotFoundError) as exc:
        print(f"feddpd: error: {exc}", file=sys.stderr)
        return 2
    print((out / "report.md").read_text())
    print(f"report -> {out / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
