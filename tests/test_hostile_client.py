"""A certified but hostile gRPC client cannot poison or stop the federation (fedml_feddpd/uploads.py).

`silo-local` with 3 clients over mutual TLS; client rank 2 holds a valid certificate and uploads, in turn, NaN
weights (round 1), a model of another shape (round 2) and a sample count of 10**12 (round 3), and honest uploads in
rounds 0 and 4. The run finishes, every global model is finite, metrics.json records each rejection, and the honest
clients' model is that of the run without the hostile client's rejected uploads.

The reference, and the tolerance: an sp run of the same config in which client 1's uploads of rounds 1-3 are left
out of the average (its honest rounds 0 and 4 count, as on gRPC). A rejected upload is simply absent and every
backend computes the same average bit for bit (tests/test_distributed.py), so the tolerance is zero: every round's
top-1, loss and per-class accuracy are equal. (Against the run in which rank 2 is honest throughout, the final
top-1 differs by noise only: over seeds 0-4 of this config, -0.08..+0.11 on digits' 163 test images, where one
binomial standard error of a difference of two top-1s near 0.6 is sqrt(2 * 0.6 * 0.4 / 163) = 0.054; a NaN global
model would give a NaN loss, which the test rules out every round.)
"""
import json
import math
import subprocess
import sys

import yaml

from conftest import hook_env

# Imported by every party through PYTHONPATH (sitecustomize.py). In the client process of the rank FEDDPD_TEST_HOSTILE
# names ("rank:round=kind,..."), once fedml_feddpd.distributed.silo_client is imported, its manager's send_message
# replaces the upload of each named round: NaN weights, another shape, or 10**12 samples.
HOSTILE_HOOK = '''
import os, sys
plan = os.environ.get("FEDDPD_TEST_HOSTILE", "")
rank, _, rounds = plan.partition(":")
if plan and "client" in sys.argv and "--rank" in sys.argv and sys.argv[sys.argv.index("--rank") + 1] == rank:
    import importlib.abc, importlib.util
    kinds = {int(r): kind for r, kind in (item.split("=") for item in rounds.split(","))}

    def patch(module):
        import torch
        from fedml.cross_silo.server.message_define import MyMessage as M
        send = module.FedDPDSiloClientManager.send_message

        def hostile_send(self, message):
            kind = kinds.get(self.round_idx)
            if message.get_type() == M.MSG_TYPE_C2S_SEND_MODEL_TO_SERVER and kind:
                model = message.get(M.MSG_ARG_KEY_MODEL_PARAMS)
                if kind == "nan":
                    model = type(model)((k, torch.full_like(v, float("nan"))) for k, v in model.items())
                elif kind == "shape":
                    first = next(iter(model))
                    model[first] = torch.zeros(model[first].shape[0] + 1, *model[first].shape[1:])
                elif kind == "samples":
                    message.add_params(M.MSG_ARG_KEY_NUM_SAMPLES, 10**12)
                message.add_params(M.MSG_ARG_KEY_MODEL_PARAMS, model)
                print(f"hostile: round {self.round_idx}: {kind}", flush=True)
            return send(self, message)

        module.FedDPDSiloClientManager.send_message = hostile_send

    class PatchOnImport(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name != "fedml_feddpd.distributed.silo_client":
                return None
            sys.meta_path.remove(self)
            spec = importlib.util.find_spec(name)
            load = spec.loader.exec_module
            spec.loader.exec_module = lambda module: (load(module), patch(module))
            return spec

    sys.meta_path.insert(0, PatchOnImport())
'''

HOSTILE_RANK, CLIENT_OF_RANK = 2, 1  # rank r trains client r - 1 (every client every round)
PLAN = {1: "nan", 2: "shape", 3: "samples"}
REASONS = {1: "features.0.weight holds NaN or infinite values",
           2: "features.0.weight has shape [17, 1, 3, 3], the model's is [16, 1, 3, 3]",
           3: "its sample count 1000000000000 is above train_args.max_client_samples = 5000"}


def _config(config_dict, tmp_path, backend):
    raw = json.loads(json.dumps(config_dict))
    raw["common_args"]["training_type"] = "cross_silo" if backend == "GRPC" else "simulation"
    raw["comm_args"] = {"backend": backend, **({"comm_timeout_s": 120} if backend == "GRPC" else {})}
    # digits' clients hold a few hundred samples each; 5000 leaves every honest count far inside the bound
    raw["train_args"].update(client_num_in_total=3, client_num_per_round=3, comm_round=5, epochs=2,
                             max_client_samples=5000)
    cf = tmp_path / f"{backend}.yaml"
    cf.write_text(yaml.safe_dump(raw))
    return cf


def test_a_hostile_client_is_rejected_and_the_run_finishes(config_dict, tmp_path, monkeypatch):
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(HOSTILE_HOOK)
    plan = f"{HOSTILE_RANK}:" + ",".join(f"{r}={kind}" for r, kind in PLAN.items())
    env = hook_env(hooks, FEDDPD_TEST_HOSTILE=plan)
    attacked = tmp_path / "attacked"
    proc = subprocess.run([sys.executable, "-m", "fedml_feddpd", "silo-local", "--cf",
                           str(_config(config_dict, tmp_path, "GRPC")), "--out", str(attacked), "--no-progress"],
                          capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]

    from fedml_feddpd import fedml_compat
    from fedml_feddpd.cli import main

    aggregate = fedml_compat.RoundHooks._aggregate

    def without_rejected(self, w_locals):  # sp's average with client 1's uploads of the hostile rounds left out
        if self.round_idx in PLAN:
            keep = [i for i, c in enumerate(self.round_clients) if c != CLIENT_OF_RANK]
            self.round_clients, w_locals = [self.round_clients[i] for i in keep], [w_locals[i] for i in keep]
        return aggregate(self, w_locals)

    monkeypatch.setattr(fedml_compat.RoundHooks, "_aggregate", without_rejected)
    reference = tmp_path / "reference"
    assert main(["run", "--cf", str(_config(config_dict, tmp_path, "sp")), "--out", str(reference),
                 "--no-progress"]) == 0

    rounds = json.loads((attacked / "metrics.json").read_text())["rounds"]
    assert len(rounds) == 5
    for r, ref in zip(rounds, json.loads((reference / "metrics.json").read_text())["rounds"]):
        assert math.isfinite(r["test_loss"]) and math.isfinite(r["train_loss"]), r  # the global model stayed finite
        assert r["missing_clients"] == []
        if r["round"] in PLAN:
            assert r["rejected_uploads"] == {str(CLIENT_OF_RANK): REASONS[r["round"]]}, r["rejected_uploads"]
            assert r["clients"] == [0, 2]
        else:  # its honest uploads count
            assert r["rejected_uploads"] == {} and r["clients"] == [0, 1, 2]
        for key in ("clients", "top1", "test_loss", "train_loss", "per_class_accuracy"):
            assert r[key] == ref[key], (r["round"], key, r[key], ref[key])
