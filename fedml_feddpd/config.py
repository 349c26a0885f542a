"""Load and validate a FedML-style YAML before anything runs.

The file keeps FedML's own `fedml_config.yaml` layout (common_args, data_args, model_args, train_args, validation_args,
device_args, comm_args, tracking_args) plus this plugin's sections. Every key is checked against SCHEMA; the first
problem stops the run with one line naming the key and what is allowed (`ConfigError`, exit status 2 from the CLI).
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import yaml

from . import methods
from .feddpd import DISCREPANCIES, GATES, PAIRINGS, SCHEDULES, SELECTIONS, FedDPDSettings
from .errors import ConfigError
from .datasets import DATASETS as CATALOG
from .datasets import check_data_args
from .schema import TLS_KEYS  # noqa: F401 (distributed/tls.py imports it from here)
from .schema import REQUIRED, Key, check_size, check_tls, key_name, validate_value
from .schema import bool_key as _bool
from .schema import choice_key as _choice
from .schema import float_key as _float
from .schema import int_key as _int
from .schema import off_key as _off
from .schema import str_key as _str
from .schema import suggest as _suggest

DATASETS = tuple(CATALOG)
BACKENDS = ("sp", "MPI", "GRPC")  # FedML's sp and MPI simulation, gRPC cross-silo (fedml_feddpd/distributed/)
TRAINING_TYPES = ("simulation", "cross_silo")

_FEDDPD = FedDPDSettings()  # the feddpd section's defaults live on the dataclass that consumes it

SCHEMA: dict[str, dict[str, Key]] = {
    "common_args": {
        "training_type": _choice(TRAINING_TYPES),
        "random_seed": _int(0, 0),
        "scenario": _choice(("horizontal",), "horizontal"),
        "using_mlops": _off("using_mlops"),
        "config_version": _str("release"),
    },
    "environment_args": {"bootstrap": _str("")},
    "data_args": {
        "dataset": _choice(DATASETS),
        "data_cache_dir": _str("~/fedml_data"),
        "partition_method": _choice(("hetero", "homo", "natural"), "hetero"),
        "partition_alpha": _float(0.0, default=0.5, low_open=True),
        "imbalance_factor": _float(1.0, default=1.0),
        "public_fraction": _float(0.0, 1.0, default=0.2, low_open=True, high_open=True),
        "test_fraction": _float(0.0, 1.0, default=0.3, low_open=True, high_open=True),
        "min_client_size": _int(1, 10),
        # draws the server's public split (and the max_per_class subsample) apart from the run seed, so the
        # generator pretrained on it is cached once for every seed
        "public_seed": _int(0, 0),
        "max_per_class": _int(0, 0),  # use at most this many images of each class (0 = all), drawn by public_seed
        "validation_fraction": _float(0.0, 1.0, default=0.0, high_open=True),
        "oracle_fraction": _float(0.0, 1.0, default=0.0, high_open=True),
    },
    "model_args": {
        "model": _str(),
        "model_file_cache_folder": _str(""),
        "global_model_file_path": _str(""),
    },
    "train_args": {
        "federated_optimizer": _str(),  # a name in methods.REGISTRY (checked in validate)
        "supplement": _str("none"),  # a supplement method on top of federated_optimizer (methods.of)
        "client_id_list": _str("[]"),
        "client_num_in_total": _int(1),
        "client_num_per_round": _int(1),
        "comm_round": _int(1),
        "epochs": _int(1),
        "batch_size": _int(1),
        "client_optimizer": _choice(("sgd", "adam"), "sgd"),
        "learning_rate": _float(0.0, default=REQUIRED, low_open=True),
        "weight_decay": _float(0.0, default=0.0),
        "min_clients_per_round": _int(1, 1),  # gRPC with round_timeout_s: fewer answers stop the run
        # the most samples a client may report (its upload's weight in the average); 0 = no bound (uploads.py)
        "max_client_samples": _int(0, 0),
        # + each registered method's own keys (methods.all_options(), e.g. FedProx's fedprox_mu)
    },
    "validation_args": {"frequency_of_the_test": _int(1, 1)},
    "device_args": {
        "using_gpu": _bool(False),
        "gpu_id": _int(0, 0),
        "worker_num": _int(1, 1),
    },
    "comm_args": {
        "backend": _choice(BACKENDS, "sp"),
        "is_mobile": _int(0, 0),
        # cross-silo: FedML's ip config CSV (eid,rank,grpc_server_ip,grpc_server_port); "" = generated on 127.0.0.1
        "grpc_ipconfig_path": _str(""),
        # gRPC: the longest a party waits without hearing from a peer before it stops with an error
        "comm_timeout_s": _float(0.0, default=600.0, low_open=True),
        # gRPC: close a round this long after its models went out, without the clients still silent; 0 = off
        "round_timeout_s": _float(0.0, default=0.0),
        # gRPC mutual TLS: this party's {ca_cert, cert, key} PEM paths (`feddpd certs` makes them); {} = none
        "tls": Key(dict, {}, "a mapping of ca_cert, cert and key (PEM file paths), or {} for none"),
        # gRPC: plaintext even when the ip config has addresses off this machine (prints a warning)
        "allow_insecure": _bool(False),
    },
    "tracking_args": {
        "enable_tracking": _off("enable_tracking"),
        "enable_wandb": _off("enable_wandb"),
        "log_file_dir": _str("./log"),
        "wandb_key": _str(""),
        "wandb_project": _str(""),
        "wandb_name": _str(""),
        "wandb_entity": _str(""),
    },
    # Plugin settings that are not FedML's.
    "run_args": {
        "output_dir": _str("runs"),
        "torch_threads": _int(0, 1),  # 0 = torch default
        "generator_threads": _int(0, 0),  # pretraining and sampling; 0 = all cores
        "server_device": _choice(("auto", "cpu", "cuda"), "auto"),  # generator and scoring; auto: the classifier's
        # keep the base generator's lone draws on disk for runs with the same generator, draw, device and threads
        "sample_cache": _bool(False),
        # also run this method on the same split afterwards and print both (none = off)
        "baseline": _choice(("none", "FedAvg", "FedProx"), "none"),
        # checkpoint into the run folder every N rounds (and after the last); 0 = never (no --resume)
        "checkpoint_every": _int(0, 1),
    },
    "feddpd": {
        "schedule": _choice(SCHEDULES, _FEDDPD.schedule),
        "warmup_rounds": _int(0, _FEDDPD.warmup_rounds),
        "supplement_every": _int(1, _FEDDPD.supplement_every),
        "supplement_ratio": _float(0.0, default=_FEDDPD.supplement_ratio),
        "decay": _float(0.0, 1.0, default=_FEDDPD.decay, low_open=True),
        "ratio_floor": _float(0.0, default=_FEDDPD.ratio_floor),
        "supplement_weight": _float(0.0, default=_FEDDPD.supplement_weight),
        "keep_previous": _float(0.0, 1.0, default=_FEDDPD.keep_previous, high_open=True),
        "delivery": _choice(("auto", "client", "server"), _FEDDPD.delivery),
        "selection": _choice(SELECTIONS, _FEDDPD.selection),
        "discrepancy": _choice(DISCREPANCIES, _FEDDPD.discrepancy),
        "gate": _choice(GATES, _FEDDPD.gate),
        "tau": Key(object, _FEDDPD.tau, "a number in [0, 1], or auto (1/C)",
                   lambda v: v == "auto" or (isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v <= 1)),
        "gate_epochs": _int(1, _FEDDPD.gate_epochs),
        "bank_per_class": _int(1, _FEDDPD.bank_per_class),
        "bank_refresh": _int(0, _FEDDPD.bank_refresh),
        "dpo": _bool(_FEDDPD.dpo),
        "dpo_rounds": _int(0, _FEDDPD.dpo_rounds),
        "pairs": _choice(PAIRINGS, _FEDDPD.pairs),
        "pair_quantile": _float(0.0, 0.5, default=_FEDDPD.pair_quantile, low_open=True),
        "disagreement_weight": _float(0.0, default=_FEDDPD.disagreement_weight),
        "adapter_samples": _int(1, _FEDDPD.adapter_samples),
    },
}

# Sections validated by the dataclass that consumes them (its __post_init__ names the bad key).
DATACLASS_SECTIONS = ("generator", "dpo_args")
# Sections that stay out of FedML's flat `args` (their key names overlap FedML's, e.g. learning_rate).
PLUGIN_SECTIONS = methods.PLUGIN_SECTIONS


def _dataclass_for(section: str):
    from .generation.config import DPOSettings, GeneratorConfig

    return {"generator": GeneratorConfig, "dpo_args": DPOSettings}[section]


@dataclass
class RunConfig:
    """The validated YAML: `sections[section][key]` plus the flat view FedML's `args` uses."""

    sections: dict[str, dict[str, Any]]
    source: str = ""
    flat: dict[str, Any] = field(init=False)

    def __post_init__(self):
        self.flat = {k: v for name, sec in self.sections.items() if name not in PLUGIN_SECTIONS
                     for k, v in sec.items()}

    def __getitem__(self, key: str) -> Any:
        return self.flat[key]

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.sections, sort_keys=False)


def schema() -> dict[str, dict[str, Key]]:
    """SCHEMA with every registered method's own train_args keys (methods.Method.options)."""
    full = dict(SCHEMA)
    full["train_args"] = {**SCHEMA["train_args"], **methods.all_options()}
    return full


def validate(raw: Any, source: str = "<config>") -> RunConfig:
    SCHEMA = schema()  # noqa: N806 (the module's SCHEMA plus the methods' keys)
    check_size(raw, source)
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a YAML mapping of sections (common_args, data_args, ...), "
                          f"got {type(raw).__name__}")
    sections: dict[str, dict[str, Any]] = {}
    known = list(SCHEMA) + list(DATACLASS_SECTIONS)
    for name, body in raw.items():
        if name not in known:
            raise ConfigError(f"{key_name(name)}: unknown section{_suggest(str(name), known)}; expected one of "
                              + ", ".join(known))
        if body is None:
            body = {}
        if not isinstance(body, dict):
            raise ConfigError(f"{name}: expected a mapping of keys, got {type(body).__name__}")
        allowed = SCHEMA[name] if name in SCHEMA else [f.name for f in fields(_dataclass_for(name))]
        for key in body:
            if key not in allowed:
                raise ConfigError(f"{name}.{key_name(key)}: unknown key{_suggest(str(key), allowed)}; "
                                  f"allowed: {', '.join(allowed)}")
    for name, keys in SCHEMA.items():
        body = raw.get(name) or {}
        out = sections[name] = {}
        for key, spec in keys.items():
            where = f"{name}.{key}"
            if key in body:
                out[key] = validate_value(where, spec, body[key])
            elif spec.default is REQUIRED:
                raise ConfigError(f"{where}: missing; expected {spec.expect}")
            else:
                out[key] = spec.default
    info = CATALOG[sections["data_args"]["dataset"]]
    for name in DATACLASS_SECTIONS:
        body, cls = raw.get(name) or {}, _dataclass_for(name)
        try:  # the generator's image shape and classes come from the dataset (GeneratorConfig.for_data)
            made = cls.for_data(info.shape, info.classes, **body) if name == "generator" else cls(**body)
            # json round trip: tuples become lists so the resolved config dumps as plain YAML
            sections[name] = json.loads(json.dumps(asdict(made)))
        except ValueError as exc:
            raise ConfigError(str(exc).splitlines()[0]) from None
    _check_across_keys(sections)
    return RunConfig(sections, source)


def _check_across_keys(s: dict[str, dict[str, Any]]) -> None:
    train, data, model = s["train_args"], s["data_args"], s["model_args"]
    if train["client_num_per_round"] > train["client_num_in_total"]:
        raise ConfigError(
            f"train_args.client_num_per_round: expected at most client_num_in_total "
            f"({train['client_num_in_total']}), got {train['client_num_per_round']}")
    if data["public_fraction"] + data["test_fraction"] >= 1.0:
        raise ConfigError(
            f"data_args.test_fraction: public_fraction + test_fraction must be < 1 to leave data "
            f"for clients, got {data['public_fraction']} + {data['test_fraction']}")
    method = methods.of(train)
    if s["feddpd"]["delivery"] == "auto":  # the method's own default; the resolved config names it
        s["feddpd"]["delivery"] = method.delivery
    _check_backend(s, method)
    _check_dropout(s["train_args"], s["comm_args"])
    check_tls(s["comm_args"])
    if method.check is not None:
        method.check(s)
    if data["validation_fraction"] + data["oracle_fraction"] >= 1.0:
        raise ConfigError("data_args.oracle_fraction: validation_fraction + oracle_fraction must be < 1 to leave "
                          "clients data")
    check_data_args(data, model["model"])


def _check_backend(s: dict[str, dict[str, Any]], method: methods.Method) -> None:
    training_type, backend = s["common_args"]["training_type"], s["comm_args"]["backend"]
    wanted = {"simulation": ("sp", "MPI"), "cross_silo": ("GRPC",)}[training_type]
    if backend not in wanted:
        raise ConfigError(f"comm_args.backend: training_type {training_type} runs on "
                          f"{' or '.join(wanted)}, got {backend!r}")
    if backend == "sp":
        return
    if backend not in method.backends:
        able = [n for n, m in methods.REGISTRY.items() if backend in m.backends]
        raise ConfigError(f"train_args.federated_optimizer: backend {backend} runs {', '.join(able)}; "
                          f"{method.name} runs on backend {' or '.join(method.backends)}")
    if s["run_args"]["baseline"] != "none":
        raise ConfigError(f"run_args.baseline: expected none with backend {backend} (run the baseline's own config), "
                          f"got {s['run_args']['baseline']!r}")


def _check_dropout(train: dict[str, Any], comm: dict[str, Any]) -> None:
    if train["min_clients_per_round"] > train["client_num_per_round"]:
        raise ConfigError(f"train_args.min_clients_per_round: expected at most client_num_per_round "
                          f"({train['client_num_per_round']}), got {train['min_clients_per_round']}")
    if comm["round_timeout_s"] > 0 and comm["backend"] != "GRPC":
        raise ConfigError(f"comm_args.round_timeout_s: expected 0 with backend {comm['backend']} (only GRPC goes on "
                          f"without silent clients; a failed rank stops the run), got {comm['round_timeout_s']:g}")


def load_config(path: str | os.PathLike) -> RunConfig:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ConfigError(f"--cf {path}: file not found; expected a FedML YAML config such as "
                          "configs/digits_fedavg.yaml")
    with open(path) as fh:
        try:
            raw = yaml.safe_load(fh)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark else ""
            problem = " ".join(str(getattr(exc, "problem", None) or exc).split())  # one line (a ReaderError's has 2)
            raise ConfigError(f"{path}:{where} not valid YAML ({problem})") from None
        except (ValueError, RecursionError) as exc:  # not UTF-8, a 5,000-digit integer, 2001-13-45, deep nesting
            raise ConfigError(f"{path}: not valid YAML ({type(exc).__name__}: {' '.join(str(exc).split())[:100]})") \
                from None
    return validate(raw, path)
