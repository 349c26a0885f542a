"""One run: validated config -> FedML args -> data, model, FedML API -> metrics in the output folder."""
from __future__ import annotations

import copy
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from importlib import metadata
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from .config import SUPPLEMENT_METHODS, RunConfig
from .threads import torch_threads

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
        self.server_step = None
        self.checkpointer = None  # set by the runner; saves at the end of each round
        self.bar = tqdm(total=rounds, desc="rounds", unit="round", disable=not show_progress)
        self._round_start = time.perf_counter()

    def __call__(self, round_idx: int) -> None:
        from .metrics import evaluate

        record = {"round": round_idx, "clients": list(self.api.round_clients),
                  "client_seconds": self.api.client_seconds, "server_seconds": self.api.server_seconds}
        if self.server_step is not None and round_idx in self.server_step.log:
            record["server_step"] = self.server_step.log[round_idx]
        if round_idx % self.eval_every == 0 or round_idx == self.rounds - 1:
            test = evaluate(self.model, self.data.test_batches, self.data.class_num)
            train = evaluate(self.model, self.data.train_batches, self.data.class_num)
            record.update(top1=test["top1"], balanced_accuracy=test["balanced_accuracy"],
                          per_class_accuracy=test["per_class_accuracy"], test_loss=test["loss"],
                          train_loss=train["loss"], train_top1=train["top1"])
            if self.data.validation_batches is not None:
                val = evaluate(self.model, self.data.validation_batches, self.data.class_num)
                record.update(val_top1=val["top1"], val_balanced_accuracy=val["balanced_accuracy"])
            self.bar.set_postfix(top1=f"{test['top1']:.3f}", bal=f"{test['balanced_accuracy']:.3f}")
        now = time.perf_counter()
        record["wall_seconds"] = now - self._round_start
        self._round_start = now
        self.records.append(record)
        if self.checkpointer is not None:
            self.checkpointer.maybe_save(round_idx)
        self.bar.update(1)


@dataclass
class Experiment:
    """A run assembled and ready: FedML's API with our hooks, the data, the model and the recorder."""

    cfg: RunConfig
    args: object
    data: object
    model: object
    api: object
    recorder: RoundRecorder
    generator_info: Optional[dict] = None
    started: float = 0.0
    checkpointer: object = None


def prepare(cfg: RunConfig, show_progress: bool = True) -> Experiment:
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
    generator_info = None
    if args.federated_optimizer in SUPPLEMENT_METHODS:
        recorder.server_step, generator_info = attach_server_step(cfg, args, data, model, api, show_progress)
        recorder.server_step.status = recorder.bar.set_postfix_str
    api.install_round_hooks(recorder, after_aggregation=recorder.server_step)
    return Experiment(cfg, args, data, model, api, recorder, generator_info, started)


def execute(exp: Experiment, checkpoint_dir: Optional[Path] = None, state: Optional[dict] = None) -> dict:
    """Run FedML's round loop to the end and collect the results. With `checkpoint_dir`, checkpoint
    there every `run_args.checkpoint_every` rounds; with a checkpoint's `state`, continue from it."""
    from .checkpoint import Checkpointer

    start = 0
    if checkpoint_dir is not None and exp.cfg["checkpoint_every"]:
        exp.checkpointer = exp.recorder.checkpointer = Checkpointer(exp, checkpoint_dir, exp.cfg["checkpoint_every"])
        if state is not None:
            start = exp.checkpointer.restore(state)
    try:
        exp.api.train_from(start)
    finally:
        exp.recorder.bar.close()
    args, data, records = exp.args, exp.data, exp.recorder.records
    evaluated = [r for r in records if "top1" in r]
    ckpt = exp.checkpointer
    return {
        "method": args.federated_optimizer,
        "dataset": args.dataset,
        "seed": args.random_seed,
        "final": {k: evaluated[-1][k] for k in ("top1", "balanced_accuracy", "per_class_accuracy", "train_loss",
                                                "test_loss", "val_top1", "val_balanced_accuracy")
                  if k in evaluated[-1]},
        "rounds": records,
        "client_seconds_total": sum(r["client_seconds"] for r in records),
        "server_seconds_total": sum(r["server_seconds"] for r in records),
        "wall_seconds": (ckpt.elapsed_before if ckpt else 0.0) + time.perf_counter() - exp.started,
        "resumed_from_round": ckpt.resumed_from if ckpt else None,
        "generator": exp.generator_info,
        "privacy": privacy_note(exp.recorder.server_step),
        "data": {"train_samples": data.fedml_dataset[0], "test_samples": data.fedml_dataset[1],
                 "test_class_counts": np.bincount(np.concatenate([y.numpy() for _, y in data.test_batches]),
                                                  minlength=data.class_num).tolist(),
                 "client_samples": {str(k): int(v) for k, v in data.fedml_dataset[4].items()},
                 "client_label_histograms": (data.client_histograms.tolist()
                                             if data.client_histograms is not None else None)},
        "versions": package_versions(),
        "config": exp.cfg.sections,
    }


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
    from .checkpoint import read_checkpoint, read_finished

    out = Path(out_dir) if out_dir else default_out_dir(cfg)
    base_cfg = with_method(cfg, cfg["baseline"]) if cfg["baseline"] != "none" else None
    base_dir = out / f"baseline_{cfg['baseline']}"
    state = base_state = None
    if resume:
        if read_finished(out, cfg) is not None:
            return finished_result(out, base_cfg is not None and base_dir)
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


def finished_result(out: Path, base_dir) -> dict:
    result = json.loads((out / "metrics.json").read_text())
    if base_dir:
        result["baseline"] = json.loads((base_dir / "metrics.json").read_text())
    result["out_dir"] = str(out)
    return result


def attach_server_step(cfg: RunConfig, args, data, model, api, show_progress: bool):
    """The server-side supplement step for FedDPD-like methods, wired to FedML's sp API.

    Delivery replaces the client's entry in `api.train_data_local_dict`, which FedML's round loop
    re-reads every round (fedavg_api.py:90-95); the client then trains on real data + supplement.
    """
    from .generation import DPOSettings, GeneratorConfig, load_or_pretrain_generator
    from .supplement import FedDPDSettings, GeneratorService, Scorer, ServerStep
    from .trainer import tensors_of, with_supplement

    method, seed = args.federated_optimizer, int(args.random_seed)
    settings = FedDPDSettings(**cfg.sections["feddpd"])
    policy = make_policy(method, settings, data, seed)
    service, info = None, None
    if policy.uses_generator:  # all but Oracle
        gen_cfg = GeneratorConfig(**cfg.sections["generator"])
        threads = cfg["generator_threads"] or os.cpu_count() or 1
        with torch_threads(threads):
            generator = load_or_pretrain_generator(gen_cfg, *data.public, seed=seed, progress=show_progress)
        service = GeneratorService(generator, DPOSettings(**cfg.sections["dpo_args"]), gen_cfg.sample_steps,
                                   sample_threads=threads)
        info = {"source": generator.source, "path": generator.path, "seconds": generator.seconds}
    real = {cid: tensors_of(loader) for cid, loader in api.train_data_local_dict.items()}

    def deliver(cid: int, supplement) -> None:
        api.train_data_local_dict[cid] = with_supplement(real[cid], supplement, settings.supplement_weight,
                                                         args.batch_size, seed=int(args.random_seed) * 1000 + cid)

    return ServerStep(policy, Scorer(model), service, args.comm_round - 1, deliver), info


def privacy_note(step) -> str:
    """What crosses FedAvg's boundary (the server sees model parameters and sample counts only)."""
    policy = getattr(step, "policy", None)
    if getattr(policy, "uses_label_counts", False):
        return "breaks the boundary: the server uses each client's label counts"
    if getattr(policy, "uses_held_out_data", False):
        return "not deployable: uses held-out real data drawn from the global distribution"
    return "within FedAvg's boundary: model parameters and sample counts only"


def policy_class(method: str):
    """The supplement policy class of a method (None for FedAvg and FedProx, which have none)."""
    from .supplement import FedDPDPolicy

    if method == "FedDPD":
        return FedDPDPolicy
    from baselines import BalancePolicy, FedDiffPolicy, OraclePolicy

    return {"FedDiff": FedDiffPolicy, "Balance": BalancePolicy, "Oracle": OraclePolicy}.get(method)


def make_policy(method: str, settings, data, seed: int):
    """The supplement policy of a method: FedDPD's, or a baseline's (they differ only here)."""
    cls = policy_class(method)
    extra = {"Balance": (data.client_histograms,), "Oracle": (data.oracle,)}.get(method, ())
    return cls(settings, data.class_num, seed, *extra)


def write_outputs(out_dir: Path, result: dict, cfg: RunConfig, extra: Optional[dict] = None) -> None:
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
