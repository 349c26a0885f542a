"""FedML's gRPC ip config: `eid,rank,grpc_server_ip,grpc_server_port`, one row per party, eid 0 the server.

FedML reads it without checks (core/distributed/communication/grpc/grpc_comm_manager.py:212-228) and binds
a rank missing from it to 0.0.0.0 (:72-80). Here a user's file is validated first, and when the config
names none, one is generated on the loopback interface: addresses other than 127.0.0.1 appear only when
the user wrote them.
"""
from __future__ import annotations

import csv
import ipaddress
import os
import socket
from pathlib import Path

from ..errors import ConfigError

COLUMNS = ("eid", "rank", "grpc_server_ip", "grpc_server_port")
LOOPBACK = "127.0.0.1"
# A peer that has not been heard from at all may still be starting (importing FedML takes ~10 s, more on a
# loaded machine): until its first message it gets at least this long.
STARTUP_GRACE_S = 120.0
DEFAULT_BASE_PORT = 8890  # FedML's CommunicationConstants.GRPC_BASE_PORT: party r listens on 8890 + r


def check_party(role: str, rank: int, clients: int) -> None:
    """`silo --role R --rank N`: the server is rank 0, clients 1..client_num_per_round."""
    if role == "server" and rank != 0:
        raise ConfigError(f"--rank {rank}: the server is rank 0")
    if role == "client" and not 1 <= rank <= clients:
        raise ConfigError(f"--rank {rank}: expected a client rank in 1..{clients} "
                          f"(train_args.client_num_per_round = {clients})")


def free_ports(n: int) -> list[int]:
    """n distinct TCP ports the kernel reports free on the loopback interface right now."""
    socks, ports = [], []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((LOOPBACK, 0))
            socks.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    return ports


def write_ipconfig(path: str | os.PathLike, ports: list[int], host: str = LOOPBACK) -> Path:
    path = Path(path)
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(COLUMNS)
        for rank, port in enumerate(ports):
            w.writerow([rank, rank, host, port])
    return path


def generate_ipconfig(folder: str | os.PathLike, parties: int, fixed_ports: bool = False) -> Path:
    """A loopback ip config for the server and `parties - 1` clients: free ports, or FedML's
    8890 + rank when every party must derive the same file on its own (`silo` without a file)."""
    ports = [DEFAULT_BASE_PORT + r for r in range(parties)] if fixed_ports else free_ports(parties)
    return write_ipconfig(Path(folder) / "grpc_ipconfig.csv", ports)


def read_ipconfig(path: str | os.PathLike, parties: int) -> dict[int, tuple[str, int]]:
    """Rank -> (ip, port) of a user's file, for ranks 0..parties-1; a bad file is a one-line ConfigError
    naming the file and the problem."""
    where = f"comm_args.grpc_ipconfig_path {os.fspath(path)}"
    if not os.path.isfile(path):
        raise ConfigError(f"{where}: file not found; expected a CSV with columns {','.join(COLUMNS)}")
    try:
        with open(path, newline="") as fh:
            reader = csv.DictReader(fh)
            missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
            if missing:
                raise ConfigError(f"{where}: missing column(s) {', '.join(missing)}; expected header "
                                  f"{','.join(COLUMNS)}")
            rows = list(reader)
    except (UnicodeDecodeError, csv.Error) as exc:  # not UTF-8, a NUL byte, a field over csv's size limit
        raise ConfigError(f"{where}: not a CSV text file ({' '.join(str(exc).split())[:100]})") from None
    table: dict[int, tuple[str, int]] = {}
    seen_at: dict[int, int] = {}
    for line, row in enumerate(rows, start=2):
        try:
            eid, rank = int(row["eid"]), int(row["rank"])
        except (TypeError, ValueError):
            raise ConfigError(f"{where} line {line}: eid and rank must be integers, got "
                              f"{row['eid']!r}, {row['rank']!r}") from None
        if eid != rank:
            raise ConfigError(f"{where} line {line}: eid {eid} differs from rank {rank}; FedML addresses parties "
                              f"by eid, so they must be equal")
        if rank in seen_at:
            raise ConfigError(f"{where} line {line}: rank {rank} appears twice (also line {seen_at[rank]})")
        if not 0 <= rank < parties:
            raise ConfigError(f"{where} line {line}: rank {rank} is out of range; this run has ranks 0..{parties - 1} "
                              f"(server 0, clients 1..{parties - 1})")
        ip = (row["grpc_server_ip"] or "").strip()
        try:
            ipaddress.ip_address(ip)
        except ValueError:
            raise ConfigError(f"{where} line {line}: grpc_server_ip {ip!r} is not an IP address") from None
        try:
            port = int(row["grpc_server_port"])
        except (TypeError, ValueError):
            port = -1
        if not 1 <= port <= 65535:
            raise ConfigError(f"{where} line {line}: grpc_server_port {row['grpc_server_port']!r} is not a port "
                              f"(1..65535)")
        seen_at[rank] = line
        table[rank] = (ip, port)
    absent = [r for r in range(parties) if r not in table]
    if absent:
        raise ConfigError(f"{where}: rank(s) {', '.join(map(str, absent))} missing; this run needs ranks "
                          f"0..{parties - 1} (server 0, one client per train_args.client_num_per_round)")
    endpoints = {}
    for rank, endpoint in table.items():
        if endpoint in endpoints:
            raise ConfigError(f"{where}: ranks {endpoints[endpoint]} and {rank} share {endpoint[0]}:{endpoint[1]}")
        endpoints[endpoint] = rank
    return table
