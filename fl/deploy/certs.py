"""`unheard-certs`: development TLS certificates and SuperNode authentication key pairs.

* ``unheard-certs ca DIR`` -- a self-signed CA (``ca.crt``, ``ca.key``) and a SuperLink server
  certificate signed by it (``server.crt``, ``server.key``) for the given ``--host`` names/IPs.
  Devices trust ``ca.crt`` (``--root-cert``); only a SuperLink holding ``server.key`` passes.
* ``unheard-certs device DIR NAME`` -- a SuperNode key pair: ``NAME`` (ECDSA P-384 private key,
  OpenSSH format, stays on the device) and ``NAME.pub`` (OpenSSH public key, goes on the
  SuperLink's allow-list).

These are for development and loopback tests: a real fleet uses a CA you run properly (offline
root, short-lived server certificates) and keys generated on each device; docs/deploy.md says how.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import logging
import os
from pathlib import Path
from typing import Optional, Sequence

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

log = logging.getLogger(__name__)


def _write(path: Path, data: bytes, private: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    if private:
        os.chmod(path, 0o600)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _san(hosts: Sequence[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for h in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            names.append(x509.DNSName(h))
    return x509.SubjectAlternativeName(names)


def make_ca_and_server(out: Path, hosts: Sequence[str] = ("127.0.0.1", "localhost"), days: int = 365) -> None:
    """Write ``ca.crt``/``ca.key`` and ``server.crt``/``server.key`` (valid for ``hosts``) to ``out``."""
    now = dt.datetime.now(dt.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "unheard development CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
          .not_valid_after(now + dt.timedelta(days=days))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                       data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                       crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA384()))
    server_key = ec.generate_private_key(ec.SECP384R1())
    server = (x509.CertificateBuilder()
              .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
              .issuer_name(ca_name).public_key(server_key.public_key())
              .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
              .not_valid_after(now + dt.timedelta(days=days))
              .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
              .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
              .add_extension(_san(hosts), critical=False)
              .sign(ca_key, hashes.SHA384()))
    _write(out / "ca.crt", ca.public_bytes(serialization.Encoding.PEM))
    _write(out / "ca.key", _pem_key(ca_key), private=True)
    _write(out / "server.crt", server.public_bytes(serialization.Encoding.PEM))
    _write(out / "server.key", _pem_key(server_key), private=True)
    log.info("wrote ca.crt, ca.key, server.crt, server.key (for %s) to %s", ", ".join(hosts), out)


def make_device_key(out: Path, name: str) -> Path:
    """Write a SuperNode key pair ``out/name`` (private, OpenSSH) and ``out/name.pub``; returns the .pub path."""
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    _write(out / name, private, private=True)
    _write(out / f"{name}.pub", public + f" {name}\n".encode())
    log.info("wrote SuperNode key pair %s and %s.pub to %s", name, name, out)
    return out / f"{name}.pub"


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="unheard-certs", description="development certificates and device keys")
    sub = parser.add_subparsers(dest="what", required=True)
    ca = sub.add_parser("ca", help="a CA and a SuperLink server certificate")
    ca.add_argument("out", type=Path)
    ca.add_argument("--host", action="append", help="server name or IP (repeatable; default 127.0.0.1, localhost)")
    ca.add_argument("--days", type=int, default=365)
    dev = sub.add_parser("device", help="a SuperNode authentication key pair")
    dev.add_argument("out", type=Path)
    dev.add_argument("name")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.what == "ca":
        make_ca_and_server(args.out, args.host or ("127.0.0.1", "localhost"), args.days)
    else:
        make_device_key(args.out, args.name)


if __name__ == "__main__":
    main()
