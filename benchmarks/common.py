"""What the benchmarks share: reading a run folder and writing a paired difference."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional


def metrics_of(run_dir: Path) -> Optional[dict]:
    """A finished run's metrics.json, or None while it has none."""
    path = Path(run_dir) / "metrics.json"
    return json.loads(path.read_text()) if path.is_file() else None


def fmt_diff(p: dict) -> str:
    """A paired difference as `+1.23 [-0.40, +2.86]` (mean and 95% CI, points)."""
    if p.get("mean_diff") is None:
        return "n/a"
    if p.get("ci95_low") is None:
        return f"{p['mean_diff']:+.2f}"
    return f"{p['mean_diff']:+.2f} [{p['ci95_low']:+.2f}, {p['ci95_high']:+.2f}]"
