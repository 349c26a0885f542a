"""What the server checks in every upload before it is aggregated, on every backend (docs/BACKENDS.md,
"Threat model"): the state dict has exactly the global model's keys, shapes and dtypes, every value is
finite, and the sample count that weighs it is a positive integer, at most `train_args.max_client_samples`
when that is set. Pure functions over tensors (no FedML), so they are tested on their own.

Where they run: sp (fedml_compat.RoundHooks._aggregate) and MPI (distributed.common.ServerCore.received), whose
parties are one trusted job, stop the run with one line naming the client (`UploadError`); the gRPC server
drops the upload, records why, and the round goes on with the others (distributed/silo_server.py).
supplement.check_boundary applies the same key, shape and dtype check for the server step.
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from typing import Optional

import torch

from .errors import UploadError

__all__ = ["UploadError", "check_upload", "model_spec", "mismatch", "report_problem", "upload_problem"]


def model_spec(state_dict) -> dict:
    """{key: (shape, dtype)} of the global model's state dict: what every upload must match."""
    return {k: (tuple(v.shape), v.dtype) for k, v in state_dict.items()}


def mismatch(state_dict, spec: dict) -> Optional[str]:
    """Why `state_dict` is not a state dict of the model `spec` describes (a key too many or missing, another
    shape or dtype, a value that is no tensor), in a few words; None when it is one."""
    if not isinstance(state_dict, Mapping):
        return f"its model is a {type(state_dict).__name__}, not a state dict"
    extra = [k for k in state_dict if k not in spec]
    if extra:
        return f"{str(extra[0])[:80]!r} is not a model parameter"
    for key, (shape, dtype) in spec.items():
        value = state_dict.get(key)
        if value is None:
            return f"{key} is missing"
        if not isinstance(value, torch.Tensor):
            return f"{key} is a {type(value).__name__}, not a tensor"
        if tuple(value.shape) != shape:
            return f"{key} has shape {list(value.shape)}, the model's is {list(shape)}"
        if value.dtype != dtype:
            return f"{key} has dtype {str(value.dtype).replace('torch.', '')}, the model's is " \
                   f"{str(dtype).replace('torch.', '')}"
    return None


def upload_problem(num_samples, state_dict, spec: dict, max_samples: int = 0) -> Optional[str]:
    """Why an upload (sample count, state dict) may not be aggregated, in a few words; None when it may.
    `max_samples` > 0 bounds the sample count (train_args.max_client_samples; 0 = no bound)."""
    if isinstance(num_samples, bool) or not isinstance(num_samples, numbers.Integral) or num_samples < 1:
        return f"its sample count {str(num_samples)[:40]} is not a positive integer"
    if max_samples and num_samples > max_samples:
        return f"its sample count {int(num_samples)} is above train_args.max_client_samples = {max_samples}"
    why = mismatch(state_dict, spec)
    if why:
        return why
    for key, value in state_dict.items():
        if (value.is_floating_point() or value.is_complex()) and not bool(torch.isfinite(value).all()):
            return f"{key} holds NaN or infinite values"
    return None


def check_upload(round_idx: int, client_id: int, num_samples, state_dict, spec: dict, max_samples: int = 0) -> None:
    """upload_problem as one line naming the client (UploadError): where every party is trusted, a bad upload is
    a fault that stops the run."""
    why = upload_problem(num_samples, state_dict, spec, max_samples)
    if why:
        raise UploadError(f"round {round_idx}: client {client_id}'s upload cannot be aggregated: {why}")


RNG_STATE_BYTES = torch.get_rng_state().numel()  # a torch.Generator's CPU state (a loader's, torch's own)


def report_problem(report, client_id: int, client_state=None) -> Optional[str]:
    """Why what a client sends beside its model (MPI, gRPC: distributed.common.ClientCore.report and state_of)
    cannot be recorded: the server writes the report into metrics.json and sends the state back on --resume.
    None when both are what an honest client sends (or absent)."""
    if report is not None:
        if type(report) is not dict or set(report) != {"client", "seconds", "supplement"}:
            return "its report is not {client, seconds, supplement}"
        if report["client"] != client_id or type(report["client"]) is not int:
            return f"its report names client {str(report['client'])[:20]}, not client {client_id}"
        seconds = report["seconds"]
        if type(seconds) not in (int, float) or not math.isfinite(seconds) or seconds < 0:
            return "its report's seconds are not a finite number >= 0"
        summary = report["supplement"]
        if summary is not None and not (
                type(summary) is dict and set(summary) == {"size", "sha256", "classes"}
                and type(summary["size"]) is int and type(summary["sha256"]) is str and len(summary["sha256"]) == 64
                and type(summary["classes"]) is list and all(type(c) is int for c in summary["classes"])):
            return "its report's supplement is not {size, sha256, classes}"
    if client_state is not None:
        if type(client_state) is not dict or not set(client_state) <= {"loader", "torch"}:
            return "its client state is not {loader, torch}"
        for key, value in client_state.items():
            if value is not None and not (isinstance(value, torch.Tensor) and value.dtype == torch.uint8
                                          and tuple(value.shape) == (RNG_STATE_BYTES,)):
                return f"its client state's {key} is not a random generator state"
    return None
