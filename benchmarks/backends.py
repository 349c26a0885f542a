"""Wall time, communication bytes and per-process CPU of one config on sp, MPI and gRPC (silo-local).

    python -m benchmarks.backends --cf configs/digits_feddpd.yaml --set train_args.comm_round=25 --out runs/backends

Every backend runs the same config (seed, split, method) as separate `python -m fedml_feddpd` commands;
the script samples the CPU seconds of every process it started (psutil) and writes `backends.json`
and a markdown table. Waiting parties should cost almost no CPU: FedML's own receive loops poll.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil
import yaml

ROOT = Path(__file__).resolve().parents[1]


def _set(raw: dict, item: str) -> None:
    key, value = item.split("=", 1)
    section, name = key.split(".")
    raw.setdefault(section, {})[name] = yaml.safe_load(value)


def _run(cmd: list[str], cwd: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    cpu: dict[int, tuple[str, float]] = {}
    root = psutil.Process(proc.pid)
    while proc.poll() is None:
        try:
            for p in [root] + root.children(recursive=True):
                try:
                    t = p.cpu_times()
                    cpu[p.pid] = (" ".join(p.cmdline()), t.user + t.system)
                except psutil.Error:
                    pass
        except psutil.Error:
            pass
        time.sleep(1.0)
    out = proc.stdout.read()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{out[-3000:]}")
    return {"wall_seconds": time.perf_counter() - start, "cpu": cpu, "output": out}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cf", default=str(ROOT / "configs" / "digits_feddpd.yaml"))
    ap.add_argument("--set", action="append", default=[], help="section.key=value")
    ap.add_argument("--out", default="runs/backends")
    ap.add_argument("--backends", nargs="+", default=["sp", "MPI", "GRPC"])
    a = ap.parse_args(argv)
    out = Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    base = yaml.safe_load(open(a.cf))
    base.setdefault("run_args", {})["baseline"] = "none"
    for item in a.set:
        _set(base, item)
    clients = base["train_args"]["client_num_per_round"]
    rows = {}
    for backend in a.backends:
        raw = json.loads(json.dumps(base))
        raw.setdefault("comm_args", {})["backend"] = backend
        raw["common_args"]["training_type"] = "cross_silo" if backend == "GRPC" else "simulation"
        cf = out / f"{backend}.yaml"
        cf.write_text(yaml.safe_dump(raw))
        run_dir = out / backend
        shutil.rmtree(run_dir, ignore_errors=True)
        py = [sys.executable, "-m", "fedml_feddpd"]
        if backend == "sp":
            cmd = py + ["run", "--cf", str(cf), "--out", str(run_dir), "--no-progress"]
        elif backend == "MPI":
            cmd = ["mpirun", "--allow-run-as-root", "--oversubscribe", "--mca", "btl", "self,vader",
                   "--mca", "btl_vader_single_copy_mechanism", "none", "-np", str(clients + 1)] + py + [
                "run", "--cf", str(cf), "--out", str(run_dir), "--no-progress"]
        else:
            cmd = py + ["silo-local", "--cf", str(cf), "--out", str(run_dir), "--no-progress"]
        print(f"== {backend}: {' '.join(cmd)}", flush=True)
        measured = _run(cmd, out)
        metrics = json.loads((run_dir / "metrics.json").read_text())
        rounds = metrics["rounds"]
        parties = {pid: c for pid, c in measured["cpu"].items() if "fedml_feddpd" in c[0]}
        rows[backend] = {
            "command": " ".join(cmd),
            "wall_seconds": measured["wall_seconds"],
            "run_wall_seconds": metrics["wall_seconds"],
            "final_top1": metrics["final"]["top1"],
            "client_seconds_total": metrics["client_seconds_total"],
            "server_seconds_total": metrics["server_seconds_total"],
            "comm_per_round": {r["round"]: r.get("comm") for r in rounds},
            "comm_bytes_total": metrics.get("comm_bytes_total"),
            "comm_after_last_round": metrics.get("comm_after_last_round"),
            "process_cpu_seconds": sorted(round(c[1], 1) for c in parties.values()),
        }
        print(json.dumps({k: v for k, v in rows[backend].items() if k != "comm_per_round"}), flush=True)
    (out / "backends.json").write_text(json.dumps(rows, indent=1))
    lines = ["| backend | wall s (command) | final top-1 | client s | server s | model bytes down / up per round "
             "| supplement bytes (rounds that carry one) | CPU s per process |", "|---|---|---|---|---|---|---|---|"]
    for b, r in rows.items():
        comm = [c for c in r["comm_per_round"].values() if c]
        model = (f"{comm[0]['down_model_bytes']:,} / {comm[0]['up_model_bytes']:,}" if comm else "in-process")
        sup = ", ".join(f"round {k}: {c['down_supplement_bytes']:,}" for k, c in r["comm_per_round"].items()
                        if c and c["down_supplement_bytes"]) or "-"
        lines.append(f"| {b} | {r['wall_seconds']:.0f} | {r['final_top1']:.4f} | {r['client_seconds_total']:.0f} | "
                     f"{r['server_seconds_total']:.0f} | {model} | {sup} | {r['process_cpu_seconds']} |")
    (out / "backends.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
