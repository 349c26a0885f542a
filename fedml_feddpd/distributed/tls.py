"""Mutual TLS for gRPC cross-silo runs: certificates (`feddpd certs`), each party's TLS material, and the
rule for when plaintext is allowed.

Every party holds the run's CA certificate and its own certificate and key, whose subject is
CN=feddpd-rank-<rank> (also a DNS name in its SAN, with localhost and 127.0.0.1). A party's server asks
every caller for a certificate signed by the CA (require_client_auth), and reads the caller's rank from
it; a party calling rank r checks that the peer's certificate names rank r (ssl_target_name_override),
whatever address the ip config gives. Plaintext is allowed only when every address of the ip config is
loopback, or with `comm_args.allow_insecure: true` (a one-line warning).
"""
from __future__ import annotations

import datetime
import ipaddress
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..config import TLS_KEYS
from ..errors import ConfigError

CN_PREFIX = "feddpd-rank-"
CA_NAME = "feddpd-ca"
_CN = re.compile(r"feddpd-rank-(0|[1-9][0-9]{0,8})")


def cn_for(rank: int) -> str:
    return f"{CN_PREFIX}{int(rank)}"


def rank_of_cn(cn) -> Optional[int]:
    """The rank a certificate's common name states, or None when it is not one of ours."""
    if isinstance(cn, bytes):
        cn = cn.decode("ascii", "replace")
    m = _CN.fullmatch(cn or "")
    return int(m[1]) if m else None


def cert_files(folder: str | os.PathLike, rank: int) -> dict[str, str]:
    """comm_args.tls of party `rank` for a folder written by `make_certs`."""
    folder = Path(folder)
    return {"ca_cert": str(folder / "ca.pem"), "cert": str(folder / f"rank{rank}.pem"),
            "key": str(folder / f"rank{rank}.key")}


def _write(path: Path, data: bytes, private: bool = False) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def make_certs(out: str | os.PathLike, parties: int, days: int = 365) -> list[Path]:
    """A CA and one certificate + key per rank 0..parties-1 in `out` (ca.pem, ca.key, rank<r>.pem,
    rank<r>.key; keys mode 0600). EC P-256 keys: fast to make and to handshake."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    start, end = now - datetime.timedelta(hours=1), now + datetime.timedelta(days=days)

    def pem_key(key) -> bytes:
        return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption())

    def usage(ca: bool):
        return x509.KeyUsage(digital_signature=not ca, content_commitment=False, key_encipherment=False,
                             data_encipherment=False, key_agreement=False, key_cert_sign=ca, crl_sign=ca,
                             encipher_only=False, decipher_only=False)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, CA_NAME)])
    ca_cert = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
               .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(start).not_valid_after(end)
               .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
               .add_extension(usage(True), critical=True)
               .sign(ca_key, hashes.SHA256()))
    _write(out / "ca.pem", ca_cert.public_bytes(serialization.Encoding.PEM))
    _write(out / "ca.key", pem_key(ca_key), private=True)
    written = [out / "ca.pem"]
    for rank in range(parties):
        key = ec.generate_private_key(ec.SECP256R1())
        san = [x509.DNSName(cn_for(rank)), x509.DNSName("localhost"),
               x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
        cert = (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn_for(rank))]))
                .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(start).not_valid_after(end)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(usage(False), critical=True)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                      ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
                .add_extension(x509.SubjectAlternativeName(san), critical=False)
                .sign(ca_key, hashes.SHA256()))
        _write(out / f"rank{rank}.pem", cert.public_bytes(serialization.Encoding.PEM))
        _write(out / f"rank{rank}.key", pem_key(key), private=True)
        written += [out / f"rank{rank}.pem", out / f"rank{rank}.key"]
    return written


@dataclass(frozen=True, repr=False)
class TLSMaterial:
    """One party's PEM bytes: the run's CA, its certificate and its key (never printed)."""

    ca: bytes
    cert: bytes
    key: bytes
    rank: int

    def __repr__(self) -> str:
        return f"TLSMaterial(rank={self.rank})"


def load_tls(tls: dict, rank: int) -> TLSMaterial:
    """comm_args.tls of party `rank`, checked: readable PEM, the key belongs to the certificate, the
    certificate is signed by the CA and names this rank. Each problem is a one-line ConfigError."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    raw = {}
    for name in TLS_KEYS:
        try:
            raw[name] = Path(tls[name]).read_bytes()
        except OSError as exc:
            raise ConfigError(f"comm_args.tls.{name}: cannot read {tls[name]}: {exc.strerror}") from None
    try:
        ca = x509.load_pem_x509_certificate(raw["ca_cert"])
    except ValueError:
        raise ConfigError(f"comm_args.tls.ca_cert: {tls['ca_cert']} is not a PEM certificate") from None
    try:
        cert = x509.load_pem_x509_certificate(raw["cert"])
    except ValueError:
        raise ConfigError(f"comm_args.tls.cert: {tls['cert']} is not a PEM certificate") from None
    try:
        key = serialization.load_pem_private_key(raw["key"], password=None)
    except (ValueError, TypeError):
        raise ConfigError(f"comm_args.tls.key: {tls['key']} is not an unencrypted PEM private key") from None
    if key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo) \
            != cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo):
        raise ConfigError(f"comm_args.tls.key: {tls['key']} is not the key of the certificate {tls['cert']}")
    try:
        cert.verify_directly_issued_by(ca)
    except Exception:  # ValueError, TypeError or InvalidSignature, depending on what does not match
        raise ConfigError(f"comm_args.tls.cert: {tls['cert']} is not signed by the CA {tls['ca_cert']}") from None
    names = [a.value for a in cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)]
    if [rank_of_cn(n) for n in names] != [rank]:
        raise ConfigError(f"comm_args.tls.cert: {tls['cert']} is for CN={','.join(map(str, names)) or '?'}, "
                          f"this party is rank {rank} (expected CN={cn_for(rank)})")
    return TLSMaterial(raw["ca_cert"], raw["cert"], raw["key"], rank)


def non_loopback(table: dict[int, tuple[str, int]]) -> list[str]:
    return [f"{ip} (rank {r})" for r, (ip, _) in sorted(table.items()) if not ipaddress.ip_address(ip).is_loopback]


def transport_security(cfg, table: dict[int, tuple[str, int]], rank: int, where: str) -> Optional[TLSMaterial]:
    """The TLS material party `rank` runs with, or None for plaintext; a ConfigError when plaintext is not
    allowed (an address off this machine without comm_args.allow_insecure)."""
    tls = cfg["tls"]
    if tls:
        return load_tls(tls, rank)
    if cfg["allow_insecure"]:
        print("feddpd: warning: comm_args.allow_insecure: gRPC messages travel unencrypted and their senders "
              "are not authenticated", file=sys.stderr, flush=True)
        return None
    remote = non_loopback(table)
    if remote:
        raise ConfigError(f"comm_args.tls: the ip config {where} has address(es) off this machine "
                          f"({', '.join(remote)}) and no TLS; set comm_args.tls (ca_cert, cert, key; make them with "
                          f"`python -m fedml_feddpd certs`) or comm_args.allow_insecure: true")
    return None
