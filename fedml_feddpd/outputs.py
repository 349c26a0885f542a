"""Where a run's results land: `<output_dir>/<config>_seed<seed>/` with metrics.json and config.yaml,
written into a temporary sibling folder and moved into place only when complete."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional

from .config import RunConfig


def default_out_dir(cfg: RunConfig) -> Path:
    stem = Path(cfg.source).stem if cfg.source else "run"
    return Path(cfg["output_dir"]) / f"{stem}_seed{cfg['random_seed']}"


def write_outputs(out_dir: Path, result: dict, cfg: RunConfig, extra: Optional[dict] = None) -> None:
    """metrics.json + config.yaml of `result` (and of each `extra` {subfolder: (result, cfg)}) into
    `out_dir`, replacing whatever was there (an unfinished run's checkpoints) in one rename."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        for name, (res, res_cfg) in {".": (result, cfg), **(extra or {})}.items():
            (tmp / name).mkdir(exist_ok=True)
            (tmp / name / "metrics.json").write_text(json.dumps(res, indent=1))
            (tmp / name / "config.yaml").write_text(res_cfg.to_yaml())
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    result["out_dir"] = str(out_dir)


def finished_result(out: Path, base_dir) -> dict:
    result = json.loads((out / "metrics.json").read_text())
    if base_dir:
        result["baseline"] = json.loads((base_dir / "metrics.json").read_text())
    result["out_dir"] = str(out)
    return result
