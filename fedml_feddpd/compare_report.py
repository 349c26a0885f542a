"""report.md and curves_<setting>.png from a compare suite's results.json (compare_results.py makes it).

Per setting: a table of every metric with mean ± sample std and 95% t CI, bold for the best method within
FedAvg's privacy boundary, the paired per-seed differences to FedAvg and FedDPD with their tests, and
curves with 95% CI bands. The arithmetic is in stats.py.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from . import stats

METRICS = [
    ("top1", "top-1 (LT test), final"),
    ("top1_last10", "top-1 (LT test), last 10"),
    ("balanced_accuracy", "balanced (class-balanced view), final"),
    ("balanced_accuracy_last10", "balanced (class-balanced view), last 10"),
    ("head", "head, final"),
    ("medium", "medium, final"),
    ("tail", "tail, final"),
]
REFERENCES = ("FedAvg", "FedDPD")  # every method is compared, seed by seed, with these two
LAST_K = 10

def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", name).strip("_")


def _crosses_boundary(entry: dict) -> bool:
    """runner.privacy_note says "within FedAvg's boundary" for methods that stay inside it."""
    return "within" not in (entry["privacy"] or "within")


def _deployable(entry: dict) -> bool:
    return bool(entry["seeds"]) and not _crosses_boundary(entry) and entry["method"] != "Oracle"


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}"


def _pp(x: float) -> str:
    """A difference in percentage points, signed; float noise around 0 reads +0.0, never -0.0."""
    x = 100 * x
    return f"{0.0 if abs(x) < 1e-9 else x:+.1f}"


def _p(x) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def _cell(entry: dict, key: str, n_suite: int) -> str:
    """mean ± sample std [95% t CI], in %; only the mean for one seed; n/a when not recorded."""
    if not entry["seeds"]:
        return "not run"
    e = entry[key]
    if e.get("mean") is None:
        cell = "n/a"
    elif e.get("std") is None:
        cell = f"{_pct(e['mean'])} (n=1)"
    else:
        cell = f"{_pct(e['mean'])} ± {_pct(e['std'])} [{_pct(e['ci95_low'])}, {_pct(e['ci95_high'])}]"
    return cell + _partial(entry, n_suite)


def _partial(entry: dict, n_suite: int) -> str:
    """' (seeds 0, 1)' for a cell whose runs have not all finished, else ''."""
    return f" (seeds {', '.join(map(str, entry['seeds']))})" if len(entry["seeds"]) < n_suite else ""


def _diff_cell(p: dict, common: list) -> str:
    if p["n"] == 0:
        return "n/a" if common else "no common seeds"  # n/a: the metric was not recorded
    verdict = "distinguishable" if p["distinguishable"] else "cannot tell apart"
    if p["ci95_low"] is None:
        return f"{_pp(p['mean_diff'])} (n={p['n']}): {verdict}"
    return (f"{_pp(p['mean_diff'])} [{_pp(p['ci95_low'])}, {_pp(p['ci95_high'])}], "
            f"p {_p(p['t_p'])} / {_p(p['wilcoxon_p'])}: {verdict}")


def write_report(out: Path, results: dict) -> None:
    """report.md and curves_<setting>.png from results (see collect): per setting a table of every
    metric (bold: the best mean per column within FedAvg's privacy boundary), the best deployable method
    in words, and the paired differences to FedAvg and FedDPD; then a cost table."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = list(results["settings"])
    methods = list(next(iter(results["settings"].values())))
    labels = dict(METRICS)
    n_suite = len(results["seeds"])
    lines = [f"# Compare: {len(methods)} methods x {len(settings)} settings x {n_suite} seeds", ""]
    lines += [
        f"Global-model accuracy in %, over seeds {results['seeds']}: mean ± sample std (ddof 1) "
        "[95% Student-t confidence interval of the mean]. **top-1 (LT test)**: accuracy on the test set as "
        "drawn, long-tailed like the training data; **balanced (class-balanced view)**: mean per-class "
        "recall, the accuracy the same model has when every class weighs the same. *final*: the last "
        f"evaluated round; *last {LAST_K}*: mean over the last {LAST_K} evaluated rounds. *head / medium / "
        "tail*: mean per-class accuracy (final round) over the thirds of the classes by global training "
        "frequency (classes sorted by descending count, ties by class index, cut with np.array_split: "
        "10 classes -> 4 / 3 / 3; counts from the clients' label histograms, else the test set's).",
        "",
        "**Bold**: the best mean per column among the methods within FedAvg's privacy boundary; methods "
        "marked † cross it (or are not deployable) and are never bold.", ""]
    if len(settings) > 1:
        lines += overview_tables(results, settings, methods)
    best = {}
    for s in settings:
        per = results["settings"][s]
        lines += [f"## {s}", ""] + summary_table(s, per, methods, results["references"].get(s, {})) + [
            "", "All metrics:", "", "| method | " + " | ".join(labels[k] for k, _ in METRICS) + " |",
                  "|" + "---|" * (len(METRICS) + 1)]
        for key, _ in METRICS:
            best[(s, key)] = _best(per, methods, key)
        for m in methods:
            cells = [_cell(per[m], key, n_suite) for key, _ in METRICS]
            cells = [f"**{c}**" if best[(s, key)] == m else c for c, (key, _) in zip(cells, METRICS)]
            note = " †" if per[m]["seeds"] and _crosses_boundary(per[m]) else ""
            lines.append(f"| {m}{note} | " + " | ".join(cells) + " |")
        lines += [""] + _best_sentences(s, per, methods, best, results["references"].get(s, {}), labels) + [""]
        lines += _paired_section(s, per, methods, results["references"].get(s, {}), labels)
    crossing = sorted({f"{m}: {e['privacy']}" for s in settings for m, e in results["settings"][s].items()
                       if e["seeds"] and _crosses_boundary(e)})
    lines += ["† crosses FedAvg's privacy boundary or is not deployable: " + "; ".join(crossing), ""]
    if any(0 < len(e["seeds"]) < n_suite for s in settings for e in results["settings"][s].values()):
        lines += ["Cells with a seed list are partial: the suite has not finished those runs.", ""]
    lines += ["## Cost", "", "| method | setting | supplement / client | wall s | client s | server s |",
              "|---|---|---|---|---|---|"]
    for m in methods:
        ran = [s for s in settings if results["settings"][s][m]["seeds"]]
        if not ran:
            lines.append(f"| {m} | | not run | | | |")
        for s in ran:  # every setting: costs differ between them (budgets follow the clients' data)
            e = results["settings"][s][m]
            sec = [("?" if e.get(k) is None else f"{e[k]:.0f}")
                   for k in ("supplement_per_client", "wall_seconds", "client_seconds_total", "server_seconds_total")]
            lines.append(f"| {m}{' †' if _crosses_boundary(e) else ''} | {s} | " + " | ".join(sec) + " |")
    lines += ["", "Supplement / client: samples a client received per supplement round (synthetic; Oracle: real), "
              "and times, mean seconds per run, per setting."]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    for s in settings:
        _plot_curves(plt, out, s, results["settings"][s], methods)


def _best(per: dict, methods: list, key: str):
    """The deployable method with the highest mean of `key`, or None when none has one."""
    cands = [m for m in methods if _deployable(per[m]) and per[m][key].get("mean") is not None]
    return max(cands, key=lambda m: per[m][key]["mean"]) if cands else None


def overview_tables(results: dict, settings: list, methods: list) -> list[str]:
    """Final top-1 and balanced accuracy of every method in every setting, one table each (the README's
    view of a multi-setting suite): mean ± sample std, then the paired difference to FedAvg (* when its
    95% CI excludes 0); bold: the best deployable method of the column."""
    lines = ["## Overview: every setting", ""]
    for key, title in (("top1", "top-1 (LT test), final"), ("balanced_accuracy", "balanced, final")):
        lines += [f"**{title}**", "", "| method | " + " | ".join(settings) + " |", "|" + "---|" * (len(settings) + 1)]
        best = {s: _best(results["settings"][s], methods, key) for s in settings}
        for m in methods:
            cells = []
            for s in settings:
                e = results["settings"][s][m]
                if not e["seeds"]:
                    cells.append("not run")
                    continue
                cell = _short(e[key])
                p = ((e.get("paired") or {}).get("FedAvg") or {}).get("metrics", {}).get(key)
                if p and p["n"] and results["references"].get(s, {}).get("FedAvg") != m:
                    cell += f" ({_pp(p['mean_diff'])}{'*' if p['distinguishable'] else ''})"
                cell += _partial(e, len(results["seeds"]))
                cells.append(f"**{cell}**" if best[s] == m else cell)
            crosses = any(results["settings"][s][m]["seeds"] and _crosses_boundary(results["settings"][s][m])
                          for s in settings)
            lines.append(f"| {m}{' †' if crosses else ''} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["Mean ± sample std over the seeds; in brackets the paired per-seed difference to FedAvg in points, "
              "* when its 95% t CI excludes 0 (the CIs are in each setting's tables below).", ""]
    return lines


def _best_sentences(s: str, per: dict, methods: list, best: dict, refs: dict, labels: dict) -> list[str]:
    """The best deployable method per headline column, in words, with how it compares with FedAvg."""
    out = []
    for key in ("top1", "balanced_accuracy"):
        m = best[(s, key)]
        if m is None:
            out.append(f"{s}, {labels[key]}: no deployable method has finished a run.")
            continue
        text = (f"Best deployable method (within FedAvg's privacy boundary) on {s}, {labels[key]}: "
                f"**{m}** ({_pct(per[m][key]['mean'])}%)")
        comp = (per[m].get("paired") or {}).get("FedAvg")
        if comp is not None:
            p = comp["metrics"][key]
            if p["n"] == 0:
                text += f"; it has no seed in common with {comp['reference']}"
            elif p["distinguishable"]:
                text += (f"; {_pp(p['mean_diff'])} points over {comp['reference']}, 95% CI "
                         f"[{_pp(p['ci95_low'])}, {_pp(p['ci95_high'])}]: distinguishable")
            else:
                text += (f"; {_pp(p['mean_diff'])} points over {comp['reference']}, but the data cannot "
                         f"tell it apart from {comp['reference']} (the 95% CI of the paired difference "
                         f"{'is undefined with one seed' if p['ci95_low'] is None else 'contains 0'})")
        higher = [x for x in methods if per[x]["seeds"] and _crosses_boundary(per[x])
                  and per[x][key].get("mean") is not None and per[x][key]["mean"] > per[m][key]["mean"]]
        if higher:
            text += f". Higher but crossing the boundary (†): {', '.join(higher)}"
        out.append(text + ".")
    return out


def summary_table(s: str, per: dict, methods: list, refs: dict) -> list[str]:
    """The headline table of a setting (the README shows it): final top-1, balanced and tail accuracy,
    and the paired top-1 difference to each reference with its 95% CI (* when the CI excludes 0)."""
    roles = [r for r in REFERENCES if refs.get(r)]
    head = ["method", "top-1 (LT test)", "balanced", "tail"] + [f"top-1 − {refs[r]}" for r in roles] + ["server s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in methods:
        e = per[m]
        if not e["seeds"]:
            continue
        cells = [_short(e[k]) for k in ("top1", "balanced_accuracy", "tail")]
        for role in roles:
            p = ((e.get("paired") or {}).get(role) or {}).get("metrics", {}).get("top1")
            if refs[role] == m or not p or p["n"] == 0:
                cells.append("—")
            elif p["ci95_low"] is None:
                cells.append(f"{_pp(p['mean_diff'])} (n={p['n']})")
            else:
                star = " *" if p["distinguishable"] else ""
                cells.append(f"{_pp(p['mean_diff'])} [{_pp(p['ci95_low'])}, {_pp(p['ci95_high'])}]{star}")
        cells.append("?" if e.get("server_seconds_total") is None else f"{e['server_seconds_total']:.0f}")
        lines.append(f"| {m}{' †' if _crosses_boundary(e) else ''} | " + " | ".join(cells) + " |")
    seeds = next((per[m]["seeds"] for m in methods if per[m]["seeds"]), None)
    if seeds is None:
        return lines + ["", f"{s}: no finished runs yet"]
    return lines + ["", f"{s}: mean ± sample std over seeds {', '.join(map(str, seeds))}"
                    "; differences are paired per seed, in points, with 95% t CIs; * marks a CI that excludes 0 "
                    "(the others the data cannot tell apart); † crosses FedAvg's privacy boundary."]


def _short(e: dict) -> str:
    if e.get("mean") is None:
        return "n/a"
    return _pct(e["mean"]) if e.get("std") is None else f"{_pct(e['mean'])} ± {_pct(e['std'])}"


def _paired_section(s: str, per: dict, methods: list, refs: dict, labels: dict) -> list[str]:
    lines = []
    for role in REFERENCES:
        ref = refs.get(role)
        if ref is None:
            continue
        rows = [m for m in methods if m != ref and role in (per[m].get("paired") or {})]
        if not rows:
            continue
        n = max(len(per[m]["paired"][role]["seeds"]) for m in rows)
        lines += [f"### {s}: paired difference to {ref} (method − {ref}, percentage points)", "",
                  f"Per seed, on the seeds both have: mean difference [95% t CI], p of the paired t-test / "
                  f"p of the Wilcoxon signed-rank test. *distinguishable*: the 95% CI excludes 0; "
                  f"*cannot tell apart*: it contains 0 (or, with one seed, does not exist), so these seeds "
                  f"cannot tell the two methods apart. With {n} seeds the Wilcoxon p cannot go below "
                  f"{stats.wilcoxon_min_p(n):.4f}.", "",
                  "| method | " + " | ".join(labels[k] for k, _ in METRICS) + " |", "|" + "---|" * (len(METRICS) + 1)]
        told = []
        for m in rows:
            comp, common = per[m]["paired"][role]["metrics"], per[m]["paired"][role]["seeds"]
            note = " †" if _crosses_boundary(per[m]) else ""
            lines.append(f"| {m}{note} | " + " | ".join(_diff_cell(comp[k], common) for k, _ in METRICS) + " |")
            apart = [f"{labels[k]} {_pp(comp[k]['mean_diff'])}" for k, _ in METRICS if comp[k]["distinguishable"]]
            if apart:
                told.append(f"{m}{note} ({'; '.join(apart)})")
        if told:
            lines += ["", f"Distinguishable from {ref} (95% CI excludes 0): " + ", ".join(told) +
                      f". Every other cell: the data cannot tell the method apart from {ref}."]
        else:
            lines += ["", f"No difference in this table is distinguishable: the data cannot tell any method "
                      f"apart from {ref} on {s}."]
        lines.append("")
    return lines


def _plot_curves(plt, out: Path, s: str, per: dict, methods: list) -> None:
    """curves_<setting>.png: mean top-1 per evaluated round with its 95% t band over seeds."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for m in methods:
        e = per[m]
        if not e["seeds"] or e.get("curve_mean") is None:
            continue
        f = lambda xs: np.array([np.nan if x is None else x for x in xs], dtype=float)  # noqa: E731
        mean, low, high = f(e["curve_mean"]), f(e["curve_ci95_low"]), f(e["curve_ci95_high"])
        x = np.arange(len(mean))
        has = np.isfinite(mean)
        ax.plot(x[has], mean[has], label=m)
        band = np.isfinite(low) & np.isfinite(high)
        if band.any():
            ax.fill_between(x[band], low[band], high[band], alpha=0.15)
    ax.set(xlabel="round", ylabel="global top-1 (LT test)",
           title=f"{s}: accuracy per round (mean, 95% t-CI band over seeds)")
    ax.set_ylim(0, 1)
    if ax.lines:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / f"curves_{_slug(s)}.png", dpi=110)
    plt.close(fig)
