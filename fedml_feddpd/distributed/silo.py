"""FedDPD and the baselines on FedML's gRPC cross-silo backend (`training_type: cross_silo`, `backend: GRPC`).

    python -m fedml_feddpd silo --role server --rank 0 --cf CONFIG      # one party
    python -m fedml_feddpd silo --role client --rank 1 --cf CONFIG
    python -m fedml_feddpd silo-local --cf CONFIG                       # server + clients on 127.0.0.1
    ... --resume (silo-local, or the server's silo): continue from the server's last checkpoint

FedML's cross-silo server and client managers run the rounds; our subclasses are split by role:
silo_transport.py (the gRPC comm manager), silo_server.py, silo_client.py, and silo_local.py (the local
launcher). This module starts one party.
"""
from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path
from typing import Optional

from ..checkpoint import server_resume_state  # noqa: F401 (silo_local imports it from here)
from ..errors import PartyError
from ..outputs import default_out_dir, write_outputs
from .common import open_party
from .ipconfig import check_party, generate_ipconfig, read_ipconfig
from .tls import transport_security



def resolve_ipconfig(cfg, override: Optional[str] = None, folder: Optional[str] = None) -> str:
    """The ip config every party reads: the user's (validated), or FedML's 8890 + rank on 127.0.0.1."""
    parties = cfg["client_num_per_round"] + 1
    path = override or cfg["grpc_ipconfig_path"]
    if path:
        read_ipconfig(path, parties)
        return os.path.abspath(path)
    folder = folder or tempfile.mkdtemp(prefix="feddpd-grpc-")
    return str(generate_ipconfig(folder, parties, fixed_ports=True))


def run_silo_party(cfg, role: str, rank: int, out_dir=None, ipconfig: Optional[str] = None,
                   show_progress: bool = True, args=None, data=None, model=None, resume: bool = False):
    """One cross-silo party, to the end of the run. The server returns the result dict and writes the
    outputs; a client returns None. Failures raise PartyError (one line) after gRPC is stopped.
    `args`, `data`, `model`: from FedML's own entry points (fedml_plugin.py). `resume`: the server continues
    from the checkpoint in its output folder (a client needs nothing: the server sends it the resumed round)."""
    clients = cfg["client_num_per_round"]
    check_party(role, rank, clients)
    out = Path(out_dir) if out_dir else default_out_dir(cfg)
    state = None
    if role == "server":
        kind, state = server_resume_state(cfg, out, resume)
        if kind == "finished":
            print(f"feddpd: {out} holds a finished run; nothing to resume (clients started for it stop after "
                  f"comm_args.comm_timeout_s)", file=sys.stderr, flush=True)
            return state
    path = resolve_ipconfig(cfg, ipconfig)
    # mutual TLS (comm_args.tls), or plaintext where allowed; a one-line ConfigError before FedML starts
    tls = transport_security(cfg, read_ipconfig(path, clients + 1), rank, path)
    extra = {"grpc_ipconfig_path": path, "worker_num": clients, "comm": None, "feddpd_tls": tls,
             # send_init_msg would describe the model to MLOps (fedml_server_manager.py:75-76)
             "skip_log_model_net": True}
    if args is not None:
        for key, value in extra.items():
            setattr(args, key, value)
    party = open_party(cfg, rank=rank, role=role, extra_args=extra, args=args, data=data, model=model)
    try:
        if role == "server":
            from .silo_server import run_server

            result = run_server(party, clients, show_progress, out, state)
            write_outputs(out, result, cfg)
            return result
        from .silo_client import run_client

        run_client(party, rank, clients)
        return None
    except PartyError:
        raise
    except Exception as exc:
        text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise PartyError(f"{role} rank {rank}: {type(exc).__name__}: {text}") from exc
