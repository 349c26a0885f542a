"""The method registry: every `train_args.federated_optimizer` this plugin runs, in one table.

An entry says which FedML API class runs the method, its server-side supplement policy or its client
trainer, which config keys it reads (so a finished run is reused only while those keys are unchanged),
what crosses FedAvg's privacy boundary, and the backends it supports. config.py, checkpoint.py,
experiment.py, fedml_compat.py and fedml_plugin.py read it; nothing else names a method.

Classes are named as "module:Class" strings and imported when a run needs them, so the table is plain
data: reading it imports neither torch nor FedML. Adding a method is one `register(Method(...))` here
(or in your own code before the run) plus the file of its policy or trainer; docs/DESIGN.md shows both.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional

from .errors import ConfigError
from .schema import Key, choice_key, float_key

# Plugin sections a method may read; a method that does not read one ignores it (run identity).
PLUGIN_SECTIONS = ("feddpd", "dpo_args", "generator")
ALL = None  # in `reads`: every key of the section
# The `feddpd:` keys the server step and the delivery of any supplement method read (feddpd/schedule.py).
SCHEDULE = ("schedule", "warmup_rounds", "supplement_every", "decay", "ratio_floor", "supplement_weight",
            "keep_previous", "delivery")

WITHIN = "within FedAvg's boundary: model parameters and sample counts only"
LABEL_COUNTS = "breaks the boundary: the server uses each client's label counts"
HELD_OUT = "not deployable: uses held-out real data drawn from the global distribution"

FEDAVG_API = "fedml.simulation.sp.fedavg.fedavg_api:FedAvgAPI"
ALL_BACKENDS = ("sp", "MPI", "GRPC")


def load(path: str):
    """The object a "module:attribute" string names."""
    module, _, attr = path.partition(":")
    return getattr(importlib.import_module(module), attr)


@dataclass(frozen=True)
class Method:
    name: str
    summary: str
    api: str = FEDAVG_API             # FedML sp API class it runs on (sp backend)
    policy: Optional[str] = None      # its SupplementPolicy (server step after aggregation), if any
    trainer: Optional[str] = None     # its client trainer; None: FedML's ModelTrainerCLS (SupplementedTrainer
    #                                   for methods with a policy, which train on real data + supplement)
    reads: Mapping[str, Optional[tuple]] = field(default_factory=dict)  # plugin section -> keys (ALL: every key)
    options: Mapping[str, Key] = field(default_factory=dict)            # its own train_args keys
    privacy: str = WITHIN
    backends: tuple = ("sp",)
    # FedProxTrainer(dataset, model, device, args) against FedAvgAPI(args, device, dataset, model)
    api_args: str = "args_first"
    check: Optional[Callable[[dict], None]] = None  # cross-key check on the validated sections
    # keys of `reads` that a given config leaves unused (section -> keys, ALL: the whole section): they stay
    # out of the run's identity, so e.g. FedDPD with dpo: false does not depend on dpo_args
    unread: Optional[Callable[[dict], Mapping[str, Optional[tuple]]]] = None
    # False (or a function of the sections): the method keeps server or client state that checkpoint.py does not
    # save, so it writes no checkpoints and `run --resume` is refused with one line
    resumable: object = True
    # an optimizer a supplement method can run on (train_args.supplement); `own_trainer`: its API builds the client
    # trainer that carries it (FedProx's proximal term, FedNova's and SCAFFOLD's steps), which a supplement keeps;
    # `uploads_params`: its clients upload their parameters (not deltas), so the server can train them itself
    composable: bool = False
    own_trainer: bool = False
    uploads_params: bool = True
    # what `feddpd.delivery: auto` (the default) means for this supplement method (config.resolve_delivery)
    delivery: str = "client"

    @property
    def supplement(self) -> bool:
        return self.policy is not None

    @property
    def uses_generator(self) -> bool:
        return "generator" in self.reads

    @property
    def crosses_boundary(self) -> bool:
        return self.privacy != WITHIN

    def can_resume(self, sections: dict) -> bool:
        return bool(self.resumable(sections) if callable(self.resumable) else self.resumable)

    def api_class(self):
        return load(self.api)

    def policy_class(self):
        return load(self.policy) if self.policy else None

    def trainer_class(self):
        if self.trainer:
            return load(self.trainer)
        if self.policy and not self.own_trainer:
            return load("fedml_feddpd.trainer:SupplementedTrainer")
        return None


REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Add (or replace) a method; its name becomes a valid `train_args.federated_optimizer`."""
    REGISTRY[method.name] = method
    return method


def names() -> tuple[str, ...]:
    return tuple(REGISTRY)


def get(name: str) -> Method:
    if name not in REGISTRY:
        raise ConfigError(f"train_args.federated_optimizer: expected one of {', '.join(REGISTRY)}, got {name!r}")
    return REGISTRY[name]


NO_SUPPLEMENT = "none"


def of(train_args: Mapping) -> Method:
    """The method a config runs: `federated_optimizer`, with `supplement`'s policy on top unless it is "none"."""
    base = get(train_args["federated_optimizer"])
    name = train_args.get("supplement", NO_SUPPLEMENT)
    if name == NO_SUPPLEMENT:
        return base
    if name not in supplement_methods():
        raise ConfigError(f"train_args.supplement: expected none or one of {', '.join(supplement_methods())}, "
                          f"got {name!r}")
    if not base.composable:
        able = [n for n, m in REGISTRY.items() if m.composable]
        raise ConfigError(f"train_args.supplement: a supplement runs on {', '.join(able)}; expected none with "
                          f"federated_optimizer {base.name}, got {name!r}")
    return compose(base, REGISTRY[name])


def compose(base: Method, sup: Method) -> Method:
    """Supplement method `sup`'s policy on optimizer `base`: the optimizer's API, trainer and own keys, the supplement's
    reads and privacy note, the backends both run on; resumable when both are. FedAvg + FedDPD runs as FedDPD."""
    def check(sections: dict) -> None:
        for part in (base.check, sup.check, lambda s: _composed_check(base, s)):
            if part is not None:
                part(sections)

    return Method(f"{sup.name}+{base.name}", f"{sup.summary}, on {base.summary}", api=base.api, api_args=base.api_args,
                  policy=sup.policy, reads=sup.reads, options=base.options, privacy=sup.privacy,
                  backends=tuple(b for b in base.backends if b in sup.backends), check=check, unread=sup.unread,
                  resumable=lambda s: base.can_resume(s) and sup.can_resume(s), own_trainer=base.own_trainer,
                  uploads_params=base.uploads_params,
                  delivery=sup.delivery if base.uploads_params else "client")


def _composed_check(base: Method, sections: dict) -> None:
    feddpd = sections["feddpd"]
    if base.own_trainer and feddpd["supplement_weight"] != 1:
        raise ConfigError(f"feddpd.supplement_weight: expected 1 with federated_optimizer {base.name} (its own client "
                          f"trainer weighs every sample alike), got {feddpd['supplement_weight']!r}")
    if not base.uploads_params and feddpd["delivery"] == "server":
        raise ConfigError(f"feddpd.delivery: expected client with federated_optimizer {base.name} (its clients upload "
                          "updates, not parameters the server could train), got 'server'")


def supplement_methods() -> tuple[str, ...]:
    return tuple(n for n, m in REGISTRY.items() if m.supplement)


def all_options() -> dict[str, Key]:
    """Every method's own train_args keys (the config schema accepts them all; a method reads its own)."""
    return {k: v for m in REGISTRY.values() for k, v in m.options.items()}


def _needs_oracle_data(sections: dict) -> None:
    if sections["data_args"]["oracle_fraction"] <= 0:
        raise ConfigError("data_args.oracle_fraction: Oracle draws real held-out data; expected a number in "
                          "(0, 1), got 0")


def _schedule_check(sections: dict) -> None:
    """Cross-key checks of the schedule every supplement method reads."""
    feddpd = sections["feddpd"]
    if feddpd["delivery"] == "server" and feddpd["keep_previous"] > 0:
        raise ConfigError(f"feddpd.keep_previous: expected 0 with delivery: server (clients hold no supplement; "
                          "delivery: client keeps one), "
                          f"got {feddpd['keep_previous']!r}")


def _feddpd_unread(sections: dict) -> dict:
    """The keys a FedDPD config leaves unused: DPO's without adapters (dpo: false, dpo_rounds: 0, selection: random),
    the older rule's with the loss gap, the gate's with random selection (supplement.FedDPDPolicy)."""
    feddpd = sections.get("feddpd") or {}
    unused: dict = {"feddpd": ()}
    selection = feddpd.get("selection", "loss_gap")
    if not feddpd.get("dpo", True) or selection == "random" or feddpd.get("dpo_rounds", 1) == 0:
        unused = {"dpo_args": ALL, "feddpd": ("dpo_rounds", "pairs", "pair_quantile", "disagreement_weight",
                                               "adapter_samples")}
    elif feddpd.get("pairs", "median") == "median":
        unused["feddpd"] += ("pair_quantile",)
    else:
        unused["feddpd"] += ("disagreement_weight",)
    if selection != "discrepancy":
        unused["feddpd"] += ("discrepancy",)
    if selection == "random":
        unused["feddpd"] += ("gate", "tau", "gate_epochs")
    elif feddpd.get("gate", "public") != "public":
        unused["feddpd"] += ("gate_epochs",)
    return unused


def _schedule_unread(sections: dict) -> dict:
    """Under the periodic schedule the decay keys are unused; under the exponential one, supplement_every."""
    periodic = (sections.get("feddpd") or {}).get("schedule", "exponential") == "periodic"
    return {"feddpd": ("decay", "ratio_floor") if periodic else ("supplement_every",)}


def _merge_unread(*parts) -> Callable[[dict], dict]:
    def unread(sections: dict) -> dict:
        out: dict = {}
        for part in parts:
            for section, keys in part(sections).items():
                out[section] = ALL if ALL in (keys, out.get(section, ())) else tuple(out.get(section, ())) + keys
        return out
    return unread


# --- the built-in methods ---------------------------------------------------------------------------
register(Method("FedAvg", "FedML's FedAvg", backends=ALL_BACKENDS, composable=True))
register(Method("FedProx", "FedML's FedProx (proximal term fedprox_mu)",
                api="fedml.simulation.sp.fedprox.fedprox_trainer:FedProxTrainer", api_args="dataset_first",
                options={"fedprox_mu": float_key(0.0, default=0.1)}, composable=True, own_trainer=True))
register(Method("FedDPD", "loss-gap-selected synthetic supplements from a Diffusion-DPO-adapted generator",
                policy="fedml_feddpd.feddpd.policy:FedDPDPolicy",
                reads={"feddpd": ALL, "dpo_args": ALL, "generator": ALL}, backends=ALL_BACKENDS,
                unread=_merge_unread(_feddpd_unread, _schedule_unread), check=_schedule_check,
                delivery="server"))  # chosen on validation data (docs/RESULTS.md)
register(Method("FedDiff", "one class-balanced synthetic set shared by every client",
                policy="fedml_feddpd.baselines.feddiff:FedDiffPolicy",
                reads={"feddpd": SCHEDULE + ("supplement_ratio",), "generator": ALL}, backends=ALL_BACKENDS,
                unread=_schedule_unread, check=_schedule_check))
register(Method("Balance", "synthetic samples that flatten each client's label histogram",
                policy="fedml_feddpd.baselines.balance:BalancePolicy", reads={"feddpd": SCHEDULE, "generator": ALL},
                privacy=LABEL_COUNTS, backends=ALL_BACKENDS, unread=_schedule_unread, check=_schedule_check))
register(Method("Oracle", "real held-out samples from the global distribution, FedDPD's budget",
                policy="fedml_feddpd.baselines.oracle:OraclePolicy", reads={"feddpd": SCHEDULE + ("supplement_ratio",)},
                privacy=HELD_OUT, backends=ALL_BACKENDS, unread=_schedule_unread,
                check=lambda s: (_needs_oracle_data(s), _schedule_check(s))))
register(Method("FedLC", "client-side logit calibration by local label counts (Zhang et al., ICML 2022)",
                trainer="fedml_feddpd.baselines.fedlc:FedLCTrainer", options={"fedlc_tau": float_key(0.0, default=1.0)},
                backends=ALL_BACKENDS))
register(Method("FedRS", "client-side restricted softmax for locally absent classes (Li & Zhan, KDD 2021)",
                trainer="fedml_feddpd.baselines.fedrs:FedRSTrainer", options={"fedrs_alpha": float_key(0.0, 1.0, default=0.5)},
                backends=ALL_BACKENDS))
register(Method("Balance@B", "Balance's flattening direction at FedDPD's budget B_k",
                policy="fedml_feddpd.baselines.balance:BalanceBudgetPolicy",
                reads={"feddpd": SCHEDULE + ("supplement_ratio",), "generator": ALL},
                privacy=LABEL_COUNTS, backends=ALL_BACKENDS, unread=_schedule_unread, check=_schedule_check))
register(Method("FedOpt", "FedML's FedOpt: server_optimizer on the pseudo-gradient w_global - avg(w_locals)",
                api="fedml_feddpd.baselines.fedml_sp:FedOpt",
                options={"server_optimizer": choice_key(("adam", "adagrad", "sgd"), "adam"),
                         "server_lr": float_key(0.0, default=0.01, low_open=True)},
                resumable=False, composable=True))  # server optimizer state (baselines/fedml_sp.py)
register(Method("FedNova", "FedML's FedNova: normalized averaging of local updates",
                api="fedml_feddpd.baselines.fedml_sp:FedNova", api_args="dataset_first",
                options={"gmf": float_key(0.0, 1.0, default=0.0, high_open=True),
                         "mu": float_key(0.0, default=0.0),
                         "momentum": float_key(0.0, 1.0, default=0.0, high_open=True),
                         "dampening": float_key(0.0, 1.0, default=0.0)},
                resumable=lambda s: s["train_args"]["gmf"] == 0,  # server momentum when gmf > 0
                composable=True, own_trainer=True, uploads_params=False))
register(Method("SCAFFOLD", "FedML's SCAFFOLD: control variates correct client drift",
                api="fedml_feddpd.baselines.fedml_sp:SCAFFOLD", api_args="dataset_first",
                options={"scaffold_server_lr": float_key(0.0, default=1.0, low_open=True)},
                resumable=False, composable=True, own_trainer=True, uploads_params=False))  # control variates
