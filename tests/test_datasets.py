"""Every dataset through one split: Fashion-MNIST from IDX files, FedML's mnist / femnist / cifar10 from tiny
files written here in FedML's on-disk formats, each run end to end offline with FedDPD and a tiny generator."""
import gzip
import json
import os
import pickle
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch
import yaml

from fedml_feddpd.data.sources import DEBIAN_FASHION_MNIST, FASHION_FILES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_GENERATOR = {"block_out_channels": [8, 16], "norm_num_groups": 8, "attention_head_dim": 8,
                  "pretrain_steps": 3, "pretrain_batch_size": 16, "sample_steps": 2}


def _images(n, shape, seed):
    """Class-dependent blobs, so that a tiny model can learn something."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 10
    x = rng.integers(0, 60, size=(n, *shape), dtype=np.uint8)
    for i, y in enumerate(labels):
        x[i, ..., 2 * y:2 * y + 6, :] = 250
    return x, labels


def write_idx(folder, per_class=40):
    """Fashion-MNIST's four IDX files (gzipped, as Debian ships them): train and t10k parts."""
    os.makedirs(folder, exist_ok=True)
    for part, n, seed in (("train", 8 * per_class, 0), ("t10k", 2 * per_class, 1)):
        x, y = _images(n, (28, 28), seed)
        with gzip.open(os.path.join(folder, f"{part}-images-idx3-ubyte.gz"), "wb") as f:
            f.write((0x0803).to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in x.shape) + x.tobytes())
        with gzip.open(os.path.join(folder, f"{part}-labels-idx1-ubyte.gz"), "wb") as f:
            f.write((0x0801).to_bytes(4, "big") + len(y).to_bytes(4, "big") + y.astype(np.uint8).tobytes())


def write_leaf_mnist(folder, writers=12, per_writer=30):
    """FedML's MNIST: MNIST.zip present (so nothing downloads) and LEAF JSON under MNIST/train|test
    (fedml/data/MNIST/data_loader.py:16-70): users, user_data {u: {x: [784 floats in [0, 1]], y}}."""
    for part, n, seed in (("train", per_writer, 0), ("test", per_writer // 3, 1)):
        os.makedirs(os.path.join(folder, "MNIST", part), exist_ok=True)
        users = [f"f_{i:04d}" for i in range(writers)]
        data = {}
        for i, u in enumerate(users):
            x, y = _images(n, (28, 28), seed * 100 + i)
            data[u] = {"x": (x.reshape(n, -1) / 255.0).round(3).tolist(), "y": y.tolist()}
        with open(os.path.join(folder, "MNIST", part, "all_data.json"), "w") as f:
            json.dump({"users": users, "num_samples": [n] * writers, "user_data": data}, f)
    with zipfile.ZipFile(os.path.join(folder, "MNIST.zip"), "w"):
        pass


def write_femnist(folder, per_client=2):
    """FedML's Federated EMNIST h5 files: examples/<client>/{pixels (n, 28, 28) in [0, 1], label (n,)}.
    FedML's loader walks exactly 3,400 clients (FederatedEMNIST/data_loader.py:11,152), so there are 3,400."""
    import h5py

    os.makedirs(folder, exist_ok=True)
    for name, seed in (("fed_emnist_train.h5", 0), ("fed_emnist_test.h5", 1)):
        with h5py.File(os.path.join(folder, name), "w") as f:
            ex = f.create_group("examples")
            for i in range(3400):
                x, _ = _images(per_client, (28, 28), seed * 10_000 + i)
                g = ex.create_group(f"c{i:04d}")
                g["pixels"] = x.astype(np.float32) / 255.0
                g["label"] = (np.arange(per_client) + per_client * i) % 62  # every one of the 62 classes


def write_cifar10(folder, per_batch=40):
    """torchvision's cifar-10-batches-py layout (what FedML's CIFAR-10 loader reads): five data batches,
    test_batch and batches.meta, pickled dicts of uint8 rows (N, 3072) and labels."""
    base = os.path.join(folder, "cifar-10-batches-py")
    os.makedirs(base, exist_ok=True)  # noqa: the folder FedML's loader expects
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        x, y = _images(per_batch, (3, 32, 32), i)
        with open(os.path.join(base, name), "wb") as f:
            pickle.dump({"data": x.reshape(per_batch, -1), "labels": y.tolist()}, f)
    with open(os.path.join(base, "batches.meta"), "wb") as f:
        pickle.dump({"label_names": [f"class{c}" for c in range(10)]}, f)


def tiny_config(config_dict, tmp_path, dataset, model, method="FedDPD", **data_args):
    raw = config_dict
    raw["data_args"].update(dataset=dataset, data_cache_dir=str(tmp_path / "data"), imbalance_factor=5,
                            partition_alpha=1.0, min_client_size=2, **data_args)
    raw["model_args"]["model"] = model
    raw["train_args"].update(federated_optimizer=method, comm_round=3, epochs=1, client_num_in_total=3,
                             client_num_per_round=3, batch_size=8)
    raw["feddpd"] = {"warmup_rounds": 0, "supplement_every": 1, "bank_per_class": 2}
    raw["generator"] = {**TINY_GENERATOR, "cache_dir": str(tmp_path / "gen")}
    raw["dpo_args"] = {"max_steps": 1, "batch_size": 4}
    raw["run_args"] = {"output_dir": str(tmp_path / "runs")}
    return raw


def run_cli(raw, tmp_path, name="run.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw))
    return subprocess.run([sys.executable, "-m", "fedml_feddpd", "run", "--cf", str(path), "--no-progress"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))


def _result(tmp_path):
    (folder,) = (tmp_path / "runs").iterdir()
    return json.loads((folder / "metrics.json").read_text())


@pytest.mark.parametrize("dataset,model,writer,extra", [
    ("fashion_mnist", "cnn_small", write_idx, {"max_per_class": 30}),
    ("mnist", "cnn_small", write_leaf_mnist, {}),
    ("mnist", "lr", write_leaf_mnist, {"partition_method": "natural", "public_fraction": 0.25}),
    ("femnist", "cnn_small", write_femnist, {}),
    ("cifar10", "cnn_small", write_cifar10, {}),
])
def test_feddpd_runs_offline_on_every_dataset(tmp_path, config_dict, dataset, model, writer, extra):
    writer(str(tmp_path / "data"))
    proc = run_cli(tiny_config(config_dict, tmp_path, dataset, model, **extra), tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = _result(tmp_path)
    supplied = [r["server_step"] for r in result["rounds"] if "server_step" in r]
    assert result["dataset"] == dataset and supplied, "FedDPD ran no server step"
    counts = result["data"]["test_class_counts"]
    assert counts[0] > counts[9], f"the test set is not long-tailed: {counts}"  # imbalance_factor 5
    assert result["config"]["train_args"]["client_num_in_total"] == 3  # FedML's loader does not rewrite it
    assert len(result["data"]["client_samples"]) == 3


@pytest.mark.parametrize("method", ["FedDiff", "Balance", "Oracle"])
def test_the_supplement_baselines_run_on_three_channel_images(tmp_path, config_dict, method):
    write_cifar10(str(tmp_path / "data"))
    raw = tiny_config(config_dict, tmp_path, "cifar10", "cnn_small", method=method, oracle_fraction=0.2)
    proc = run_cli(raw, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = _result(tmp_path)
    sizes = [s["size"] for r in result["rounds"] if "server_step" in r
             for s in r["server_step"]["supplements"].values()]
    assert sizes and sum(sizes) > 0, f"{method} sent nothing"


def test_fashion_mnist_reads_the_debian_files_when_installed(tmp_path):
    if not os.path.isdir(DEBIAN_FASHION_MNIST):
        if os.environ.get("FEDDPD_REQUIRE_FMNIST"):
            pytest.fail(f"{DEBIAN_FASHION_MNIST} missing (apt-get install dataset-fashion-mnist)")
        pytest.skip("dataset-fashion-mnist is not installed")
    from fedml_feddpd.data.sources import load_fashion_mnist

    pool = load_fashion_mnist(str(tmp_path))  # nothing there: Debian's copy
    assert pool.images.shape == (70_000, 1, 28, 28) and pool.images.dtype == torch.float32
    assert 0.0 <= float(pool.images.min()) and float(pool.images.max()) == 1.0
    assert np.bincount(pool.labels.numpy()).tolist() == [7000] * 10


def test_the_public_split_and_generator_do_not_depend_on_the_run_seed(tmp_path, config_dict):
    from types import SimpleNamespace

    from fedml_feddpd.config import validate
    from fedml_feddpd.data import build_federated

    write_idx(str(tmp_path / "data"))
    raw = tiny_config(config_dict, tmp_path, "fashion_mnist", "cnn_small", max_per_class=30)
    splits = []
    for seed in (0, 1):
        raw["common_args"]["random_seed"] = seed
        splits.append(build_federated(SimpleNamespace(**validate(raw, "t.yaml").flat)))
    (pa, la), (pb, lb) = splits[0].public, splits[1].public
    assert torch.equal(pa, pb) and torch.equal(la, lb)
    assert np.bincount(la.numpy()).tolist() == [6] * 10  # balanced: 20% of 30 per class
    test_a, test_b = (torch.cat([x for x, _ in d.test_batches]) for d in splits)
    assert not torch.equal(test_a, test_b)  # the rest of the split does change with the run seed
    raw["common_args"]["random_seed"] = 0
    assert run_cli(raw, tmp_path, "a.yaml").returncode == 0
    raw["common_args"]["random_seed"] = 1
    raw["run_args"]["output_dir"] = str(tmp_path / "runs1")
    assert run_cli(raw, tmp_path, "b.yaml").returncode == 0
    (folder,) = (tmp_path / "runs1").iterdir()
    generator = json.loads((folder / "metrics.json").read_text())["generator"]
    assert generator["source"] == "cache", generator  # seed 1 reuses seed 0's generator
    assert len(os.listdir(tmp_path / "gen")) == 1


def test_model_space_matches_fedmls_cifar10_transform():
    from fedml.data.cifar10.data_loader import _data_transforms_cifar10

    from fedml_feddpd.data.spaces import ModelSpace
    from fedml_feddpd.datasets import DATASETS

    info = DATASETS["cifar10"]
    space = ModelSpace(info.shape, "nchw", info.mean, info.std)
    image = np.random.default_rng(0).integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
    fedml = _data_transforms_cifar10()[1](image)  # FedML's test-time transform of one HWC uint8 image
    ours = space.to_model(torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255.0)[0]
    assert torch.allclose(ours, fedml, atol=1e-6)
    assert torch.allclose(space.to_generator(ours[None])[0], torch.from_numpy(image).permute(2, 0, 1).float() / 255.0,
                          atol=1e-6)
    flat = ModelSpace((1, 28, 28), "flat")
    x = torch.rand(2, 1, 28, 28)
    assert flat.to_model(x).shape == (2, 784) and torch.equal(flat.to_generator(flat.to_model(x)), x)
    assert ModelSpace((1, 28, 28), "nhw").to_model(x).shape == (2, 28, 28)


def test_non_square_images_pass_through_generator_and_space():
    from fedml_feddpd.data.spaces import ModelSpace
    from fedml_feddpd.generation import GeneratorConfig, sample
    from fedml_feddpd.generation.unet import build_unet

    cfg = GeneratorConfig.for_data((1, 8, 12), 3, **{k: v for k, v in TINY_GENERATOR.items()
                                                     if k not in ("pretrain_steps", "pretrain_batch_size")})
    assert cfg.image_shape == (1, 8, 12) and cfg.sample_size == [8, 12]
    x, y = sample(build_unet(cfg), cfg, [2, 1, 0], steps=2, guidance_scale=1.0)
    assert x.shape == (3, 1, 8, 12) and y.tolist() == [0, 0, 1]
    assert ModelSpace((1, 8, 12), "flat").to_model(x).shape == (3, 96)


@pytest.mark.parametrize("change,expected", [
    (lambda raw, tmp: raw["data_args"].update(dataset="mnist", data_cache_dir=str(tmp / "nowhere")),
     "data_args.data_cache_dir: dataset 'mnist' needs MNIST.zip"),
    (lambda raw, tmp: raw["generator"].update(block_out_channels=[8, 8, 8, 16]),
     "generator.block_out_channels: 4 blocks halve the image 3 times"),
    (lambda raw, tmp: raw["generator"].update(in_channels=3), "generator.in_channels: the dataset's images are 1x28x28"),
    (lambda raw, tmp: raw["data_args"].update(partition_method="natural"), "data_args.partition_method: natural needs"),
    (lambda raw, tmp: raw["model_args"].update(model="resnet56"), "model_args.model: 'resnet56' does not fit"),
])
def test_bad_dataset_inputs_are_one_line_errors(tmp_path, config_dict, change, expected):
    raw = tiny_config(config_dict, tmp_path, "fashion_mnist", "cnn_small", max_per_class=30)
    change(raw, tmp_path)
    proc = run_cli(raw, tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], proc.stderr[-2000:]
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").iterdir())


def test_missing_fashion_mnist_files_name_the_apt_package(tmp_path, monkeypatch):
    from fedml_feddpd.data import sources
    from fedml_feddpd.errors import ConfigError

    monkeypatch.setattr(sources, "DEBIAN_FASHION_MNIST", str(tmp_path / "no-debian"))
    with pytest.raises(ConfigError, match=r"fashion_mnist needs train-images-idx3-ubyte\[\.gz\].*apt-get install "
                                          r"dataset-fashion-mnist"):
        sources.fashion_mnist_folder(str(tmp_path))
    write_idx(str(tmp_path / "copy" / "fashion-mnist"), per_class=2)
    assert sources.fashion_mnist_folder(str(tmp_path / "copy")).endswith("fashion-mnist")
    assert set(FASHION_FILES) <= {f[:-3] for f in os.listdir(tmp_path / "copy" / "fashion-mnist")}


def test_pretrained_generator_of_the_wrong_shape_is_a_one_line_error(tmp_path, config_dict):
    from fedml_feddpd.generation import GeneratorConfig
    from fedml_feddpd.generation.unet import build_unet

    sizes = {k: v for k, v in TINY_GENERATOR.items() if k not in ("pretrain_steps", "pretrain_batch_size")}
    build_unet(GeneratorConfig.for_data((3, 32, 32), 10, **sizes)).save_pretrained(tmp_path / "unet")
    write_idx(str(tmp_path / "data"))
    raw = tiny_config(config_dict, tmp_path, "fashion_mnist", "cnn_small", max_per_class=30)
    raw["generator"]["pretrained"] = str(tmp_path / "unet")
    proc = run_cli(raw, tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "generator.pretrained" in lines[0] and "image size 32x32 != 28x28" in lines[0], lines


@pytest.mark.gpu
def test_a_cuda_run_gives_the_same_kind_of_results_as_a_cpu_run(tmp_path, config_dict):
    """Not bit-identical (CUDA arithmetic differs), so a statistical check: FedDPD on Fashion-MNIST-style IDX
    files, 4 seeds on each device; the paired per-seed top-1 differences must have a 95% t-CI containing
    0 or lying within 5 points."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    from scipy import stats

    write_idx(str(tmp_path / "data"), per_class=60)
    top1 = {}
    for device in ("cpu", "cuda"):
        for seed in range(4):
            raw = tiny_config(config_dict, tmp_path, "fashion_mnist", "cnn_small", max_per_class=60)
            raw["common_args"]["random_seed"] = seed
            raw["device_args"] = {"using_gpu": device == "cuda"}
            raw["generator"].update(pretrain_steps=200, cache_dir=str(tmp_path / f"gen_{device}"))
            raw["run_args"]["output_dir"] = str(tmp_path / f"runs_{device}_{seed}")
            proc = run_cli(raw, tmp_path, f"{device}{seed}.yaml")
            assert proc.returncode == 0, proc.stderr[-2000:]
            (folder,) = (tmp_path / f"runs_{device}_{seed}").iterdir()
            top1[device, seed] = json.loads((folder / "metrics.json").read_text())["final"]["top1"]
    diffs = np.array([top1["cuda", s] - top1["cpu", s] for s in range(4)])
    low, high = stats.t.interval(0.95, len(diffs) - 1, loc=diffs.mean(), scale=stats.sem(diffs) + 1e-12)
    assert (low <= 0 <= high) or max(abs(low), abs(high)) <= 0.05, (diffs, low, high)
