"""results.json of a compare suite: every finished run's metrics.json, per seed, summarised with stats.py,
and the paired comparisons with FedAvg and FedDPD; `report DIR` rebuilds report.md from it."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from . import stats
from .compare_report import LAST_K, METRICS, REFERENCES, _slug, write_report
from .errors import ConfigError

RESULTS_FORMAT = 2  # results.json with per-seed values of every metric, summaries and paired comparisons


def _run_dir(out: Path, setting: str, method: str, seed: int) -> Path:
    return out / "runs" / _slug(setting) / _slug(method) / f"seed{seed}"


def write_results(out: Path, suite: dict) -> dict:
    """Collect the finished runs of `suite` under `out` into results.json and write the report."""
    results = collect(out, suite)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    write_report(out, results)
    return results


def collect(out: Path, suite: dict) -> dict:
    """Every finished run's figures, seed by seed, with their summaries and paired comparisons.

    Per setting and method: `seeds` (those finished; fewer than the suite's when partial), and for each
    key of METRICS `{"values": one per seed, **stats.summary(values)}`; `per_seed` times and supplement
    sizes; `curves` (top-1 per round per seed, None where a round was not evaluated) with their mean and
    95% t band; `class_groups` (per seed: head, medium, tail class indices) and `class_counts_source`
    (per seed: "train" or "test", see stats.global_class_counts); `paired` (see _summarise)."""
    results = {"format": RESULTS_FORMAT, "seeds": suite["seeds"], "metrics": dict(METRICS), "settings": {},
               "references": {}}
    for s_name in suite["settings"]:
        per_method = results["settings"][s_name] = {}
        for m_name in suite["methods"]:
            done = [s for s in suite["seeds"] if (_run_dir(out, s_name, m_name, s) / "metrics.json").is_file()]
            runs = [json.loads((_run_dir(out, s_name, m_name, s) / "metrics.json").read_text()) for s in done]
            per_method[m_name] = _entry(done, runs)
        results["references"][s_name] = _summarise(per_method)
    return results


def _entry(seeds: list[int], runs: list[dict]) -> dict:
    """One method in one setting: the per-seed numbers of its finished runs (summaries come later)."""
    if not runs:
        return {"seeds": [], "privacy": None, "method": None}
    values = {key: [] for key, _ in METRICS}
    entry = {"seeds": seeds, "privacy": runs[0].get("privacy"), "method": runs[0]["method"],
             "class_counts_source": [], "class_groups": [], "curves": [],
             "per_seed": {k: [] for k in ("wall_seconds", "client_seconds_total", "server_seconds_total",
                                           "supplement_per_client")}}
    all_sizes = []
    for r in runs:
        rounds, final = r.get("rounds") or [], r.get("final") or {}
        values["top1"].append(final.get("top1"))
        values["balanced_accuracy"].append(final.get("balanced_accuracy"))
        values["top1_last10"].append(stats.last_k_mean(rounds, "top1", LAST_K))
        values["balanced_accuracy_last10"].append(stats.last_k_mean(rounds, "balanced_accuracy", LAST_K))
        counts, source = stats.global_class_counts(r.get("data") or {})
        groups = stats.class_thirds(counts) if counts else None
        entry["class_counts_source"].append(source)
        entry["class_groups"].append(groups)
        thirds = stats.group_accuracy(final.get("per_class_accuracy") or [], groups) if groups else [None] * 3
        for key, acc in zip(("head", "medium", "tail"), thirds):
            values[key].append(acc)
        entry["curves"].append([rec.get("top1") for rec in rounds])
        for key in ("wall_seconds", "client_seconds_total", "server_seconds_total"):
            entry["per_seed"][key].append(r.get(key))
        sizes = [sup["size"] for rec in rounds
                 for sup in ((rec.get("server_step") or {}).get("supplements") or {}).values()]
        all_sizes += sizes
        entry["per_seed"]["supplement_per_client"].append(float(np.mean(sizes)) if sizes else 0.0)
    for key, _ in METRICS:  # nan (e.g. balanced accuracy of an empty test set) is stored as None: valid JSON
        entry[key] = {"values": [None if v is None or v != v else float(v) for v in values[key]]}
    for key in ("wall_seconds", "client_seconds_total", "server_seconds_total"):  # the cost table's means
        entry[key] = stats.summary(entry["per_seed"][key])["mean"]
    # samples a client received per supplement round, pooled over the seeds' supplement rounds
    entry["supplement_per_client"] = float(np.mean(all_sizes)) if all_sizes else 0.0
    return entry


def _references(per_method: dict) -> dict:
    """Per role in REFERENCES, the method every other one is compared with: the suite method of that
    exact name, else the first whose runs used that federated_optimizer, else None (skipped)."""
    refs = {}
    for role in REFERENCES:
        refs[role] = role if role in per_method else next(
            (m for m, e in per_method.items() if e.get("method") == role), None)
    return refs


def _summarise(per_method: dict) -> dict:
    """Add each metric's summary, the curve band and the paired comparisons to every run method;
    return the references used. entry["paired"][role] = {"reference", "seeds" (those both have),
    "metrics": {key: stats.paired(method, reference)}}: differences are method - reference."""
    refs = _references(per_method)
    for entry in per_method.values():
        if not entry["seeds"]:
            continue
        for key, _ in METRICS:
            entry[key].update(stats.summary(entry[key]["values"]))
        if entry.get("curves") is not None:
            band = stats.curve_band(entry["curves"])
            entry["curve_mean"], entry["curve_ci95_low"], entry["curve_ci95_high"] = \
                band["mean"], band["ci95_low"], band["ci95_high"]
    for m_name, entry in per_method.items():
        if not entry["seeds"]:
            continue
        entry["paired"] = {}
        for role, ref in refs.items():
            if ref is None or ref == m_name:
                continue
            other = per_method[ref]
            common = [s for s in entry["seeds"] if s in other["seeds"]]
            comp = entry["paired"][role] = {"reference": ref, "seeds": common, "metrics": {}}
            for key, _ in METRICS:
                a = [entry[key]["values"][entry["seeds"].index(s)] for s in common]
                b = [other[key]["values"][other["seeds"].index(s)] for s in common]
                comp["metrics"][key] = stats.paired(a, b)
    return refs


def rebuild_report(out_dir: str) -> Path:
    """report.md and the curves again from `out_dir`/results.json (a results.json of another format: one line, rebuild
    it from the run folders with `compare --collect-only`)."""
    out = Path(out_dir)
    path = out / "results.json"
    if not path.is_file():
        raise FileNotFoundError(f"report: {path} not found; expected the folder of a finished compare run")
    try:
        results = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"report: {path}: not JSON ({exc}); expected the results.json a compare run wrote") from None
    if not isinstance(results, dict) or results.get("format") != RESULTS_FORMAT:
        found = results.get("format") if isinstance(results, dict) else None
        raise ConfigError(f"report: {path} is of format {found}, expected {RESULTS_FORMAT}: rebuild it where its runs "
                          "are with `compare --cf SUITE --collect-only`")
    write_report(out, results)
    return out
