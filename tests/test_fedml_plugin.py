"""The plugin inside FedML's own entry points (fedml_plugin.py): FedML's quick-start script runs FedDPD."""
import json
import os
import subprocess
import sys

import yaml

from conftest import ROOT, shrink

GUARDED_QUICKSTART = """
import runpy, sys
sys.path.insert(0, {tests!r})
import network_guard
sys.argv = ["fedml_quickstart.py", "--cf", {cf!r}]
runpy.run_path({script!r}, run_name="__main__")
sys.__stdout__.write(f"network attempts: {{network_guard.ATTEMPTS}}\\n")  # fedml.init redirects print
sys.exit(0 if not network_guard.ATTEMPTS else 3)
"""


def test_fedmls_quickstart_script_runs_feddpd_offline(tmp_path):
    """examples/fedml_quickstart.py is FedML's five-line script plus `import fedml_feddpd`: it runs FedDPD
    (generator, TRL's DPO, PEFT) on the embedded digits through FedMLRunner on sp, with no network."""
    raw = shrink(yaml.safe_load(open(os.path.join(ROOT, "configs", "digits_feddpd.yaml"))))
    raw["train_args"].update(client_num_per_round=2, epochs=1)
    raw["feddpd"].update(dpo_rounds=1, warmup_rounds=0, supplement_every=1, tau=0.0, bank_per_class=4)
    raw["generator"].update(pretrain_steps=5, sample_steps=3, cache_dir=str(tmp_path / "gen"))
    raw["dpo_args"].update(max_steps=2, batch_size=2, learning_rate=0.5)  # must not reach train_args
    raw.setdefault("run_args", {})["output_dir"] = str(tmp_path / "runs")
    cf = tmp_path / "quick.yaml"
    cf.write_text(yaml.safe_dump(raw))
    code = GUARDED_QUICKSTART.format(tests=os.path.join(ROOT, "tests"), cf=str(cf),
                                     script=os.path.join(ROOT, "examples", "fedml_quickstart.py"))
    env = {**os.environ, "HOME": str(tmp_path), "PYTHONPATH": ROOT}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env,
                          timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "network attempts: []" in out
    metrics = json.loads((tmp_path / "runs" / "quick_seed0" / "metrics.json").read_text())
    assert metrics["method"] == "FedDPD" and len(metrics["rounds"]) == 2
    assert metrics["rounds"][0]["server_step"]["server_stage_seconds"]["dpo"] > 0  # TRL really ran
    assert metrics["config"]["train_args"]["learning_rate"] == raw["train_args"]["learning_rate"]

    # the same config through `python -m fedml_feddpd run`'s path gives the same rounds, bit for bit
    from fedml_feddpd.config import validate
    from fedml_feddpd.runner import run

    cli = run(validate(raw, str(cf)), tmp_path / "cli", show_progress=False)
    keys = ("round", "clients", "top1", "balanced_accuracy", "train_loss", "test_loss")
    assert [[r.get(k) for k in keys] for r in cli["rounds"]] == [[r.get(k) for k in keys] for r in metrics["rounds"]]


def test_hooks_hand_fedmls_own_names_back_to_fedml():
    import fedml
    import fedml.data
    import fedml.model

    import fedml_feddpd
    from fedml_feddpd import fedml_plugin, methods

    fedml_feddpd.register()
    assert fedml_plugin._registered
    assert fedml.data.load.__wrapped__ is not None and fedml.model.create.__wrapped__ is not None
    assert "FedDPD" in fedml_plugin.plugin_methods() and "FedAvg" not in fedml_plugin.plugin_methods()
    assert set(fedml_plugin.plugin_methods()) <= set(methods.REGISTRY)


def test_importing_the_package_leaves_fedml_unimported():
    """`import fedml_feddpd` stays fast: it registers with FedML only once FedML itself is imported."""
    code = ("import sys, fedml_feddpd; assert 'fedml' not in sys.modules; import fedml; "
            "from fedml_feddpd import fedml_plugin; assert fedml_plugin._registered; print('ok')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120,
                          env={**os.environ, "PYTHONPATH": ROOT})
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-2000:]


def test_fedmls_cross_silo_entry_points_run_a_plugin_method(tmp_path):
    """The same script as a cross-silo server and two clients (`--role`, `--rank`, FedML's own flags):
    FedMLRunner hands the plugin's method to the plugin's gRPC parties (fedml_plugin.PluginSiloParty)."""
    from fedml_feddpd.distributed.ipconfig import generate_ipconfig

    raw = yaml.safe_load(open(os.path.join(ROOT, "configs", "digits_feddpd_silo.yaml")))
    raw["train_args"].update(comm_round=2, epochs=1, client_num_in_total=2, client_num_per_round=2,
                             federated_optimizer="FedLC")
    raw["data_args"]["partition_alpha"] = 1.0
    raw["comm_args"].update(comm_timeout_s=120, grpc_ipconfig_path=str(generate_ipconfig(tmp_path, 3)))
    raw.setdefault("run_args", {})["output_dir"] = str(tmp_path / "runs")
    cf = tmp_path / "silo.yaml"
    cf.write_text(yaml.safe_dump(raw))
    script = os.path.join(ROOT, "examples", "fedml_quickstart.py")
    env = {**os.environ, "HOME": str(tmp_path), "PYTHONPATH": ROOT}
    procs = [subprocess.Popen([sys.executable, script, "--cf", str(cf), "--rank", str(rank), "--role",
                               "server" if rank == 0 else "client"], cwd=tmp_path, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for rank in range(3)]
    try:
        outs = [p.communicate(timeout=300)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert all(p.returncode == 0 for p in procs), "\n".join(o[-1500:] for o in outs)
    metrics = json.loads((tmp_path / "runs" / "silo_seed0" / "metrics.json").read_text())
    assert metrics["method"] == "FedLC" and metrics["backend"] == "GRPC" and len(metrics["rounds"]) == 2
    assert all(r["clients_trained_on"] for r in metrics["rounds"])  # both rounds heard from the clients
