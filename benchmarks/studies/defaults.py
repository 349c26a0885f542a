"""Applies a validation rule written as YAML (benchmarks/studies/feddpd_defaults.yaml) to finished compare suites.

    python -m benchmarks.studies.defaults benchmarks/studies/feddpd_defaults.yaml [--out docs/results/feddpd_defaults]

Every variant is compared with the reference on the paired (setting, seed) values of the rule's metric (the mean
of the last rounds of a validation metric); each factor is decided as its rule says. Prints the decisions and
writes decisions.json and decisions.md (per factor and per setting) into --out.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml

from fedml_feddpd.compare import load_suite
from fedml_feddpd.compare_results import _run_dir
from fedml_feddpd.stats import last_k_mean, paired

from ..common import fmt_diff, metrics_of


def values(suites: dict, method: str, metric: dict) -> dict:
    """{(suite, setting, seed): the metric of that run} for `method` in every suite (None where unfinished)."""
    out = {}
    for name, path in suites.items():
        suite, runs = load_suite(path)
        base = Path(suite["output_dir"])
        for setting, m, seed in runs:
            if m == method:
                result = metrics_of(_run_dir(base, setting, m, seed))
                out[(name, setting, seed)] = (None if result is None else
                                              last_k_mean(result["rounds"], metric["key"], metric["last"]))
    return out


def compare(suites: dict, variant: str, reference: str, metric: dict) -> dict:
    """The paired comparison of `variant` with `reference` over every (setting, seed), and per setting; in points."""
    a, b = values(suites, variant, metric), values(suites, reference, metric)
    keys = sorted(k for k in b if k in a)

    def pts(d, ks):
        return [None if d[k] is None else 100 * d[k] for k in ks]

    per_setting = {}
    for s in sorted({k[:2] for k in keys}):
        ks = [k for k in keys if k[:2] == s]
        per_setting["/".join(s)] = paired(pts(a, ks), pts(b, ks))
    missing = [k for k in keys if a[k] is None or b[k] is None]
    return {"all": paired(pts(a, keys), pts(b, keys)), "settings": per_setting, "missing": len(missing)}


def better(p: dict) -> bool:
    return p["ci95_low"] is not None and p["ci95_low"] > 0


def no_loss(p: dict, line: dict) -> bool:
    return p["mean_diff"] is not None and p["mean_diff"] >= line["mean"] and p["ci95_low"] is not None \
        and p["ci95_low"] >= line["lower"]


def decide_factor(spec: dict, rule: dict) -> dict:
    """The variant of a factor with the highest mean difference, adopted if it passes the factor's rule; when none
    is adopted and the factor has an `else`, that one is decided the same way."""
    results = {v: compare(rule["settings"], v, rule["reference"], rule["metric"]) for v in spec["variants"]}
    best = max(results, key=lambda v: results[v]["all"]["mean_diff"] if results[v]["all"]["mean_diff"]
               is not None else -1e9)
    p = results[best]["all"]
    passed = better(p) if spec["rule"] == "better" else no_loss(p, rule["no_loss"])
    complete = all(r["missing"] == 0 and r["all"]["n"] > 0 for r in results.values())
    out = {"rule": spec["rule"], "variants": results, "best": best, "adopt": bool(passed and complete),
           "complete": complete}
    if not out["adopt"] and "else" in spec:
        out["else"] = decide_factor(spec["else"], rule)
    return out


def decide(rule: dict) -> dict:
    return {factor: decide_factor(spec, rule) for factor, spec in rule["factors"].items()}


def adopted(d: dict):
    """The variant a factor's decision adopts, or None (the reference stays)."""
    if d["adopt"]:
        return d["best"]
    return adopted(d["else"]) if "else" in d else None


def _rows(factor: str, d: dict):
    yield factor, d
    if "else" in d:
        yield from _rows(factor, d["else"])


def report(decisions: dict, reference: str) -> str:
    lines = [f"| factor | variant | vs {reference}, all settings | per setting | rule | decision |", "|---|---|---|---|---|---|"]
    for factor, d in (row for f, top in decisions.items() for row in _rows(f, top)):
        for v, r in d["variants"].items():
            per = "; ".join(f"{s}: {fmt_diff(p)}" for s, p in r["settings"].items())
            decision = ("adopt" if d["adopt"] else "keep reference") if v == d["best"] else ""
            if not d["complete"] and v == d["best"]:
                decision = "incomplete"
            lines.append(f"| {factor} | {v} | {fmt_diff(r['all'])} (n {r['all']['n']}) | {per} | {d['rule']} | "
                         f"{decision} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("rule")
    parser.add_argument("--out", default=None, help="folder for decisions.json and decisions.md")
    opts = parser.parse_args(argv)
    rule = yaml.safe_load(open(opts.rule))
    decisions = decide(rule)
    table = report(decisions, rule["reference"])
    choice = {f: adopted(d) for f, d in decisions.items()}
    table += "\nAdopted: " + (", ".join(f"{f}: {v}" for f, v in choice.items() if v) or "none (the reference stays)") + "\n"
    print(table)
    if opts.out:
        out = Path(opts.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "decisions.json").write_text(json.dumps(decisions, indent=1))
        (out / "decisions.md").write_text(f"Rule: `{opts.rule}`\n\n{table}")


if __name__ == "__main__":
    main()
