"""`feddpd silo-local`: a gRPC cross-silo run with the server and one process per client on this
machine; each party is `python -m fedml_feddpd silo ...`, and no party outlives the launcher.

The parties talk over mutual TLS: with throwaway certificates made in the work folder when the config
names none, or with the certificates of a `feddpd certs` folder (comm_args.tls.cert is its rank<r>.pem);
plaintext only with comm_args.allow_insecure: true."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ..errors import ConfigError, PartyError, PartyTimeout
from ..outputs import default_out_dir
from ..processes import die_with_parent
from .ipconfig import STARTUP_GRACE_S, generate_ipconfig, read_ipconfig
from .tls import cert_files, make_certs


def _party_configs(cfg, work: Path, parties: int) -> dict[int, Path]:
    """Each rank's config file: the run's config with that rank's comm_args.tls."""
    tls = cfg["tls"]
    if tls:  # a `feddpd certs` folder: each party takes its own rank<r>.pem / rank<r>.key
        folder = Path(tls["cert"]).parent
        files = {r: {**cert_files(folder, r), "ca_cert": tls["ca_cert"]} for r in range(parties)}
        missing = [p for f in files.values() for p in (f["cert"], f["key"]) if not os.path.isfile(p)]
        if missing:
            raise ConfigError(f"comm_args.tls.cert: silo-local runs every rank here and needs one certificate per "
                              f"rank next to {tls['cert']} (a `feddpd certs` folder); missing {missing[0]} "
                              f"(or leave comm_args.tls out for throwaway certificates)")
    elif cfg["allow_insecure"]:
        print("feddpd: warning: comm_args.allow_insecure: the parties talk in plaintext", file=sys.stderr, flush=True)
        files = {r: {} for r in range(parties)}
    else:
        make_certs(work / "certs", parties, days=7)
        files = {r: cert_files(work / "certs", r) for r in range(parties)}
    out = {}
    for rank, tls_r in files.items():
        sections = json.loads(json.dumps(cfg.sections))
        sections["comm_args"]["tls"] = tls_r
        out[rank] = work / f"config_rank{rank}.yaml"
        out[rank].write_text(type(cfg)(sections, cfg.source).to_yaml())
    return out


def _wait_listening(host: str, port: int, proc: subprocess.Popen, timeout_s: float) -> None:
    import socket

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.2)
    raise PartyTimeout(f"server rank 0 did not listen on {host}:{port} within {timeout_s:g} s of its start")


def _last_error(log: Path) -> str:
    lines = log.read_text(errors="replace").splitlines() if log.is_file() else []
    errors = [ln for ln in lines if ln.startswith("feddpd: error:")]
    return errors[-1][len("feddpd: error:"):].strip() if errors else (lines[-1].strip() if lines else "no output")


def run_silo_local(cfg, out_dir=None, show_progress: bool = True, resume: bool = False) -> dict:
    """Start the server and one process per client on this machine, wait for all of them, return the
    server's result. Each party is `python -m fedml_feddpd silo ...`; their logs go to a folder that is
    kept when the run fails. No party outlives this call. `resume`: the server continues from the checkpoint
    in `out_dir` (the clients start afresh; the server sends them what they need)."""
    clients = cfg["client_num_per_round"]
    out = Path(out_dir) if out_dir else default_out_dir(cfg)
    # a finished run, a method checkpoints cannot hold, a bad checkpoint: before any party starts
    from .silo import server_resume_state

    kind, found = server_resume_state(cfg, out, resume)
    if kind == "finished":
        return found
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.silo-", dir=out.parent))  # party logs, kept on failure
    if cfg["grpc_ipconfig_path"]:
        table = read_ipconfig(cfg["grpc_ipconfig_path"], clients + 1)
        csv_path = os.path.abspath(cfg["grpc_ipconfig_path"])
    else:
        csv_path = str(generate_ipconfig(work, clients + 1))
        table = read_ipconfig(csv_path, clients + 1)
    try:
        configs = _party_configs(cfg, work, clients + 1)
    except ConfigError:
        shutil.rmtree(work, ignore_errors=True)
        raise
    timeout_s = cfg["comm_timeout_s"]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[2]),
                                                        os.environ.get("PYTHONPATH")]))}
    procs: dict[int, subprocess.Popen] = {}
    logs: dict[int, Path] = {}

    def start(rank: int, role: str) -> None:
        cmd = [sys.executable, "-m", "fedml_feddpd", "silo", "--role", role, "--rank", str(rank),
               "--cf", str(configs[rank]), "--ipconfig", csv_path]
        if role == "server":
            cmd += ["--out", str(out)] + (["--resume"] if resume else [])
        if role != "server" or not show_progress:
            cmd.append("--no-progress")
        logs[rank] = work / f"rank{rank}_{role}.log"
        with open(logs[rank], "w") as log:
            procs[rank] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                           preexec_fn=die_with_parent)
        print(f"silo-local: {role} rank {rank} pid {procs[rank].pid} log {logs[rank]}", flush=True)

    def stop_all(grace: float = 5.0) -> None:
        for p in procs.values():
            if p.poll() is None:
                p.terminate()
        deadline = time.monotonic() + grace
        for p in procs.values():
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    previous = signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        start(0, "server")
        host, port = table[0]
        _wait_listening("127.0.0.1" if host in ("0.0.0.0", "::") else host, port, procs[0],
                        max(timeout_s, STARTUP_GRACE_S))
        for rank in range(1, clients + 1):
            start(rank, "client")
        reported = set()
        while procs[0].poll() is None:
            for rank, p in procs.items():
                if rank and rank not in reported and p.poll() not in (None, 0):
                    reported.add(rank)
                    print(f"silo-local: client rank {rank} exited with status {p.returncode}: "
                          f"{_last_error(logs[rank])}", file=sys.stderr, flush=True)
            time.sleep(0.2)
        if procs[0].returncode != 0:
            raise PartyError(f"server rank 0 failed: {_last_error(logs[0])} (logs in {work})")
        # After the server's last message every client finishes on its own; give them a moment.
        deadline = time.monotonic() + 30
        while any(p.poll() is None for p in procs.values()) and time.monotonic() < deadline:
            time.sleep(0.2)
        failed = {r: p.returncode for r, p in procs.items() if p.returncode not in (0, None)}
        if failed and cfg["round_timeout_s"] > 0:  # the server went on without them (reported above)
            failed = {}
        if failed:
            raise PartyError(f"client rank(s) {', '.join(map(str, failed))} failed: "
                             f"{_last_error(logs[min(failed)])} (logs in {work})")
        result = json.loads((out / "metrics.json").read_text())
        result["out_dir"] = str(out)
        shutil.rmtree(work, ignore_errors=True)  # kept only when the run fails
        return result
    finally:
        stop_all()
        signal.signal(signal.SIGTERM, previous)
