"""Imported first in a subprocess: any socket connection or DNS lookup off this machine raises."""
import ipaddress
import socket

ATTEMPTS = []


class NetworkUsed(RuntimeError):
    pass


def _local(host) -> bool:
    if host in (None, "", "localhost"):
        return True
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return False


def _check(address):
    if isinstance(address, tuple) and not _local(address[0]):
        ATTEMPTS.append(address)
        raise NetworkUsed(f"network access attempted: {address}")


_connect, _connect_ex, _getaddrinfo = socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo


def connect(self, address):
    _check(address)
    return _connect(self, address)


def connect_ex(self, address):
    _check(address)
    return _connect_ex(self, address)


def getaddrinfo(host, *args, **kwargs):
    if not _local(host if isinstance(host, str) else None if host is None else str(host)):
        ATTEMPTS.append((host,))
        raise NetworkUsed(f"DNS lookup attempted: {host}")
    return _getaddrinfo(host, *args, **kwargs)


socket.socket.connect = connect
socket.socket.connect_ex = connect_ex
socket.getaddrinfo = getaddrinfo
