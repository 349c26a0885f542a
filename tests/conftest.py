import os
import sys
import warnings

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
warnings.filterwarnings("ignore", message=".*pkg_resources.*")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


@pytest.fixture
def config_dict():
    """The default digits FedAvg config as a dict, small enough for a test."""
    import yaml

    with open(os.path.join(ROOT, "configs", "digits_fedavg.yaml")) as fh:
        raw = yaml.safe_load(fh)
    return shrink(raw)


def shrink(raw):
    """2 rounds of 4 clients with milder skew: a smoke-sized job that still learns."""
    raw["train_args"].update(comm_round=2, epochs=5, client_num_in_total=4, client_num_per_round=4)
    raw["data_args"]["partition_alpha"] = 1.0
    return raw


@pytest.fixture
def make_config(config_dict):
    """make_config(key=value, ...) -> validated RunConfig of the small default with keys replaced."""
    from dataclasses import fields

    from fedml_feddpd.config import DATACLASS_SECTIONS, _dataclass_for, schema, validate

    sections = {**schema(), **{name: [f.name for f in fields(_dataclass_for(name))] for name in DATACLASS_SECTIONS}}

    def make(**overrides):
        for key, value in overrides.items():
            section = next(s for s, keys in sections.items() if key in keys)
            config_dict.setdefault(section, {})[key] = value
        return validate(config_dict, "test.yaml")

    return make


# The kill hook of the resume tests, imported by every process of a run through PYTHONPATH (sitecustomize.py):
# right after writing the checkpoint of round FEDDPD_TEST_KILL_AFTER the process SIGKILLs itself, and first,
# with FEDDPD_TEST_KILL_GROUP, its process group ("group": silo-local with its parties) or its session
# ("session": the mpirun job, whose ranks each lead a group of their own), as `kill -9 -PGID` would.
KILL_HOOK = """
import os, signal
if os.environ.get("FEDDPD_TEST_KILL_AFTER"):
    from fedml_feddpd import checkpoint
    save = checkpoint.Checkpointer.save
    def save_then_die(self, round_idx):
        save(self, round_idx)
        if round_idx == int(os.environ["FEDDPD_TEST_KILL_AFTER"]):
            target = os.environ.get("FEDDPD_TEST_KILL_GROUP")
            if target:
                os.killpg(os.getsid(0) if target == "session" else os.getpgrp(), signal.SIGKILL)
            os.kill(os.getpid(), signal.SIGKILL)
    checkpoint.Checkpointer.save = save_then_die
"""


def write_kill_hook(folder):
    """folder/hooks/sitecustomize.py with KILL_HOOK; returns the hooks folder for hook_env."""
    hooks = folder / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(KILL_HOOK)
    return hooks


def hook_env(hooks=None, **extra):
    """The environment of a test's subprocess: the repository (and the hooks folder) on PYTHONPATH, 1 thread."""
    path = [str(hooks)] if hooks else []
    return {**os.environ, "PYTHONPATH": os.pathsep.join(path + [ROOT]), "OMP_NUM_THREADS": "1", **extra}
