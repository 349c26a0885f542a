"""The plugin inside FedML's own entry points: after `fedml_feddpd.register()` (which `import fedml_feddpd`
calls once FedML is imported), FedML's quick-start script runs every plugin method and dataset:

    args = fedml.init()                                   # --cf configs/digits_feddpd.yaml
    device = fedml.device.get_device(args)
    dataset, dim = fedml.data.load(args)
    model = fedml.model.create(args, dim)
    FedMLRunner(args, device, dataset, model).run()

Each hook is a patch of one FedML 0.9.6 function, named with the file:line it replaces, and hands
anything that is not the plugin's back to FedML unchanged:

* `Arguments.set_attr_from_config` (arguments.py:187-190) flattens every YAML section into `args`; the
  plugin's own sections (feddpd, generator, dpo_args) reuse FedML key names (dpo_args.learning_rate
  would overwrite train_args.learning_rate), so they stay out, as in our CLI (config.PLUGIN_SECTIONS).
* `fedml.data.load` (data/data_loader.py:234) knows no `digits` or `fashion_mnist`, and its mnist, femnist
  and cifar10 carry no public split, long tail or hold-outs: every dataset of datasets.DATASETS loads
  through data.load_federated_data (which reads FedML's own through the original loader); the 8-tuple
  comes back with the plugin's extra splits attached.
* `fedml.model.create` (model/model_hub.py:19) knows no `cnn_digits` or `cnn_small`.
* `SimulatorSingleProcess.__init__` (simulation/simulator.py:27-62) raises on names it does not know:
  a plugin method runs through experiment.assemble_sp, exactly as `python -m fedml_feddpd run`.
* `FedMLRunner._init_cross_silo_runner` (runner.py:81-116): a plugin method's server and clients run
  the plugin's cross-silo party (distributed/silo.py).
* `MLOpsConfigs.fetch_all_configs` phones home from `fedml.init` (fedml_compat.patch_fedml_offline).

The YAML is validated by config.py first (the same one-line errors as the CLI), and results land where
the CLI puts them (`run_args.output_dir`).
"""
from __future__ import annotations

import importlib.abc
import importlib.util
import sys
import warnings

from . import methods
from .datasets import DATASETS
from .models import PLUGIN_MODELS

# Registry methods that FedML's SimulatorSingleProcess runs correctly by itself (simulation/simulator.py:40-62).
# FedOpt, FedNova and SCAFFOLD are in the registry because FedML's own classes are broken
# (baselines/fedml_sp.py): through FedMLRunner they run the fixed subclasses.
FEDML_SP_NAMES = ("FedAvg", "FedProx")
PLUGIN_DATASETS = tuple(DATASETS)

_registered = False


def plugin_methods() -> tuple[str, ...]:
    """Registry methods that FedML cannot run by itself."""
    return tuple(n for n in methods.REGISTRY if n not in FEDML_SP_NAMES)


def runs_plugin_method(args) -> bool:
    """A plugin method, or any optimizer with a supplement on top (train_args.supplement)."""
    supplemented = getattr(args, "supplement", methods.NO_SUPPLEMENT) != methods.NO_SUPPLEMENT
    return args.federated_optimizer in plugin_methods() or (supplemented and args.federated_optimizer in methods.REGISTRY)


def config_of(args):
    """The validated config behind FedML's `args` (its YAML file, `--cf`), with every key's default
    copied onto `args` where FedML left it unset. Cached on `args`."""
    cfg = getattr(args, "_feddpd_config", None)
    if cfg is None:
        from .config import load_config

        cfg = load_config(args.yaml_config_file)
        for key, value in cfg.flat.items():
            if not hasattr(args, key):
                setattr(args, key, value)
        if not hasattr(args, "eval_every"):
            # as experiment.build_args: the round hooks evaluate on their own schedule
            args.eval_every, args.frequency_of_the_test = cfg["frequency_of_the_test"], 1
        args._feddpd_config = cfg
    return cfg


class FedMLDataset(list):
    """FedML's 8-tuple (a list, as `fedml.data.load` returns) with the plugin's FederatedData attached."""

    federated = None


def _load_data(original):
    def load(args):
        if args.dataset not in PLUGIN_DATASETS:  # datasets the plugin does not know: FedML's loader
            return original(args)
        config_of(args)
        from .data import load_federated_data

        data = load_federated_data(args)
        dataset = FedMLDataset(data.fedml_dataset)
        dataset.federated = data
        return dataset, data.class_num

    load.__wrapped__ = original
    return load


def _create_model(original):
    def create(args, output_dim):
        if args.model not in PLUGIN_MODELS and getattr(args, "dataset", None) not in PLUGIN_DATASETS:
            return original(args, output_dim)
        from .models import create_model

        return create_model(args, output_dim, DATASETS[args.dataset].shape if args.dataset in DATASETS else None)

    create.__wrapped__ = original
    return create


def _federated_data(args, dataset):
    from .data import from_fedml

    if isinstance(dataset, FedMLDataset):
        return dataset.federated
    return from_fedml(dataset, dataset[7])


class PluginSimulation:
    """What SimulatorSingleProcess holds for a plugin method: an sp experiment; `run()` trains, writes
    metrics.json + config.yaml to the CLI's output folder and prints the final line."""

    def __init__(self, args, device, dataset, model):
        from .experiment import assemble_sp, open_party

        cfg = config_of(args)
        party = open_party(cfg, args=args, data=_federated_data(args, dataset), model=model)
        self.experiment = assemble_sp(party, show_progress=True)
        self.result = None

    def run(self):
        from .experiment import execute
        from .outputs import default_out_dir, write_outputs

        exp = self.experiment
        out = default_out_dir(exp.cfg)
        self.result = execute(exp, out)
        write_outputs(out, self.result, exp.cfg)
        print(f"{self.result['method']} on {self.result['dataset']}: final top-1 {self.result['final']['top1']:.4f}"
              f" -> {out}")
        return self.result

    train = run  # FedMLRunner.run calls runner.run(); SimulatorSingleProcess.run calls fl_trainer.train()


class PluginSiloParty:
    """What FedMLRunner holds for a plugin method's cross-silo party (`--role server|client --rank N`)."""

    def __init__(self, args, device, dataset, model):
        self.args, self.dataset, self.model = args, dataset, model

    def run(self):
        from .distributed.silo import run_silo_party

        cfg = config_of(self.args)
        return run_silo_party(cfg, self.args.role, int(self.args.rank), args=self.args,
                              data=_federated_data(self.args, self.dataset), model=self.model)


def register() -> None:
    """Install the hooks above (once; later calls do nothing). Also keeps `fedml.init` offline."""
    global _registered
    if _registered:
        return
    import fedml
    import fedml.data
    import fedml.data.data_loader
    import fedml.model
    import fedml.model.model_hub
    from fedml.arguments import Arguments
    from fedml.runner import FedMLRunner
    from fedml.simulation import simulator

    from .config import PLUGIN_SECTIONS
    from .fedml_compat import patch_fedml_offline

    patch_fedml_offline()

    flatten = Arguments.set_attr_from_config

    def set_attr_from_config(self, configuration):
        return flatten(self, {k: v for k, v in configuration.items() if k not in PLUGIN_SECTIONS})

    Arguments.set_attr_from_config = set_attr_from_config

    load = _load_data(fedml.data.data_loader.load)
    fedml.data.data_loader.load = fedml.data.load = load
    create = _create_model(fedml.model.model_hub.create)
    fedml.model.model_hub.create = fedml.model.create = create

    sp_init = simulator.SimulatorSingleProcess.__init__

    def simulator_init(self, args, device, dataset, model, client_trainer=None, server_aggregator=None):
        if runs_plugin_method(args):
            self.fl_trainer = PluginSimulation(args, device, dataset, model)
            return
        sp_init(self, args, device, dataset, model, client_trainer, server_aggregator)

    simulator.SimulatorSingleProcess.__init__ = simulator_init

    silo_init = FedMLRunner._init_cross_silo_runner

    def init_cross_silo_runner(self, args, device, dataset, model, client_trainer=None, server_aggregator=None):
        if args.federated_optimizer in methods.REGISTRY and (runs_plugin_method(args) or args.dataset in PLUGIN_DATASETS):
            return PluginSiloParty(args, device, dataset, model)
        return silo_init(self, args, device, dataset, model, client_trainer, server_aggregator)

    FedMLRunner._init_cross_silo_runner = init_cross_silo_runner
    _registered = True


class _RegisterAfterFedML(importlib.abc.MetaPathFinder):
    """Finds nothing itself: when `fedml` is first imported, it wraps that module's loader so that
    `register()` runs right after FedML's own __init__ has finished."""

    def find_spec(self, name, path=None, target=None):
        if name != "fedml":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_register(module):
            exec_module(module)
            try:
                register()
            except Exception as exc:  # FedML itself must still import
                warnings.warn(f"fedml-feddpd: FedML hooks not installed ({type(exc).__name__}: {exc})")

        spec.loader.exec_module = exec_then_register
        return spec


def register_when_fedml_loads() -> None:
    if "fedml" in sys.modules:
        register()
    elif not any(isinstance(f, _RegisterAfterFedML) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterFedML())
