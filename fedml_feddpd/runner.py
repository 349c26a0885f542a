"""One run: validated config -> FedML args -> data, model, FedML API -> metrics in the output folder."""
from __future__ import annotations

import json
import os
import platform
import shutil
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Optional

from .config import RunConfig

PACKAGES = ("fedml", "torch", "diffusers", "peft", "trl", "numpy", "scikit-learn", "fedml-feddpd")


def package_versions() -> dict:
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def build_args(cfg: RunConfig):
    """FedML's `Arguments` object filled from the validated YAML (every key becomes an attribute,
    as `Arguments.set_attr_from_config` does, arguments.py:187-190), without parsing sys.argv."""
    from fedml.arguments import Arguments

    args = Arguments.__new__(Arguments)
    defaults = dict(yaml_config_file=cfg.source, run_id="0", rank=0, local_rank=0, node_rank=0,
                    role="client", run_device_id="0")
    for key, value in {**defaults, **cfg.flat}.items():
        setattr(args, key, value)
    # The round hooks evaluate on their own schedule; FedML must call its test hook every round.
    args.eval_every = cfg["frequency_of_the_test"]
    args.frequency_of_the_test = 1
    return args


def default_out_dir(cfg: RunConfig) -> Path:
    stem = Path(cfg.source).stem if cfg.source else "run"
    return Path(cfg["output_dir"]) / f"{stem}_seed{cfg['random_seed']}"


class RoundRecorder:
    """Per-round metrics (the round hooks call it) and the tqdm bar."""

    def __init__(self, api, model, data, eval_every: int, rounds: int, show_progress: bool):
        from tqdm.auto import tqdm

        self.api, self.model, self.data = api, model, data
        self.eval_every, self.rounds = eval_every, rounds
        self.records: list[dict] = []
        self.bar = tqdm(total=rounds, desc="rounds", unit="round", disable=not show_progress)
        self._round_start = time.perf_counter()

    def __call__(self, round_idx: int) -> None:
        from .metrics import evaluate

        record = {"round": round_idx, "clients": list(self.api.round_clients),
                  "client_seconds": self.api.client_seconds, "server_seconds": self.api.server_seconds}
        if round_idx % self.eval_every == 0 or round_idx == self.rounds - 1:
            test = evaluate(self.model, self.data.test_batches, self.data.class_num)
            train = evaluate(self.model, self.data.train_batches, self.data.class_num)
            record.update(top1=test["top1"], balanced_accuracy=test["balanced_accuracy"],
                          per_class_accuracy=test["per_class_accuracy"], test_loss=test["loss"],
                          train_loss=train["loss"], train_top1=train["top1"])
            self.bar.set_postfix(top1=f"{test['top1']:.3f}", bal=f"{test['balanced_accuracy']:.3f}")
        now = time.perf_counter()
        record["wall_seconds"] = now - self._round_start
        self._round_start = now
        self.records.append(record)
        self.bar.update(1)


def run(cfg: RunConfig, out_dir: Optional[str | os.PathLike] = None, show_progress: bool = True) -> dict:
    """Run one configuration to the end and write metrics.json + config.yaml into `out_dir`.

    Outputs are written to a temporary sibling folder and moved into place only on success.
    """
    started = time.perf_counter()
    from .fedml_compat import build_sp_api, init_fedml

    args = init_fedml(build_args(cfg))
    import torch

    if cfg["torch_threads"]:
        # A small classifier gains nothing from more threads, and with 2 cores a second busy
        # process makes multi-threaded steps far slower (FIELD-NOTES).
        torch.set_num_threads(cfg["torch_threads"])

    from .data import load_federated_data
    from .models import create_model

    data = load_federated_data(args)
    model = create_model(args, data.class_num)
    device = torch.device("cuda" if args.using_gpu and torch.cuda.is_available() else "cpu")
    api = build_sp_api(args.federated_optimizer, args, device, data.fedml_dataset, model)
    recorder = RoundRecorder(api, model, data, args.eval_every, args.comm_round, show_progress)
    api.install_round_hooks(recorder)
    try:
        api.train()
    finally:
        recorder.bar.close()
    evaluated = [r for r in recorder.records if "top1" in r]
    result = {
        "method": args.federated_optimizer,
        "dataset": args.dataset,
        "seed": args.random_seed,
        "final": {k: evaluated[-1][k] for k in ("top1", "balanced_accuracy", "per_class_accuracy",
                                                "train_loss", "test_loss")},
        "rounds": recorder.records,
        "client_seconds_total": sum(r["client_seconds"] for r in recorder.records),
        "server_seconds_total": sum(r["server_seconds"] for r in recorder.records),
        "wall_seconds": time.perf_counter() - started,
        "data": {"train_samples": data.fedml_dataset[0], "test_samples": data.fedml_dataset[1],
                 "client_samples": {str(k): int(v) for k, v in data.fedml_dataset[4].items()},
                 "client_label_histograms": (data.client_histograms.tolist()
                                             if data.client_histograms is not None else None)},
        "versions": package_versions(),
        "config": cfg.sections,
    }
    write_outputs(Path(out_dir) if out_dir else default_out_dir(cfg), result, cfg)
    return result


def write_outputs(out_dir: Path, result: dict, cfg: RunConfig) -> None:
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        (tmp / "metrics.json").write_text(json.dumps(result, indent=1))
        (tmp / "config.yaml").write_text(cfg.to_yaml())
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    result["out_dir"] = str(out_dir)
