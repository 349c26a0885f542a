"""FedDPD and the baselines on FedML's distributed backends: MPI simulation (`mpi.py`) and gRPC cross-silo
(`silo.py` starts a party; `silo_transport.py`, `silo_server.py`, `silo_client.py`, `silo_local.py`,
`ipconfig.py`). What both share lives in `common.py`."""
from __future__ import annotations


def run_distributed(cfg, out_dir=None, show_progress: bool = True, resume: bool = False):
    """`python -m fedml_feddpd run` with a non-sp backend: one MPI rank, or a whole local gRPC run."""
    if cfg["backend"] == "MPI":
        from .mpi import run_mpi

        return run_mpi(cfg, out_dir, show_progress, resume)
    from .silo_local import run_silo_local

    return run_silo_local(cfg, out_dir, show_progress, resume)
