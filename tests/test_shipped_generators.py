"""The generators that come with the package: found before the cache, checked like a cache entry, offline."""
import json
import os
import shutil

import pytest

from conftest import ROOT

FMNIST = "/usr/share/datasets/fashion-mnist"


def _generator_for(config: str, **overrides):
    from types import SimpleNamespace

    from fedml_feddpd.config import load_config
    from fedml_feddpd.data import build_federated
    from fedml_feddpd.generation import GeneratorConfig, load_or_pretrain_generator

    cfg = load_config(os.path.join(ROOT, "configs", config))
    data = build_federated(SimpleNamespace(**cfg.flat))
    gen_cfg = GeneratorConfig(**{**cfg.sections["generator"], **overrides})
    return cfg, load_or_pretrain_generator(gen_cfg, *data.public, seed=cfg["public_seed"], progress=False)


@pytest.mark.parametrize("config", ["digits_feddpd.yaml", "fmnist_feddpd.yaml"])
def test_the_default_configs_use_the_shipped_generator(config, tmp_path):
    if config.startswith("fmnist") and not os.path.isdir(FMNIST):
        pytest.skip("Debian's dataset-fashion-mnist is not installed")
    _, gen = _generator_for(config, cache_dir=str(tmp_path / "empty-cache"))  # nothing cached: nothing pretrained
    assert gen.source == "shipped" and gen.seconds < 30
    meta = json.load(open(os.path.join(gen.path, "feddpd_generator.json")))
    made = meta["made_by"]
    assert made["command"].startswith("python -m fedml_feddpd pretrain --cf configs/" + config)
    assert made["commit"] and 0.5 < made["judge"]["agreement_mean"] <= 1.0
    assert not (tmp_path / "empty-cache").exists()


def test_a_damaged_shipped_generator_is_one_line_not_a_retraining(tmp_path, monkeypatch):
    from fedml_feddpd.generation import pretrain

    if not os.path.isdir(pretrain.SHIPPED_DIR):
        pytest.skip("no shipped generators in this checkout")
    shipped = tmp_path / "shipped"
    shutil.copytree(pretrain.SHIPPED_DIR, shipped)
    for entry in shipped.iterdir():
        weights = entry / pretrain.WEIGHTS_FILE
        weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)
    monkeypatch.setattr(pretrain, "SHIPPED_DIR", str(shipped))
    with pytest.raises(pretrain.GeneratorFileError, match=r"^shipped generator .*: unusable \(weights file missing or "
                                                           r"its checksum differs\); .*reinstall it$"):
        _generator_for("digits_feddpd.yaml", cache_dir=str(tmp_path / "cache"))


def test_another_generator_config_pretrains_as_before(tmp_path):
    _, gen = _generator_for("digits_feddpd.yaml", pretrain_steps=3, cache_dir=str(tmp_path / "cache"))
    assert gen.source == "pretrained" and gen.path.startswith(str(tmp_path / "cache"))


@pytest.mark.slow
@pytest.mark.parametrize("config", ["digits_feddpd.yaml", "fmnist_feddpd.yaml"])
def test_pretraining_from_the_recipe_scores_as_the_shipped_generator(config, tmp_path, monkeypatch):
    """Re-pretrain with the recipe (shipped entries hidden, an empty cache) and judge both the same way: the judge's
    agreement agrees within 0.03 (the weights themselves depend on the machine's threads and float rounding)."""
    if config.startswith("fmnist") and not os.path.isdir(FMNIST):
        pytest.skip("Debian's dataset-fashion-mnist is not installed")
    from benchmarks.judge import judge_generator
    from fedml_feddpd.config import load_config
    from fedml_feddpd.generation import pretrain

    cfg = load_config(os.path.join(ROOT, "configs", config))
    shipped = judge_generator(cfg, [1, 2, 3], 50)
    assert shipped["generator"]["source"] == "shipped"
    monkeypatch.setattr(pretrain, "SHIPPED_DIR", str(tmp_path / "none"))
    cfg.sections["generator"]["cache_dir"] = str(tmp_path / "cache")
    again = judge_generator(cfg, [1, 2, 3], 50)
    assert again["generator"]["source"] == "pretrained"
    assert abs(again["agreement_mean"] - shipped["agreement_mean"]) <= 0.03
