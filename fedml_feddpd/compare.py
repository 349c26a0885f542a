"""`compare`: methods x settings x seeds from one YAML, resumable, into a table, curves and JSON.

    base: configs/digits_feddpd.yaml        # every run starts from this FedML YAML
    output_dir: runs/compare_digits
    seeds: [0, 1, 2, 3, 4]                  # the default when absent
    common: {data_args: {oracle_fraction: 0.1}}            # applied to every run
    settings: {IF=10: {data_args: {imbalance_factor: 10}}}  # name -> overrides
    methods: {FedAvg: {train_args: {federated_optimizer: FedAvg}}, ...}

A run whose metrics.json exists is skipped, and an interrupted run continues from its last
checkpoint, so a killed suite resumes where it stopped.

The statistics (mean ± sample std, 95% t intervals, paired differences to FedAvg and FedDPD with
t-test and Wilcoxon p, head/medium/tail thirds) are computed by the pure functions in `stats.py`;
this module collects the runs' metrics.json files into results.json and formats report.md from it.
"""
from __future__ import annotations

import copy
import os
import sys
import time
from pathlib import Path

import yaml

from .compare_results import _run_dir, rebuild_report, write_results  # noqa: F401 (rebuild_report: the CLI)
from . import methods
from .config import RunConfig, load_config, validate
from .errors import ConfigError

SUITE_KEYS = {"base", "output_dir", "seeds", "common", "settings", "methods"}
DEFAULT_SEEDS = [0, 1, 2, 3, 4]
# (key in results.json, column label): every metric of the report, one value per seed
def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for section, body in (over or {}).items():
        if isinstance(body, dict) and isinstance(out.get(section), dict):
            out[section].update(copy.deepcopy(body))
        else:
            out[section] = copy.deepcopy(body)
    return out

def _select(table: dict, wanted: list[str] | None, flag: str) -> dict:
    """The entries of the suite's `settings` or `methods` named by --settings / --methods (all when None)."""
    if not wanted:
        return table
    unknown = [w for w in wanted if w not in table]
    if unknown:
        raise ConfigError(f"{flag} {unknown[0]}: not in the suite; expected one of {', '.join(table)}")
    return {k: v for k, v in table.items() if k in wanted}


def load_suite(path: str, settings_wanted: list[str] | None = None,
               methods_wanted: list[str] | None = None) -> tuple[dict, dict[tuple[str, str, int], RunConfig]]:
    """The suite and every run's validated config, checked before anything runs. `settings_wanted` /
    `methods_wanted` keep part of the suite (compare --settings / --methods)."""
    if not os.path.isfile(path):
        raise ConfigError(f"--cf {path}: file not found; expected a compare suite such as configs/compare_digits.yaml")
    with open(path) as fh:
        suite = yaml.safe_load(fh)
    if not isinstance(suite, dict):
        raise ConfigError(f"{path}: expected a mapping with keys {', '.join(sorted(SUITE_KEYS))}")
    unknown = set(suite) - SUITE_KEYS
    if unknown:
        raise ConfigError(f"{sorted(unknown)[0]}: unknown compare key; allowed: {', '.join(sorted(SUITE_KEYS))}")
    for key in ("base", "methods"):
        if key not in suite:
            raise ConfigError(f"{key}: missing in compare suite {path}")
    seeds = suite.get("seeds", list(DEFAULT_SEEDS))
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and s >= 0 for s in seeds):
        raise ConfigError(f"seeds: expected a non-empty list of integers >= 0, got {seeds!r}")
    # `base` is relative to the working directory or to the suite file's folder.
    candidates = [suite["base"], os.path.join(os.path.dirname(path), suite["base"])]
    base_path = next((c for c in candidates if os.path.isfile(c)), None)
    if base_path is None:
        raise ConfigError(f"base: {suite['base']} not found (relative to the working directory or {path}); "
                          "expected a FedML YAML such as configs/digits_feddpd.yaml")
    base = load_config(base_path).sections
    settings = _select(suite.get("settings") or {"default": {}}, settings_wanted, "--settings")
    suite["methods"] = _select(suite["methods"], methods_wanted, "--methods")
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
              collect_only: bool = False, settings: list[str] | None = None,
              methods_wanted: list[str] | None = None) -> Path:
    """Run every unfinished run of the suite, `workers` at a time (each in its own spawned process,
    so with 2 cores two 1-thread runs use the machine better than one), then write the report.
    `collect_only`: start nothing, report the runs that have finished (partial cells say so)."""
    from tqdm.auto import tqdm

    from .checkpoint import read_finished

    suite, runs = load_suite(path, settings, methods_wanted)
    if workers < 1:
        raise ConfigError(f"--workers: expected an integer >= 1, got {workers}")
    out = Path(out_dir or suite.get("output_dir") or "runs/compare")
    # a finished run is skipped; one made by another config (a changed default) stops the suite here
    todo = {k: cfg for k, cfg in runs.items() if read_finished(_run_dir(out, *k), cfg) is None}
    todo = longest_first(todo)
    if collect_only:
        todo = {}
        out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
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
        from .processes import die_with_parent

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
    if todo:  # the suite's own wall time, so that a sizing target ("the whole suite in 3 h") is measured by the tool
        print(f"compare: ran {len(todo)} run(s) in {_hms(time.perf_counter() - start)} with {workers} worker(s); "
              f"{len(runs) - len(todo)} had finished before", file=sys.stderr)
    write_results(out, suite)
    return out


def _hms(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    return f"{m // 60} h {m % 60:02d} min {s:02d} s" if m >= 60 else f"{m} min {s:02d} s"


def longest_first(runs: dict) -> dict:
    """The runs in order of expected wall time, longest first (stable otherwise), so that with --workers the
    suite does not end on one lone long run."""
    return dict(sorted(runs.items(), key=lambda item: -_expected_cost(item[1])))


def _expected_cost(cfg: RunConfig) -> int:
    """Rank of a run's expected wall time: Balance and Balance@B (a generator draw per client) first, then FedDPD
    with DPO (adapter training and sampling), then every other method."""
    method, feddpd = methods.of(cfg.sections["train_args"]), cfg.sections["feddpd"]
    if method.policy and method.policy.endswith(("BalancePolicy", "BalanceBudgetPolicy")):
        return 2
    dpo = feddpd["dpo"] and feddpd["dpo_rounds"] > 0 and feddpd["selection"] != "random"
    return 1 if method.policy and method.policy.endswith("FedDPDPolicy") and dpo else 0


def _run_one(cfg: RunConfig, out_dir: str) -> None:
    from .fedml_compat import quiet_fedml_imports
    from .runner import run

    quiet_fedml_imports()
    # an unfinished run of a method that writes no checkpoints (methods.Method.resumable) starts over
    run(cfg, out_dir, show_progress=False, resume=methods.of(cfg.sections["train_args"]).can_resume(cfg.sections))

