"""One experiment, whatever backend carries it: validated config -> FedML args -> data and model -> server
step -> per-round recorder -> the result dict.

sp (runner.py), MPI (distributed/mpi.py) and gRPC (distributed/silo_*.py) all build their processes with
`open_party` and their server side with `server_step` and `RoundRecorder`, and collect with `execute`,
so every backend writes the same metrics.json. docs/DESIGN.md walks through the whole path.
"""
from __future__ import annotations

import os
import platform
import time
from dataclasses import dataclass
from importlib import metadata
from typing import Callable, Optional

import numpy as np

from . import methods
from .config import RunConfig
from .threads import torch_threads

PACKAGES = ("fedml", "torch", "diffusers", "peft", "trl", "numpy", "scikit-learn", "fedml-feddpd")


def package_versions() -> dict:
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    versions["fedml-feddpd commit"] = source_commit()
    return versions


def source_commit():
    """The git commit of the fedml_feddpd code this process runs ("+dirty" with uncommitted changes to tracked
    files), or None outside a git checkout: results name the code that made them."""
    import subprocess

    here = os.path.dirname(os.path.abspath(__file__))
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True,
                              timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return head.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


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


@dataclass
class Party:
    """One process of a run (the whole sp run, or one MPI rank / silo party): FedML args, data, model."""

    cfg: RunConfig
    args: object
    data: object
    model: object
    device: object
    started: float

    @property
    def method(self) -> methods.Method:
        return methods.of(self.cfg.sections["train_args"])


def open_party(cfg: RunConfig, rank: Optional[int] = None, role: Optional[str] = None,
               extra_args: Optional[dict] = None, args=None, data=None, model=None) -> Party:
    """FedML args through `init_fedml` (offline, as every process must), then data and model from the seed.

    MPI: `fedml.init` sets rank, role, comm and worker_num from MPI.COMM_WORLD (fedml/__init__.py:268-281).
    Cross-silo: the caller gives rank and role; fedml.init fills `client_id_list` (__init__.py:410-433).
    `args`, `data`, `model`: what FedML's own entry points already made (`fedml.init`, `fedml.data.load`,
    `fedml.model.create`; fedml_plugin.py).
    """
    started = time.perf_counter()
    import torch

    from .data import load_federated_data
    from .fedml_compat import init_fedml
    from .models import create_model

    if args is None:
        args = build_args(cfg)
        if rank is not None:
            args.rank, args.role = int(rank), role
        for key, value in (extra_args or {}).items():
            setattr(args, key, value)
        args = init_fedml(args)
    if cfg["torch_threads"]:
        # A small classifier gains nothing from more threads, and with 2 cores a second busy process
        # makes multi-threaded steps far slower (docs/DESIGN.md, "Threads").
        torch.set_num_threads(cfg["torch_threads"])
    data = load_federated_data(args) if data is None else data
    shape = data.space.shape if data.space is not None else None
    model = create_model(args, data.class_num, shape) if model is None else model
    device = torch.device("cuda" if args.using_gpu and torch.cuda.is_available() else "cpu")
    return Party(cfg, args, data, model, device, started)


def server_step(party: Party, deliver: Callable, show_progress: bool):
    """The method's server-side supplement step (None for methods without one) and what the generator
    was (cache or pretraining). `deliver(client_id, supplement)` hands a supplement on: into the client's
    loader on sp (trainer.SupplementDelivery), into the next message on MPI and gRPC."""
    method, cfg, args, data = party.method, party.cfg, party.args, party.data
    if not method.supplement:
        return None, None
    from .feddpd import FedDPDSettings
    from .generation import DPOSettings, GeneratorConfig, load_or_pretrain_generator
    from .supplement import GeneratorService, Scorer, ServerStep

    seed = int(args.random_seed)
    device = server_device(cfg["server_device"], party.device)
    settings = FedDPDSettings(**cfg.sections["feddpd"])
    policy = method.policy_class()(settings, data, seed)
    service, info = None, None
    # generator work (pretraining, sampling, DPO) and scoring the candidate bank, whose batches gain from threads
    threads = cfg["generator_threads"] or os.cpu_count() or 1
    if method.uses_generator:
        gen_cfg = GeneratorConfig(**cfg.sections["generator"])
        with torch_threads(threads):
            # pretrained with the public split's own seed: one cache entry serves every run seed
            generator = load_or_pretrain_generator(gen_cfg, *data.public, seed=int(args.public_seed),
                                                   progress=show_progress, device=device)
        generator.unet.to(device)
        service = GeneratorService(generator, DPOSettings(**cfg.sections["dpo_args"]), gen_cfg,
                                   threads=threads, sample_cache=cfg["sample_cache"])
        info = {"source": generator.source, "path": generator.path, "seconds": generator.seconds}
    scorer = Scorer(party.model, data.space, device, train_args=args, threads=threads)
    return ServerStep(policy, scorer, service, args.comm_round - 1, deliver), info


def server_device(choice: str, classifier_device):
    """run_args.server_device: where the generator and the bank's scoring run (auto: with the classifier)."""
    import torch

    from .errors import ConfigError

    if choice == "auto":
        return classifier_device
    if choice == "cuda" and not torch.cuda.is_available():
        raise ConfigError("run_args.server_device: expected auto or cpu on this machine (torch sees no CUDA device), "
                          "got 'cuda'")
    return torch.device(choice)


class RoundRecorder:
    """Per-round metrics (the round hooks call it) and the tqdm bar. `api` is FedML's sp API with
    fedml_compat.RoundHooks, or distributed.common.ServerCore: both expose `round_clients`,
    `client_seconds` and `server_seconds` of the current round."""

    def __init__(self, api, party: Party, show_progress: bool):
        from tqdm.auto import tqdm

        self.api, self.model, self.data = api, party.model, party.data
        self.eval_every, self.rounds = party.args.eval_every, party.args.comm_round
        self.records: list[dict] = []
        self.server_step = None
        self.checkpointer = None  # set by execute; saves at the end of each round
        self.bar = tqdm(total=self.rounds, desc="rounds", unit="round", disable=not show_progress)
        self._round_start = time.perf_counter()

    def attach(self, step) -> None:
        self.server_step = step
        if step is not None:
            step.status = self.bar.set_postfix_str

    def __call__(self, round_idx: int) -> None:
        from .metrics import evaluate

        record = {"round": round_idx, "clients": list(self.api.round_clients),
                  "client_seconds": self.api.client_seconds, "server_seconds": self.api.server_seconds,
                  "missing_clients": list(getattr(self.api, "round_missing", [])),  # gRPC round_timeout_s
                  # gRPC: uploads the server dropped before aggregation, {client id: why} (uploads.py)
                  "rejected_uploads": {str(c): why for c, why in sorted(getattr(self.api, "round_rejected",
                                                                                 {}).items())}}
        if self.server_step is not None and round_idx in self.server_step.log:
            record["server_step"] = self.server_step.log[round_idx]
        if self.data.validation_batches is not None:  # small, and what defaults are chosen on: every round
            val = evaluate(self.model, self.data.validation_batches, self.data.class_num)
            record.update(val_top1=val["top1"], val_balanced_accuracy=val["balanced_accuracy"])
        if round_idx % self.eval_every == 0 or round_idx == self.rounds - 1:  # validation_args.frequency_of_the_test
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
        if self.checkpointer is not None:
            self.checkpointer.maybe_save(round_idx)
        self.bar.update(1)


@dataclass
class Experiment:
    """A run assembled and ready: the round loop (`api.train_from`), its party and the recorder."""

    party: Party
    api: object
    recorder: RoundRecorder
    generator_info: Optional[dict] = None
    checkpointer: object = None

    # the names the rest of the code reads
    cfg = property(lambda self: self.party.cfg)
    args = property(lambda self: self.party.args)
    data = property(lambda self: self.party.data)
    model = property(lambda self: self.party.model)
    started = property(lambda self: self.party.started)


def prepare(cfg: RunConfig, show_progress: bool = True) -> Experiment:
    """An sp experiment: FedML's own sp API for the method (fedml_compat.build_sp_api) with round hooks,
    and for supplement methods the server step delivering into the clients' loaders."""
    return assemble_sp(open_party(cfg), show_progress)


def assemble_sp(party: Party, show_progress: bool = True) -> Experiment:
    from .fedml_compat import build_sp_api
    from .trainer import SupplementDelivery

    cfg, args, data = party.cfg, party.args, party.data
    api = build_sp_api(party.method, args, party.device, data.fedml_dataset, party.model)
    recorder = RoundRecorder(api, party, show_progress)
    step, info = None, None
    if party.method.supplement:
        # FedML's round loop re-reads api.train_data_local_dict every round (fedavg_api.py:90-95).
        delivery = SupplementDelivery(api.train_data_local_dict, cfg.sections["feddpd"]["supplement_weight"],
                                      args.batch_size, int(args.random_seed), data.space)
        step, info = server_step(party, delivery, show_progress)
    recorder.attach(step)
    api.install_round_hooks(recorder, after_aggregation=step)
    return Experiment(party, api, recorder, info)


def execute(exp: Experiment, checkpoint_dir=None, state: Optional[dict] = None) -> dict:
    """Run the round loop to the end and collect the results. With `checkpoint_dir`, checkpoint there
    every `run_args.checkpoint_every` rounds; with a checkpoint's `state`, continue from it."""
    from .checkpoint import Checkpointer

    start = 0
    if checkpoint_dir is not None and exp.cfg["checkpoint_every"] and exp.party.method.can_resume(exp.cfg.sections):
        exp.checkpointer = exp.recorder.checkpointer = Checkpointer(exp, checkpoint_dir, exp.cfg["checkpoint_every"])
        if state is not None:
            start = exp.checkpointer.restore(state)
    try:
        exp.api.train_from(start)
    finally:
        exp.recorder.bar.close()
    return result_of(exp)


def result_of(exp: Experiment) -> dict:
    args, data, records = exp.args, exp.data, exp.recorder.records
    evaluated = [r for r in records if "top1" in r]
    ckpt = exp.checkpointer
    return {
        "method": exp.party.method.name,
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
        "privacy": exp.party.method.privacy,
        "data": {"train_samples": data.fedml_dataset[0], "test_samples": data.fedml_dataset[1],
                 "test_class_counts": np.bincount(np.concatenate([y.numpy() for _, y in data.test_batches]),
                                                  minlength=data.class_num).tolist(),
                 "client_samples": {str(k): int(v) for k, v in data.fedml_dataset[4].items()},
                 "client_label_histograms": (data.client_histograms.tolist()
                                             if data.client_histograms is not None else None)},
        "versions": package_versions(),
        "config": exp.cfg.sections,
    }
