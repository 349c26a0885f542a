"""The rule of configs/validate_sampler_digits.yaml: a faster sampler for the pool and the supplements (issue #14).

    python benchmarks/sampler_rule.py screen [--threads 2]          # stage 1: the judge, every candidate spec
    python benchmarks/sampler_rule.py screen --specs "dpm 10" "dpm 15"   # the judge on some specs only
    python benchmarks/sampler_rule.py decide runs/validate_sampler_digits --spec "ddim 10"   # stage 2
    python benchmarks/sampler_rule.py decide runs/validate_sampler_digits --spec "ddim 10" --steps 5   # stage 3

`screen` samples the default generator (as the runs load it from the cache) with every spec and prints the judge's
agreement and diversity against ddim 25, paired per sampling seed, the seconds each spec took, and which spec the
rule sends to stage 2. `decide` reads the finished validation suite (validation accuracy only) and prints the
decision, then, not part of it, the test figures and FedDPD - dpo:false where those runs exist.
"""
import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dpo_targets import ROOT, _line, _no_loss, _pp, _suite, judge_seeds, judge_setup, load  # noqa: E402

DEFAULT = "ddim 25"
CANDIDATES = ("ddim 15", "ddim 10", "dpm 15", "dpm 10")
MIN_AGREEMENT_DIFF = -0.005
MIN_DIVERSITY_RATIO = 0.8
SEEDS = tuple(range(1, 9))
SUITE = "validate_sampler_digits"


def _spec(spec: str) -> tuple:
    sampler, steps = spec.split()
    return sampler, int(steps)


def judge_specs(specs) -> dict:
    """{spec: judge_seeds' {"agreement", "diversity", "seconds"}} on the default generator."""
    from fedml_feddpd.generation import GeneratorConfig, load_or_pretrain_generator

    svc, images, labels, public = judge_setup()
    cfg = GeneratorConfig()
    gen = load_or_pretrain_generator(cfg, images[public], labels[public], seed=0, progress=False)
    print(f"generator: {cfg.pretrain_steps} x {cfg.pretrain_batch_size} steps, from {gen.source}")
    return {spec: judge_seeds(gen, svc, cfg, _spec(spec)[1], _spec(spec)[0], SEEDS) for spec in specs}


def cmd_screen(opts) -> None:
    torch.set_num_threads(opts.threads)
    print(f"before: {load()}; {opts.threads} torch threads")
    j = judge_specs((DEFAULT,) + tuple(opts.specs or CANDIDATES))
    base = j[DEFAULT]
    passing = []
    for spec, v in j.items():
        line = (f"{spec}: agreement {np.mean(v['agreement']):.4f}, diversity {np.mean(v['diversity']):.3f}, "
                f"{np.mean(v['seconds']):.2f} s per 500 images")
        if spec != DEFAULT:
            diff = np.array(v["agreement"]) - np.array(base["agreement"])
            ratio = float(np.mean(np.array(v["diversity"]) / np.array(base["diversity"])))
            ok = diff.mean() >= MIN_AGREEMENT_DIFF and ratio >= MIN_DIVERSITY_RATIO
            if ok:
                passing.append((_spec(spec)[1], -float(np.mean(v["agreement"])), spec))
            line += (f"; - {DEFAULT}: agreement {diff.mean():+.4f} (per seed {', '.join(f'{d:+.3f}' for d in diff)}), "
                     f"diversity ratio {ratio:.3f}; passes: {ok}")
        print(line, flush=True)
    print(f"rule: {min(passing)[2]} goes to stage 2" if passing else f"rule: none passes; {DEFAULT} stays")
    print(f"after: {load()}")


def cmd_decide(opts) -> None:
    """Stage 2 (--spec against ddim 25) or, with --steps, stage 3 (those DPO steps against 10, both at --spec)."""
    base = Path(opts.dir) / "runs" / "IF=10"
    if opts.steps:
        default, cand = f"FedDPD ({opts.spec})", f"FedDPD ({opts.spec}; dpo steps {opts.steps})"
        names = {default: default, cand: cand}
    else:
        default, cand = DEFAULT, opts.spec
        names = {DEFAULT: f"FedDPD ({DEFAULT})", opts.spec: f"FedDPD ({opts.spec})"}
    r = _suite(base, names, list(range(8)), SUITE)
    p = _pp(r[cand]["val"], r[default]["val"])
    better, no_loss = p["ci95_low"] > 0, _no_loss(p)
    print("validation top-1 (last 10 rounds), 8 seeds: " +
          ", ".join(f"{k} {100 * np.mean(r[k]['val']):.2f}" for k in names))
    print(f"{cand} - {default}: {_line(p)}; better: {better}; no loss: {no_loss}")
    print(f"rule: {cand} becomes the default" if better or no_loss else f"rule: {default} stays the default")
    print(f"looked at after the decision, test top-1 (final): {cand} - {default} "
          f"{_line(_pp(r[cand]['test'], r[default]['test']))}; server seconds "
          + ", ".join(f"{k} {np.mean(r[k]['server']):.1f}" for k in names) + " (mean of 8, 2 runs at a time)")
    from fedml_feddpd.compare_report import _slug

    nodpo = f"FedDPD (dpo: false; {opts.spec})"
    if not opts.steps and (base / _slug(nodpo) / "seed7" / "metrics.json").is_file():
        n = _suite(base, {"n": nodpo}, list(range(8)), SUITE)["n"]
        k = opts.spec
        print(f"FedDPD ({k}) - dpo:false ({k}), test top-1 (final): {_line(_pp(r[k]['test'], n['test']))}; "
              f"validation {_line(_pp(r[k]['val'], n['val']))}; server seconds {np.mean(r[k]['server']):.1f} vs "
              f"{np.mean(n['server']):.1f} = {np.mean(r[k]['server']) / np.mean(n['server']):.2f}x")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("screen")
    s.add_argument("--threads", type=int, default=2)
    s.add_argument("--specs", nargs="+", default=None, help='judge only these, e.g. "dpm 10" (default: the rule\'s)')
    d = sub.add_parser("decide")
    d.add_argument("dir", nargs="?", default=str(ROOT / "runs" / "validate_sampler_digits"))
    d.add_argument("--spec", required=True, choices=CANDIDATES, help="the spec stage 1 sent to stage 2")
    d.add_argument("--steps", type=int, default=None, help="stage 3: this many DPO steps against 10 at --spec")
    opts = parser.parse_args()
    {"screen": cmd_screen, "decide": cmd_decide}[opts.cmd](opts)


if __name__ == "__main__":
    main()
