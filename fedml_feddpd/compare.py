"""`compare`: methods x settings x seeds from one YAML, resumable, into a table, curves and JSON.

    base: configs/digits_feddpd.yaml        # every run starts from this FedML YAML
    output_dir: runs/compare_digits
    seeds: [0, 1, 2]
    common: {data_args: {oracle_fraction: 0.1}}            # applied to every run
    settings: {IF=10: {data_args: {imbalance_factor: 10}}}  # name -> overrides
    methods: {FedAvg: {train_args: {federated_optimizer: FedAvg}}, ...}

A run whose metrics.json exists is skipped, and an interrupted run continues from its last
checkpoint, so a killed suite resumes where it stopped.
"""
from __future__ import annotations

import copy
import json
import os
import re
from pathlib import Path

import numpy as np
import yaml

from .config import ConfigError, RunConfig, load_config, validate

SUITE_KEYS = {"base", "output_dir", "seeds", "common", "settings", "methods"}


def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for section, body in (over or {}).items():
        if isinstance(body, dict) and isinstance(out.get(section), dict):
            out[section].update(copy.deepcopy(body))
        else:
            out[section] = copy.deepcopy(body)
    return out


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", name).strip("_")


def load_suite(path: str) -> tuple[dict, dict[tuple[str, str, int], RunConfig]]:
    """The suite and every run's validated config, checked before anything runs."""
    if not os.path.isfile(path):
        raise ConfigError(f"--cf {path}: file not found; expected a compare suite such as configs/compare_digits.yaml")
    suite = yaml.safe_load(open(path))
    if not isinstance(suite, dict):
        raise ConfigError(f"{path}: expected a mapping with keys {', '.join(sorted(SUITE_KEYS))}")
    unknown = set(suite) - SUITE_KEYS
    if unknown:
        raise ConfigError(f"{sorted(unknown)[0]}: unknown compare key; allowed: {', '.join(sorted(SUITE_KEYS))}")
    for key in ("base", "methods"):
        if key not in suite:
            raise ConfigError(f"{key}: missing in compare suite {path}")
    seeds = suite.get("seeds", [0])
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and s >= 0 for s in seeds):
        raise ConfigError(f"seeds: expected a non-empty list of integers >= 0, got {seeds!r}")
    # `base` is relative to the working directory or to the suite file's folder.
    candidates = [suite["base"], os.path.join(os.path.dirname(path), suite["base"])]
    base_path = next((c for c in candidates if os.path.isfile(c)), None)
    if base_path is None:
        raise ConfigError(f"base: {suite['base']} not found (relative to the working directory or {path}); "
                          "expected a FedML YAML such as configs/digits_feddpd.yaml")
    base = load_config(base_path).sections
    settings = suite.get("settings") or {"default": {}}
    runs = {}
    for s_name, s_over in settings.items():
        for m_name, m_over in suite["methods"].items():
            raw = _merge(_merge(_merge(base, suite.get("common")), s_over), m_over)
            raw.setdefault("run_args", {})["baseline"] = "none"
            for seed in seeds:
                raw["common_args"]["random_seed"] = seed
                try:
                    runs[(s_name, m_name, seed)] = validate(copy.deepcopy(raw), base_path)
                except ConfigError as exc:
                    raise ConfigError(f"methods.{m_name} / settings.{s_name}: {exc}") from None
    suite["seeds"], suite["settings"] = seeds, settings
    return suite, runs


def run_suite(path: str, out_dir: str | None = None, show_progress: bool = True, workers: int = 1,
              collect_only: bool = False) -> Path:
    """Run every unfinished run of the suite, `workers` at a time (each in its own spawned process,
    so with 2 cores two 1-thread runs use the machine better than one), then write the report.
    `collect_only`: start nothing, report the runs that have finished (partial cells say so)."""
    from tqdm.auto import tqdm

    from .checkpoint import read_finished

    suite, runs = load_suite(path)
    if workers < 1:
        raise ConfigError(f"--workers: expected an integer >= 1, got {workers}")
    out = Path(out_dir or suite.get("output_dir") or "runs/compare")
    # a finished run is skipped; one made by another config (a changed default) stops the suite here
    todo = {k: cfg for k, cfg in runs.items() if read_finished(_run_dir(out, *k), cfg) is None}
    # longest first, so that with --workers the suite does not end on one lone DPO run
    todo = dict(sorted(todo.items(), key=lambda item: -_expected_cost(item[1])))
    if collect_only:
        todo = {}
        out.mkdir(parents=True, exist_ok=True)
    bar = tqdm(total=len(runs), initial=len(runs) - len(todo), desc="compare", unit="run", disable=not show_progress)
    if workers == 1:
        for (s_name, m_name, seed), cfg in todo.items():
            bar.set_postfix_str(f"{s_name} {m_name} seed {seed}")
            _run_one(cfg, str(_run_dir(out, s_name, m_name, seed)))
            bar.update(1)
    else:
        import multiprocessing
        from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

        ctx = multiprocessing.get_context("spawn")  # a fresh interpreter: no torch/fork state shared
        from .distributed.common import die_with_parent

        # workers end with the suite (a killed suite otherwise leaves them writing its run folders)
        with ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=die_with_parent) as pool:
            pending = {pool.submit(_run_one, cfg, str(_run_dir(out, *key))): key for key, cfg in todo.items()}
            while pending:
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for fut in done:
                    s_name, m_name, seed = pending.pop(fut)
                    fut.result()  # a failed run stops the suite with its own error
                    bar.set_postfix_str(f"done {s_name} {m_name} seed {seed}")
                    bar.update(1)
    bar.close()
    results = collect(out, suite)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    write_report(out, results)
    return out


def _expected_cost(cfg: RunConfig) -> int:
    """Rank of a run's expected server time (docs/results/compare_digits, IF 10: FedDPD with DPO ~970 s,
    Balance ~510 s, every other method under 80 s)."""
    method, feddpd = cfg.sections["train_args"]["federated_optimizer"], cfg.sections["feddpd"]
    if method == "FedDPD" and feddpd["dpo"] and feddpd["selection"] == "discrepancy":
        return 2
    return 1 if method == "Balance" else 0


def _run_one(cfg: RunConfig, out_dir: str) -> None:
    from .runner import run

    run(cfg, out_dir, show_progress=False, resume=True)


def _run_dir(out: Path, setting: str, method: str, seed: int) -> Path:
    return out / "runs" / _slug(setting) / _slug(method) / f"seed{seed}"


def collect(out: Path, suite: dict) -> dict:
    """Every finished run's figures; a method x setting with fewer seeds lists the ones it has."""
    results = {"seeds": suite["seeds"], "settings": {}}
    for s_name in suite["settings"]:
        per_method = results["settings"][s_name] = {}
        for m_name in suite["methods"]:
            done = [s for s in suite["seeds"] if (_run_dir(out, s_name, m_name, s) / "metrics.json").is_file()]
            runs = [json.loads((_run_dir(out, s_name, m_name, s) / "metrics.json").read_text()) for s in done]
            if not runs:
                per_method[m_name] = {"seeds": [], "privacy": None, "method": None}
                continue
            entry = per_method[m_name] = {"seeds": done, "privacy": runs[0].get("privacy"),
                                          "method": runs[0]["method"]}
            for key in ("top1", "balanced_accuracy"):
                vals = np.array([r["final"][key] for r in runs])
                entry[key] = {"values": vals.tolist(), "mean": float(vals.mean()), "std": float(vals.std())}
            for key in ("wall_seconds", "client_seconds_total", "server_seconds_total"):
                entry[key] = float(np.mean([r[key] for r in runs]))
            sizes = [sup["size"] for r in runs for rec in r["rounds"]
                     for sup in ((rec.get("server_step") or {}).get("supplements") or {}).values()]
            entry["supplement_per_client"] = float(np.mean(sizes)) if sizes else 0.0  # per supplement round
            curves = np.array([[rec.get("top1", np.nan) for rec in r["rounds"]] for r in runs])
            entry["curve_mean"] = np.nanmean(curves, 0).tolist()
            entry["curve_std"] = np.nanstd(curves, 0).tolist()
    return results


def _crosses_boundary(entry: dict) -> bool:
    """runner.privacy_note says "within FedAvg's boundary" for methods that stay inside it."""
    return "within" not in (entry["privacy"] or "within")


def write_report(out: Path, results: dict) -> None:
    """report.md (best non-oracle mean per column in bold) and curves_<setting>.png from results."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = list(results["settings"])
    methods = list(next(iter(results["settings"].values())))
    lines = [f"# Compare: {len(methods)} methods x {len(settings)} settings x {len(results['seeds'])} seeds",
             "", "Final global-model accuracy on the (imbalanced) test set, mean ± std over seeds "
             f"{results['seeds']}. **Bold**: best per column among deployable methods (Oracle excluded).", ""]
    header = "| method | " + " | ".join(f"{s} top-1 | {s} balanced" for s in settings) + " | supplement / client | wall s | client s | server s |"
    lines += [header, "|" + "---|" * (2 * len(settings) + 5)]
    best = {}
    for s in settings:
        for key in ("top1", "balanced_accuracy"):
            cands = [m for m in methods if results["settings"][s][m]["seeds"]
                     and results["settings"][s][m]["method"] != "Oracle"]
            best[(s, key)] = max(cands, key=lambda m: results["settings"][s][m][key]["mean"]) if cands else None
    partial = False
    for m in methods:
        cells = []
        for s in settings:
            e_m = results["settings"][s][m]
            for key in ("top1", "balanced_accuracy"):
                if not e_m["seeds"]:
                    cells.append("not run")
                    continue
                e = e_m[key]
                cell = f"{100 * e['mean']:.1f} ± {100 * e['std']:.1f}"
                if len(e_m["seeds"]) < len(results["seeds"]):
                    cell += f" (seeds {', '.join(map(str, e_m['seeds']))})"
                    partial = True
                cells.append(f"**{cell}**" if best[(s, key)] == m else cell)
        first = next((results["settings"][s][m] for s in settings if results["settings"][s][m]["seeds"]), None)
        note = " †" if first is not None and _crosses_boundary(first) else ""
        supplement = f"{first['supplement_per_client']:.0f}" if "supplement_per_client" in (first or {}) else "?"
        times = (f" {supplement} | {first['wall_seconds']:.0f} | "
                 f"{first['client_seconds_total']:.0f} | {first['server_seconds_total']:.0f} |") if first else " | | | |"
        lines.append(f"| {m}{note} | " + " | ".join(cells) + " |" + times)
    crossing = sorted({f"{m}: {e['privacy']}" for s in settings for m, e in results["settings"][s].items()
                       if e["seeds"] and _crosses_boundary(e)})
    lines += ["", "† crosses FedAvg's privacy boundary or is not deployable: " + "; ".join(crossing)]
    if partial:
        lines += ["", "Cells with a seed list are partial: the suite has not finished those runs."]
    lines += ["", "Supplement / client: samples a client received per supplement round (synthetic; Oracle: real), "
              "and times, mean seconds per run: both in the first setting the method has run in."]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    for s in settings:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for m in methods:
            if not results["settings"][s][m]["seeds"]:
                continue
            mean = np.array(results["settings"][s][m]["curve_mean"])
            std = np.array(results["settings"][s][m]["curve_std"])
            x = np.arange(len(mean))
            ax.plot(x, mean, label=m)
            ax.fill_between(x, mean - std, mean + std, alpha=0.15)
        ax.set(xlabel="round", ylabel="global top-1 (test)", title=f"{s}: accuracy per round (mean ± std)")
        ax.set_ylim(0, 1)
        if ax.lines:
            ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / f"curves_{_slug(s)}.png", dpi=110)
        plt.close(fig)


def rebuild_report(out_dir: str) -> Path:
    out = Path(out_dir)
    path = out / "results.json"
    if not path.is_file():
        raise FileNotFoundError(f"report: {path} not found; expected the folder of a finished compare run")
    write_report(out, json.loads(path.read_text()))
    return out
