"""`feddpd run`: one configuration to the end on the sp backend (MPI and gRPC: distributed/), its
optional baseline on the same split, checkpoints and resume, and the output folder.

Building the experiment is experiment.py's job; this module only orchestrates an sp run.
"""
from __future__ import annotations

import copy
import os
import sys
from pathlib import Path
from typing import Optional

from .checkpoint import read_checkpoint, read_finished, refuse_unresumable
from .config import RunConfig
from .experiment import execute, prepare
from .outputs import default_out_dir, finished_result, write_outputs


def with_method(cfg: RunConfig, method: str) -> RunConfig:
    """The same config (same seed, split and training settings) run with another method."""
    sections = copy.deepcopy(cfg.sections)
    sections["train_args"]["federated_optimizer"] = method
    sections["run_args"]["baseline"] = "none"
    return RunConfig(sections, cfg.source)


def run(cfg: RunConfig, out_dir: Optional[str | os.PathLike] = None, show_progress: bool = True,
        resume: bool = False) -> dict:
    """Run one configuration to the end and write metrics.json + config.yaml into `out_dir`
    (built in a temporary sibling folder and moved into place only on success). With
    `run_args.baseline`, that method also runs on the same split, into `out_dir/baseline_<method>`.

    Until it finishes, `out_dir` holds only checkpoints and an INCOMPLETE note (checkpoint.py);
    `resume=True` continues from them (a finished run is returned as it is)."""
    if cfg["backend"] != "sp":  # MPI ranks and gRPC parties: fedml_feddpd/distributed/
        from .distributed import run_distributed

        return run_distributed(cfg, out_dir, show_progress, resume)
    out = Path(out_dir) if out_dir else default_out_dir(cfg)
    base_cfg = with_method(cfg, cfg["baseline"]) if cfg["baseline"] != "none" else None
    base_dir = out / f"baseline_{cfg['baseline']}"
    state = base_state = None
    if resume:
        if read_finished(out, cfg) is not None:
            return finished_result(out, base_cfg is not None and base_dir)
        refuse_unresumable(cfg, out)
        # unreadable checkpoints or ones from another config stop here, before any work
        state = read_checkpoint(out, cfg)
        if base_cfg is not None:
            base_state = read_checkpoint(base_dir, base_cfg)
    elif (out / "checkpoint.pt").is_file():
        print(f"feddpd: {out} holds an unfinished run; starting over (pass --resume to continue it)",
              file=sys.stderr)
    result = execute(prepare(cfg, show_progress), out, state)
    extra = {}
    if base_cfg is not None:
        result["baseline"] = execute(prepare(base_cfg, show_progress), base_dir, base_state)
        extra[base_dir.name] = (result["baseline"], base_cfg)
    write_outputs(out, result, cfg, extra)
    return result
