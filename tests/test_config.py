"""Each bad input stops the run with one line naming the key and what is allowed."""
import subprocess
import sys

import pytest
import yaml

from fedml_feddpd.cli import main
from fedml_feddpd.config import ConfigError, load_config, validate

BAD_INPUTS = [
    # (section, key, value, expected fragment of the message)
    ("train_args", "federated_optimizer", "FedFoo", "train_args.federated_optimizer: expected one of FedAvg, FedProx"),
    ("data_args", "partition_alpha", -0.5, "data_args.partition_alpha: expected a number in (0, inf), got -0.5"),
    ("data_args", "partition_alpha", 0, "data_args.partition_alpha: expected a number in (0, inf), got 0"),
    ("data_args", "imbalance_factor", 0.5, "data_args.imbalance_factor: expected a number in [1, inf), got 0.5"),
    ("train_args", "comm_round", "ten", "train_args.comm_round: expected an integer >= 1, got 'ten'"),
    ("train_args", "learning_rate", True, "train_args.learning_rate: expected a number in (0, inf), got True"),
    ("train_args", "client_num_per_round", 20, "train_args.client_num_per_round: expected at most client_num_in_total (4), got 20"),
    ("data_args", "dataset", "imagenet", "data_args.dataset: expected one of digits, fashion_mnist, mnist, femnist, cifar10, got 'imagenet'"),
    ("comm_args", "backend", "NCCL", "comm_args.backend: expected one of sp"),
    ("tracking_args", "enable_wandb", True, "tracking_args.enable_wandb: expected false"),
    ("model_args", "model", "resnet56", "model_args.model: 'resnet56' does not fit dataset 'digits'"),
    ("data_args", "public_fraction", 1.5, "data_args.public_fraction: expected a number in (0, 1), got 1.5"),
    ("feddpd", "supplement_ratio", -0.1, "feddpd.supplement_ratio: expected a number in [0, inf), got -0.1"),
    ("feddpd", "tau", 1.5, "feddpd.tau: expected a number in [0, 1], or auto (1/C), got 1.5"),
    ("feddpd", "tau", -0.2, "feddpd.tau: expected a number in [0, 1], or auto (1/C), got -0.2"),
    ("feddpd", "keep_previous", 1.0, "feddpd.keep_previous: expected a number in [0, 1), got 1.0"),
    ("feddpd", "decay", 0.0, "feddpd.decay: expected a number in (0, 1], got 0.0"),
    ("feddpd", "tau", "half", "feddpd.tau: expected a number in [0, 1], or auto (1/C), got 'half'"),
    ("feddpd", "schedule", "weekly", "feddpd.schedule: expected one of exponential, periodic, got 'weekly'"),
    ("feddpd", "selection", "kl", "feddpd.selection: expected one of loss_gap, discrepancy, random, got 'kl'"),
    ("feddpd", "delivery", "mail", "feddpd.delivery: expected one of auto, client, server, got 'mail'"),
    ("dpo_args", "loss_type", "kto", "dpo_args.loss_type: expected one of sigmoid, hinge, ipo, got 'kto'"),
    ("run_args", "checkpoint_every", -1, "run_args.checkpoint_every: expected an integer >= 0, got -1"),
]


@pytest.mark.parametrize("section,key,value,message", BAD_INPUTS, ids=[f"{b[1]}={b[2]}" for b in BAD_INPUTS])
def test_bad_value_names_key(config_dict, section, key, value, message):
    config_dict.setdefault(section, {})[key] = value
    with pytest.raises(ConfigError) as err:
        validate(config_dict, "x.yaml")
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_missing_required_key(config_dict):
    del config_dict["data_args"]["dataset"]
    with pytest.raises(ConfigError, match=r"^data_args.dataset: missing; expected one of digits"):
        validate(config_dict)


def test_unknown_key_suggests_spelling(config_dict):
    config_dict["data_args"]["partition_alfa"] = 0.3
    with pytest.raises(ConfigError, match=r"data_args.partition_alfa: unknown key \(did you mean 'partition_alpha'\?\)"):
        validate(config_dict)


def test_unknown_section(config_dict):
    config_dict["trian_args"] = {}
    with pytest.raises(ConfigError, match=r"trian_args: unknown section \(did you mean 'train_args'\?\)"):
        validate(config_dict)


def test_yaml_that_is_not_a_mapping(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="expected a YAML mapping of sections"):
        load_config(path)


def test_invalid_yaml_and_missing_file(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("train_args: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)
    with pytest.raises(ConfigError, match="file not found"):
        load_config(tmp_path / "nope.yaml")


def test_fedml_dataset_missing_files_fail_before_download(tmp_path):
    from fedml_feddpd.data.fedml_datasets import check_files

    with pytest.raises(ConfigError, match=r"dataset 'mnist' needs MNIST.zip, MNIST/train/\*.json"):
        check_files("mnist", str(tmp_path))
    with pytest.raises(ConfigError, match="fed_emnist_train.h5"):
        check_files("femnist", str(tmp_path))


def test_valid_config_fills_defaults(config_dict):
    del config_dict["data_args"]["min_client_size"]
    cfg = validate(config_dict)
    assert cfg["min_client_size"] == 10 and cfg["fedprox_mu"] == 0.1
    assert isinstance(cfg["imbalance_factor"], float)


def test_server_delivery_keeps_no_previous_supplement(config_dict):
    """Under delivery: server a client holds no supplement, so none of it can be kept."""
    config_dict["train_args"]["federated_optimizer"] = "FedDPD"
    config_dict["feddpd"] = {"delivery": "server", "keep_previous": 0.5}
    with pytest.raises(ConfigError, match=r"^feddpd.keep_previous: expected 0 with delivery: server .*got 0.5$"):
        validate(config_dict)
    config_dict["feddpd"]["keep_previous"] = 0.0
    assert validate(config_dict).sections["feddpd"]["delivery"] == "server"


@pytest.mark.parametrize("optimizer,supplement,expected", [
    ("FedDPD", "none", "server"), ("FedAvg", "FedDPD", "server"), ("FedOpt", "FedDPD", "server"),
    ("FedProx", "FedDPD", "server"), ("FedNova", "FedDPD", "client"), ("SCAFFOLD", "FedDPD", "client"),
    ("FedDiff", "none", "client"), ("Balance", "none", "client"), ("FedAvg", "none", "client")])
def test_auto_delivery_is_the_methods_own(config_dict, optimizer, supplement, expected):
    """delivery: auto resolves to server for FedDPD wherever clients upload parameters (FedNova and SCAFFOLD upload
    updates), and to client for the other supplement methods; the resolved config names it."""
    config_dict["train_args"].update(federated_optimizer=optimizer, supplement=supplement)
    config_dict["feddpd"] = {"supplement_weight": 1.0}
    assert validate(config_dict).sections["feddpd"]["delivery"] == expected


def test_cli_prints_one_line_and_exits_2(tmp_path, config_dict, capsys):
    config_dict["data_args"]["partition_alpha"] = -1
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(config_dict))
    assert main(["run", "--cf", str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "feddpd: error: data_args.partition_alpha: expected a number in (0, inf), got -1"
    assert not (tmp_path / "out").exists()


def test_module_entry_exit_status(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "fedml_feddpd", "run", "--cf", str(tmp_path / "none.yaml")],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("feddpd: error: --cf ")


def test_too_many_clients_for_the_data_is_one_line(tmp_path, config_dict, capsys):
    config_dict["train_args"].update(client_num_in_total=60, client_num_per_round=60)
    path = tmp_path / "many.yaml"
    path.write_text(yaml.safe_dump(config_dict))
    assert main(["run", "--cf", str(path), "--out", str(tmp_path / "out"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("feddpd: error: train_args.client_num_in_total: 60 clients x 10 samples each exceeds")
    assert not (tmp_path / "out").exists()
