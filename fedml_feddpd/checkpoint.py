"""Checkpoint every round into the run folder, and resume a killed run to the same result (sp, and the gRPC
server and MPI rank 0, where distributed.common.ServerCore plays the sp API's part: see its checkpoint methods).

A checkpoint holds everything the rest of the run depends on: the global model, the round index, the
metrics recorded so far, the supplements each client holds, the shuffling state of every client's
loader, the torch / numpy / python RNG states, the generator's LoRA adapters and the supplement policy's
own state (SupplementPolicy.state_dict: FedDiff's shared set). It is written to a
temporary file and renamed over `checkpoint.pt`, so a kill at any moment leaves the previous complete
checkpoint. While a run is unfinished its folder holds `checkpoint.pt` and an `INCOMPLETE` note and no
`metrics.json`; on success the finished folder replaces it (runner.write_outputs).
"""
from __future__ import annotations

import json
import os
import pickle
import random
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import torch

from . import methods
from .errors import CheckpointError, ConfigError

# FORMAT stays 1 when a key is added that readers can default: the policy state ("policy" under "server_step")
# came later, and a checkpoint without it restores as the empty state, which stateless policies (FedDPD,
# Balance, Balance@B, Oracle) accept, so their older checkpoints still resume bit for bit. A policy with
# state refuses it in one line (FedDiff: "predates FedDiff's saved shared set"). Bumping FORMAT would have
# refused every older checkpoint, resumable ones included. Bump it when a key changes meaning.
FORMAT = 1
CHECKPOINT = "checkpoint.pt"
INCOMPLETE = "INCOMPLETE"
# Keys that change how a run is executed or where it is written, not what it computes.
NEUTRAL_KEYS = {("run_args", "output_dir"), ("run_args", "torch_threads"), ("run_args", "generator_threads"),
                ("run_args", "sample_cache"),
                ("run_args", "checkpoint_every"), ("comm_args", "tls"), ("comm_args", "allow_insecure"),
                # they act only when a gRPC client drops out; with every client answering, as on sp and MPI,
                # the numbers do not depend on them
                ("comm_args", "round_timeout_s"), ("train_args", "min_clients_per_round"),
                # where the gRPC parties listen and how long they wait: a resumed server may move or wait longer
                ("comm_args", "grpc_ipconfig_path"), ("comm_args", "comm_timeout_s")}

# Keys added after runs were recorded, with the value that reproduces those runs: at that value a key is left
# out of a run's identity, so runs made before it existed stay valid (any other value is a different run).
# max_client_samples changes the numbers only when it rejects an upload (gRPC goes on without it; sp and MPI
# stop), but a bound is part of the aggregation rule: a run or checkpoint made under another bound is another run.
ADDED_LATER = {("feddpd", "keep_previous"): 0.0, ("train_args", "max_client_samples"): 0,
               ("train_args", "supplement"): "none"}


def _run_identity(sections: dict) -> dict:
    """The settings a run's numbers depend on: all but NEUTRAL_KEYS, the plugin sections and keys its
    method does not read (methods.Method.reads), and other methods' own train_args keys. So a new FedDPD
    default does not invalidate a finished FedAvg run. Applied to both sides of a comparison."""
    train = sections.get("train_args") or {}
    try:
        method = methods.of({"supplement": methods.NO_SUPPLEMENT, **train})
    except ConfigError:  # a run of a method this version does not know: compared key by key
        method = methods.Method(str(train.get("federated_optimizer")), "")
    others = {k for m in methods.REGISTRY.values() if m is not method for k in m.options} - set(method.options)
    unread = method.unread(sections) if method.unread else {}
    keep = {}
    for section, body in sections.items():
        if section in methods.PLUGIN_SECTIONS:
            if section not in method.reads or (section in unread and unread[section] is methods.ALL):
                continue
            wanted, unused = method.reads[section], unread.get(section) or ()
            keep[section] = {k: v for k, v in body.items() if (wanted is methods.ALL or k in wanted)
                             and k not in unused and not _as_before(section, k, v)}
            continue
        keep[section] = {k: v for k, v in body.items() if (section, k) not in NEUTRAL_KEYS
                         and not (section == "train_args" and k in others) and not _as_before(section, k, v)}
    return keep


def _as_before(section: str, key: str, value) -> bool:
    """A key added later, at the value that reproduces the runs made before it (ADDED_LATER)."""
    return (section, key) in ADDED_LATER and value == ADDED_LATER[section, key]


def _first_difference(a: dict, b: dict, what: str = "checkpoint") -> str:
    for section in sorted(set(a) | set(b)):
        sa, sb = a.get(section, {}), b.get(section, {})
        for key in sorted(set(sa) | set(sb)):
            if sa.get(key) != sb.get(key):
                return f"{section}.{key}: {what} has {sa.get(key)!r}, config has {sb.get(key)!r}"
    return "?"


def read_finished(directory: Path, cfg) -> dict | None:
    """metrics.json of the finished run in `directory`, None if it has none; CheckpointError (one
    line) if another config made it, so a changed default never hides behind an old result."""
    path = Path(directory) / "metrics.json"
    if not path.is_file():
        return None
    result = json.loads(path.read_text())
    theirs = _run_identity(result.get("config") or {})
    mine = json.loads(json.dumps(_run_identity(cfg.sections)))  # as metrics.json stores it
    if theirs != mine:
        raise CheckpointError(f"{path} was made by another config ({_first_difference(theirs, mine, 'that run')}); "
                              "expected the same config: move or delete that folder to run it again")
    return result


def refuse_unresumable(cfg, out: Path) -> None:
    """--resume of a method whose state checkpoints do not hold: one line (CheckpointError)."""
    method = methods.of(cfg.sections["train_args"])
    if not method.can_resume(cfg.sections):
        raise CheckpointError(f"--resume: {method.name} keeps server or client state that checkpoints do not "
                              f"hold, so it writes none; expected a finished run in {out}: run without --resume")


def resume_command(cfg, directory) -> str:
    """How to continue the unfinished run in `directory` (the INCOMPLETE note)."""
    if cfg["backend"] == "GRPC":
        return (f"  python -m fedml_feddpd silo-local --cf CONFIG --out {directory} --resume\n"
                f"or restart the server with\n"
                f"  python -m fedml_feddpd silo --role server --rank 0 --cf CONFIG --out {directory} --resume\n"
                f"and any client that stopped, as before\n")
    if cfg["backend"] == "MPI":
        return (f"  mpirun -np {cfg['client_num_per_round'] + 1} python -m fedml_feddpd run --cf CONFIG "
                f"--out {directory} --resume\n(the mpirun command that started it, with --resume)\n")
    return f"  python -m fedml_feddpd run --cf CONFIG --out {directory} --resume\n"


def server_resume_state(cfg, out: Path, resume: bool):
    """The server's start (the gRPC server, MPI rank 0): ("finished", result) for a finished run in `out` under
    --resume, else ("state", the checkpoint to continue from or None). A method checkpoints cannot hold, an
    unreadable checkpoint or one of another config stop here in one line (CheckpointError), before any party
    starts."""
    if not resume:
        if (out / CHECKPOINT).is_file():
            print(f"feddpd: {out} holds an unfinished run; starting over (pass --resume to continue it)",
                  file=sys.stderr, flush=True)
        return "state", None
    if read_finished(out, cfg) is not None:
        from .outputs import finished_result

        return "finished", finished_result(out, None)
    refuse_unresumable(cfg, out)
    return "state", read_checkpoint(out, cfg)


def read_checkpoint(directory: Path, cfg) -> dict | None:
    """The state saved in `directory`, None if there is none; CheckpointError (one line) if it is
    unreadable or was written by another config."""
    path = Path(directory) / CHECKPOINT
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except (EOFError, RuntimeError, pickle.UnpicklingError, zipfile.BadZipFile, OSError, ValueError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(f"checkpoint {path}: unreadable (truncated or corrupt: {reason}); "
                              "expected a checkpoint.pt written by feddpd run; delete it to start over") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path}: not a feddpd checkpoint of format {FORMAT}; delete it to start over")
    mine = _run_identity(cfg.sections)
    theirs = _run_identity(state["config"])
    if theirs != mine:
        raise CheckpointError(f"checkpoint {path} was written by another config "
                              f"({_first_difference(theirs, mine)}); expected the same config to resume")
    return state


def pack_weights(weights: dict) -> dict:
    """One adapter's weights {name: tensor} as one flat tensor plus names and shapes: torch.save wrote ten
    adapters' 640 small tensors in 27.7 ms, a checkpoint every round; packed, 4.2 ms (packing included)."""
    return {"names": list(weights), "shapes": [tuple(t.shape) for t in weights.values()],
            "flat": torch.cat([t.reshape(-1) for t in weights.values()]) if weights else torch.empty(0)}


def unpack_weights(packed: dict) -> dict:
    """pack_weights undone; a checkpoint written before packing holds {name: tensor} and is returned as it is."""
    if set(packed) != {"names", "shapes", "flat"} or not isinstance(packed["flat"], torch.Tensor):
        return packed
    sizes = [int(np.prod(shape)) for shape in packed["shapes"]]
    parts = packed["flat"].split(sizes) if sizes else []
    return {n: t.reshape(shape) for n, t, shape in zip(packed["names"], parts, packed["shapes"])}


class Checkpointer:
    """Saves and restores one experiment (runner.Experiment) at round ends."""

    def __init__(self, exp, directory: Path, every: int):
        self.exp, self.directory, self.every = exp, Path(directory), every
        self.path = self.directory / CHECKPOINT
        self.elapsed_before = 0.0  # wall seconds spent before the resumed process started
        self.resumed_from = None

    # -- saving -----------------------------------------------------------------------------------
    def maybe_save(self, round_idx: int) -> None:
        last = self.exp.recorder.rounds - 1  # args.comm_round is shortened while resuming
        if self.every and ((round_idx + 1) % self.every == 0 or round_idx == last):
            self.save(round_idx)

    def save(self, round_idx: int) -> None:
        exp = self.exp
        api, step = exp.api, exp.recorder.server_step
        state = {
            "format": FORMAT,
            "config": _run_identity(exp.cfg.sections),
            "round": round_idx,
            "global_model": {k: v.detach().clone() for k, v in api.model_trainer.get_model_params().items()},
            "records": exp.recorder.records,
            "loader_rng": self._loader_states(),
            "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()},
            "elapsed_seconds": self.elapsed_before + time.perf_counter() - exp.started,
            "server_step": None,
            # the gRPC / MPI server's own part (ServerCore.checkpoint_state); sp has none
            "backend": api.checkpoint_state() if hasattr(api, "checkpoint_state") else None,
        }
        if step is not None:
            state["server_step"] = {
                "log": step.log,
                "delivered": {cid: (s.images, s.labels, s.stats) for cid, s in step.delivered.items()},
                "adapters": {name: pack_weights(w) for name, w in step.generator.adapter_states().items()}
                if step.generator is not None else {},
                "policy": step.policy.state_dict(),
            }
        self.directory.mkdir(parents=True, exist_ok=True)
        marker = self.directory / INCOMPLETE
        if not marker.exists():
            marker.write_text("This run has not finished: resume it with\n" + resume_command(exp.cfg, self.directory))
        tmp = self.path.with_name(f".{CHECKPOINT}.{os.getpid()}.tmp")
        torch.save(state, tmp)
        os.replace(tmp, self.path)

    def _loader_states(self) -> dict:
        api = self.exp.api
        if hasattr(api, "loader_states"):  # gRPC, MPI: as the clients reported them after their latest round
            return api.loader_states()
        return {cid: loader.generator.get_state() for cid, loader in api.train_data_local_dict.items()
                if getattr(loader, "generator", None) is not None}

    def restore(self, state: dict) -> int:
        """Put the experiment back where the checkpoint left it; returns the next round to run."""
        exp = self.exp
        api, step = exp.api, exp.recorder.server_step
        api.model_trainer.set_model_params(state["global_model"])
        exp.recorder.records[:] = state["records"]
        if step is not None and state["server_step"] is not None:
            from .supplement import Supplement

            saved = state["server_step"]
            step.log.update(saved["log"])
            if step.generator is not None:
                step.generator.load_adapter_states({n: unpack_weights(w) for n, w in saved["adapters"].items()})
            try:  # {}: a checkpoint written before policies saved their state (see FORMAT)
                step.policy.load_state_dict(saved.get("policy", {}))
            except ValueError as exc:
                raise CheckpointError(f"checkpoint {self.path} {exc}; delete it to start over") from None
            for cid, (images, labels, stats) in saved["delivered"].items():
                step.deliver_supplement(cid, Supplement(images, labels, stats))
        if hasattr(api, "restore_checkpoint_state"):  # gRPC, MPI: the clients' states go back in messages
            api.restore_checkpoint_state(state)
        else:
            for cid, rng_state in state["loader_rng"].items():
                api.train_data_local_dict[cid].generator.set_state(rng_state)
        torch.set_rng_state(state["rng"]["torch"])
        np.random.set_state(state["rng"]["numpy"])
        random.setstate(state["rng"]["python"])
        self.elapsed_before = state["elapsed_seconds"]
        self.resumed_from = state["round"]
        exp.recorder.bar.update(state["round"] + 1)
        return state["round"] + 1
