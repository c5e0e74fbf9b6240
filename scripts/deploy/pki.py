#!/usr/bin/env python3
"""Consortium certificate authority and the SuperLink's TLS server certificate.

    python scripts/deploy/pki.py ca     --out certs/
    python scripts/deploy/pki.py server --ca-dir certs/ --out certs/ \\
        --host superlink.consortium.example --ip 10.20.30.40
    python scripts/deploy/pki.py check  --certs certs/ --host superlink.consortium.example

``ca`` writes ``ca.crt`` (give it to every hospital) and ``ca.key`` (keep it offline at the
coordinating centre). ``server`` writes ``server.pem`` and ``server.key`` for the SuperLink,
with subjectAltNames for every ``--host`` and ``--ip`` (a SuperNode checks the name or IP it
dials against them) plus ``localhost``/``127.0.0.1`` (the proxy and the centre's own tools
reach the SuperLink on loopback). ``check`` verifies that the server certificate is signed by
the CA, matches its key, covers the given names and has not expired.

All keys are EC P-384; certificates are built with the ``cryptography`` package (no
hand-rolled crypto).
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import sys
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (
    DeployError,
    fail,
    refuse_overwrite,
    require_file,
    write_private,
    write_public,
)

CA_CERT, CA_KEY = "ca.crt", "ca.key"
SERVER_CERT, SERVER_KEY = "server.pem", "server.key"
CURVE = ec.SECP384R1()
LOOPBACK_HOSTS, LOOPBACK_IPS = ("localhost",), ("127.0.0.1",)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def create_ca(out: Path, common_name: str, days: int, force: bool = False) -> tuple[Path, Path]:
    """Create a self-signed CA (``ca.crt``, ``ca.key``) in ``out``; return their paths."""
    cert_path, key_path = out / CA_CERT, out / CA_KEY
    refuse_overwrite([cert_path, key_path], force)
    key = ec.generate_private_key(CURVE)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now() - dt.timedelta(minutes=5))
        .not_valid_after(_now() + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA384())
    )
    write_private(key_path, _key_pem(key))
    write_public(cert_path, cert.public_bytes(serialization.Encoding.PEM))
    return cert_path, key_path


def _load_ca(ca_dir: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    cert = x509.load_pem_x509_certificate(
        require_file(ca_dir / CA_CERT, "CA certificate").read_bytes()
    )
    key = serialization.load_pem_private_key(
        require_file(ca_dir / CA_KEY, "CA private key").read_bytes(), password=None
    )
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise DeployError(f"{ca_dir / CA_KEY} is not an EC private key")
    if cert.public_key().public_numbers() != key.public_key().public_numbers():
        raise DeployError(f"{ca_dir / CA_KEY} does not belong to {ca_dir / CA_CERT}")
    return cert, key


def _alt_names(hosts: list[str], ips: list[str]) -> list[x509.GeneralName]:
    if not hosts and not ips:
        raise DeployError("give at least one --host or --ip: the name SuperNodes dial")
    # The SuperLink itself listens on loopback behind the proxy: the proxy, the SuperLink's
    # SuperExec and researchers on the centre's host (or an SSH tunnel) dial 127.0.0.1, so the
    # certificate always names it too (harmless: 127.0.0.1 is always the dialler's own host).
    hosts = [*hosts, *(h for h in LOOPBACK_HOSTS if h not in hosts)]
    ips = [*ips, *(i for i in LOOPBACK_IPS if i not in ips)]
    names: list[x509.GeneralName] = [x509.DNSName(h) for h in hosts]
    for ip in ips:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(ip)))
        except ValueError:
            raise DeployError(f"--ip '{ip}' is not an IP address (use --host for names)") from None
    return names


def issue_server_cert(
    ca_dir: Path, out: Path, hosts: list[str], ips: list[str], days: int, force: bool = False
) -> tuple[Path, Path]:
    """Issue ``server.pem``/``server.key`` signed by the CA in ``ca_dir``, SANs = hosts + ips."""
    cert_path, key_path = out / SERVER_CERT, out / SERVER_KEY
    refuse_overwrite([cert_path, key_path], force)
    alt_names = _alt_names(hosts, ips)
    ca_cert, ca_key = _load_ca(ca_dir)
    key = ec.generate_private_key(CURVE)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, (hosts or ips)[0])])
    not_after = min(_now() + dt.timedelta(days=days), ca_cert.not_valid_after_utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now() - dt.timedelta(minutes=5))
        .not_valid_after(not_after)
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=True, key_cert_sign=False,
                crl_sign=False, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA384())
    )
    write_private(key_path, _key_pem(key))
    write_public(cert_path, cert.public_bytes(serialization.Encoding.PEM))
    return cert_path, key_path


def check_server_cert(certs: Path, hosts: list[str], ips: list[str]) -> list[str]:
    """Verify the SuperLink's certificate in ``certs``; return a description; DeployError if bad."""
    ca = x509.load_pem_x509_certificate(
        require_file(certs / CA_CERT, "CA certificate").read_bytes()
    )
    cert = x509.load_pem_x509_certificate(
        require_file(certs / SERVER_CERT, "server certificate").read_bytes()
    )
    key = serialization.load_pem_private_key(
        require_file(certs / SERVER_KEY, "server private key").read_bytes(), password=None
    )
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        raise DeployError(
            f"{certs / SERVER_CERT} is not signed by {certs / CA_CERT}: issue it again with "
            "`pki.py server` from this CA"
        ) from None
    if cert.public_key().public_numbers() != key.public_key().public_numbers():  # type: ignore[union-attr]
        raise DeployError(f"{certs / SERVER_KEY} does not belong to {certs / SERVER_CERT}")
    now = _now()
    for which, c in (("CA", ca), ("server", cert)):
        if not c.not_valid_before_utc <= now <= c.not_valid_after_utc:
            raise DeployError(
                f"the {which} certificate is valid only from {c.not_valid_before_utc} to "
                f"{c.not_valid_after_utc}; rotate it (docs/deployment.md)"
            )
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    dns = set(san.get_values_for_type(x509.DNSName))
    addrs = {str(a) for a in san.get_values_for_type(x509.IPAddress)}
    missing = [h for h in hosts if h not in dns] + [
        i for i in ips if str(ipaddress.ip_address(i)) not in addrs
    ]
    if missing:
        raise DeployError(
            f"{certs / SERVER_CERT} does not cover {', '.join(missing)} (it covers "
            f"{', '.join(sorted(dns | addrs))}); SuperNodes dialing that name will fail the "
            "TLS check"
        )
    return [
        f"CA      {ca.subject.rfc4514_string()}, valid until {ca.not_valid_after_utc:%Y-%m-%d}",
        f"server  {cert.subject.rfc4514_string()}, valid until {cert.not_valid_after_utc:%Y-%m-%d}",
        f"names   {', '.join(sorted(dns | addrs))}",
    ]


def main(argv: list[str] | None = None) -> None:
    """Command line: ``ca``, ``server`` or ``check``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_ca = sub.add_parser("ca", help="create the consortium CA (ca.crt, ca.key)")
    p_ca.add_argument("--out", type=Path, required=True, help="folder for ca.crt and ca.key")
    p_ca.add_argument("--name", default="fedclinic consortium CA", help="CA common name")
    p_ca.add_argument("--days", type=int, default=3650)
    p_ca.add_argument("--force", action="store_true", help="replace an existing CA")
    p_srv = sub.add_parser("server", help="issue the SuperLink certificate (server.pem/.key)")
    p_srv.add_argument("--ca-dir", type=Path, required=True, help="folder with ca.crt and ca.key")
    p_srv.add_argument("--out", type=Path, required=True, help="folder for server.pem/.key")
    p_srv.add_argument("--host", action="append", default=[], help="DNS name (repeatable)")
    p_srv.add_argument("--ip", action="append", default=[], help="IP address (repeatable)")
    p_srv.add_argument("--days", type=int, default=397)
    p_srv.add_argument("--force", action="store_true", help="replace an existing certificate")
    p_chk = sub.add_parser("check", help="verify server.pem against ca.crt and names")
    p_chk.add_argument("--certs", type=Path, required=True, help="folder with ca.crt, server.*")
    p_chk.add_argument("--host", action="append", default=[])
    p_chk.add_argument("--ip", action="append", default=[])
    args = parser.parse_args(argv)
    try:
        if args.command == "ca":
            cert, key = create_ca(args.out, args.name, args.days, args.force)
            print(f"CA certificate: {cert}  (give this file to every hospital)")
            print(f"CA private key: {key}  (keep it offline; it signs the SuperLink certificate)")
        elif args.command == "server":
            cert, key = issue_server_cert(args.ca_dir, args.out, args.host, args.ip, args.days,
                                          args.force)
            print(f"SuperLink certificate: {cert}")
            print(f"SuperLink private key: {key}")
            print("\n".join(check_server_cert(_with_ca(args.ca_dir, args.out), args.host, args.ip)))
        else:
            print("\n".join(check_server_cert(args.certs, args.host, args.ip)))
            print("ok")
    except DeployError as err:
        fail(str(err))


def _with_ca(ca_dir: Path, out: Path) -> Path:
    """Folder holding both ca.crt and server.*: ``out`` (copy ca.crt there if needed)."""
    if (out / CA_CERT).resolve() != (ca_dir / CA_CERT).resolve():
        write_public(out / CA_CERT, (ca_dir / CA_CERT).read_bytes())
    return out


if __name__ == "__main__":
    main()
