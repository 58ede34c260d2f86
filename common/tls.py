"""Mutual TLS of the internal gRPC connections: the certificates (a development CA and one
certificate per identity, made by `wa certs create`, `make run` and the test harness) and the
transport each process uses (README, Security).

A directory (`GRPC_TLS_DIR`) holds `ca.crt` (the CA certificates trusted: one, or several while
a CA is being rotated), `ca.key` (the CA's key: only where certificates are issued, never
mounted into a service) and `<identity>.crt` / `<identity>.key` for each identity. A
certificate's identity is its URI name `spiffe://wa-agents/<identity>` (what servers authorize
by); it is also its subject common name and one of its DNS names.
"""

from __future__ import annotations

import datetime
import ipaddress
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from . import config, files

log = logging.getLogger(__name__)

IDENTITIES = ("state", "agent", "dlq", "gateway", "operator", "console")
CA_DAYS = 3650
LEAF_DAYS = 397
# A certificate this close to its end is issued again by `wa certs create` / `make run`, and a
# service starting with it says so.
RENEW_BEFORE = datetime.timedelta(days=30)
# Every certificate names these, so that `127.0.0.1:PORT` (make run, the tests) verifies.
LOCAL_NAMES = ("localhost", "127.0.0.1", "::1")
URI_PREFIX = "spiffe://wa-agents/"
MAKE_THEM = (
    "create them with `wa certs create --dir {dir}` (make run does), or set "
    "GRPC_INSECURE=true for development only"
)


@dataclass(frozen=True)
class Credentials:
    """One identity's certificate and key, and the CA certificates it trusts (PEM bytes)."""

    identity: str
    ca: bytes
    cert: bytes
    key: bytes

    @classmethod
    def load(cls, directory: Path, identity: str) -> Credentials:
        """Reads and checks the files; a `config.ConfigError` names the one that cannot be
        used and the command that makes it."""
        ca = _read(directory / "ca.crt", directory)
        cert = _read(directory / f"{identity}.crt", directory)
        key = _read(directory / f"{identity}.key", directory)
        try:
            roots = x509.load_pem_x509_certificates(ca)
        except ValueError as exc:
            raise _unusable(directory / "ca.crt", f"not PEM certificates ({exc})") from None
        try:
            leaf = x509.load_pem_x509_certificate(cert)
        except ValueError as exc:
            why = f"not a PEM certificate ({exc})"
            raise _unusable(directory / f"{identity}.crt", why) from None
        try:
            private = serialization.load_pem_private_key(key, password=None)
        except (ValueError, TypeError) as exc:
            raise _unusable(directory / f"{identity}.key", f"not a PEM key ({exc})") from None
        if private.public_key() != leaf.public_key():
            raise _unusable(directory / f"{identity}.key", f"not the key of {identity}.crt")
        if identity not in identities_of(leaf):
            raise _unusable(
                directory / f"{identity}.crt", f"not a certificate of {URI_PREFIX}{identity}"
            )
        if not any(_issued_by(leaf, root) for root in roots):
            raise _unusable(directory / f"{identity}.crt", "not signed by a CA of ca.crt")
        left = leaf.not_valid_after_utc - _now()
        if left <= datetime.timedelta(0):
            raise _unusable(
                directory / f"{identity}.crt", f"expired on {leaf.not_valid_after_utc:%Y-%m-%d}"
            )
        if left < RENEW_BEFORE:
            log.warning(
                "the %s certificate expires on %s: issue a new one (README, Security)",
                identity,
                f"{leaf.not_valid_after_utc:%Y-%m-%d}",
            )
        return cls(identity, ca, cert, key)

    def server(self) -> grpc.ServerCredentials:
        """Answers only callers presenting a certificate signed by a CA of ca.crt."""
        return grpc.ssl_server_credentials(
            [(self.key, self.cert)], root_certificates=self.ca, require_client_auth=True
        )

    def channel(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca, private_key=self.key, certificate_chain=self.cert
        )


# None: plaintext (GRPC_INSECURE=true).
Transport = Credentials | None


class _Unset:
    pass


_process: Transport | _Unset = _Unset()


def configure(settings: config.Base, identity: str) -> Transport:
    """Chooses this process's transport once at start-up: its identity's credentials from
    GRPC_TLS_DIR, or plaintext when GRPC_INSECURE=true (logged loudly, every process)."""
    global _process
    if settings.grpc_insecure:
        log.warning(
            "GRPC_INSECURE=true: internal gRPC is PLAINTEXT and UNAUTHENTICATED: anyone who "
            "reaches these ports can call every service (development only)"
        )
        _process = None
        return None
    creds = Credentials.load(settings.tls_dir, identity)
    _process = creds
    return creds


def transport() -> Transport:
    """What `configure` chose; a process that did not call it is a bug, not a plaintext one."""
    if isinstance(_process, _Unset):
        raise RuntimeError("common.tls.configure() was not called in this process")
    return _process


def _read(path: Path, directory: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise config.ConfigError(
            f"cannot read {path} ({exc.strerror}): {MAKE_THEM.format(dir=directory)}"
        ) from None


def _unusable(path: Path, why: str) -> config.ConfigError:
    return config.ConfigError(f"{path} is {why}: {MAKE_THEM.format(dir=path.parent)}")


# -- issuing ---------------------------------------------------------------------------------


def create(
    directory: Path, hosts: Sequence[str] = (), identities: Sequence[str] = IDENTITIES
) -> list[str]:
    """Makes what is missing in `directory`: a CA (unless one is there) and, signed by it, a
    certificate and key per identity. Existing files are kept while they are usable: a
    certificate is issued again only when it is missing, unreadable, not signed by a CA of
    ca.crt, within RENEW_BEFORE of its end, or missing one of the names asked for. A CA is
    never replaced. `hosts` are extra names of every certificate; `{id}` in one stands for the
    identity (`{id}.wa.svc`). Returns the files written."""
    if not directory.exists():
        directory.mkdir(parents=True, mode=0o700)
    written: list[str] = []
    roots, signer = _ca(directory, written)
    for identity in identities:
        names = _names(identity, hosts)
        if _usable(directory, identity, roots, names):
            continue
        if signer is None:
            raise config.ConfigError(
                f"{directory / identity}.crt must be issued, and {directory / 'ca.key'} is "
                "missing: issue it where the CA's key is"
            )
        ca_cert, ca_key = signer
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _issue(identity, names, key.public_key(), ca_cert, ca_key)
        files.write_atomic(directory / f"{identity}.key", _key_pem(key), 0o600)
        files.write_atomic(
            directory / f"{identity}.crt", cert.public_bytes(serialization.Encoding.PEM), 0o644
        )
        written += [f"{identity}.key", f"{identity}.crt"]
    return written


def _ca(
    directory: Path, written: list[str]
) -> tuple[list[x509.Certificate], tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None]:
    """The trusted CA certificates and, when ca.key is there, the one it signs with."""
    crt, key_path = directory / "ca.crt", directory / "ca.key"
    if not crt.exists() and not key_path.exists():
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _self_signed(key)
        files.write_atomic(key_path, _key_pem(key), 0o600)
        files.write_atomic(crt, cert.public_bytes(serialization.Encoding.PEM), 0o644)
        written += ["ca.key", "ca.crt"]
        return [cert], (cert, key)
    if not crt.exists():
        raise config.ConfigError(f"{key_path} is there without {crt}: restore it")
    try:
        roots = x509.load_pem_x509_certificates(crt.read_bytes())
    except ValueError as exc:
        raise _unusable(crt, f"not PEM certificates ({exc})") from None
    if not key_path.exists():
        return roots, None
    try:
        private = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except (ValueError, TypeError) as exc:
        raise _unusable(key_path, f"not a PEM key ({exc})") from None
    if not isinstance(private, ec.EllipticCurvePrivateKey):
        raise _unusable(key_path, "not an EC key")
    mine = [c for c in roots if c.public_key() == private.public_key()]
    if not mine:
        raise _unusable(key_path, "the key of no certificate of ca.crt")
    if mine[0].not_valid_after_utc - _now() < RENEW_BEFORE:
        raise config.ConfigError(
            f"the CA of {crt} expires on {mine[0].not_valid_after_utc:%Y-%m-%d}: rotate it "
            "(README, Security)"
        )
    return roots, (mine[0], private)


def _usable(
    directory: Path, identity: str, roots: list[x509.Certificate], names: list[str]
) -> bool:
    try:
        cert = x509.load_pem_x509_certificate((directory / f"{identity}.crt").read_bytes())
        key = serialization.load_pem_private_key(
            (directory / f"{identity}.key").read_bytes(), password=None
        )
    except (OSError, ValueError, TypeError):
        return False
    if key.public_key() != cert.public_key() or identities_of(cert) != [identity]:
        return False
    if not any(_issued_by(cert, root) for root in roots):
        return False
    if cert.not_valid_after_utc - _now() < RENEW_BEFORE:
        return False
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return False
    have = {*san.get_values_for_type(x509.DNSName)}
    have |= {str(ip) for ip in san.get_values_for_type(x509.IPAddress)}
    return all(_canonical(n) in have for n in names)


def _names(identity: str, hosts: Sequence[str]) -> list[str]:
    names = [identity, *LOCAL_NAMES]
    for host in hosts:
        name = host.strip().replace("{id}", identity)
        if name and name not in names:
            names.append(name)
    return names


def _canonical(name: str) -> str:
    try:
        return str(ipaddress.ip_address(name))
    except ValueError:
        return name


def _general_names(names: list[str]) -> list[x509.GeneralName]:
    out: list[x509.GeneralName] = []
    for name in names:
        try:
            out.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            out.append(x509.DNSName(name))
    return out


def _self_signed(key: ec.EllipticCurvePrivateKey) -> x509.Certificate:
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "wa-agents"),
            x509.NameAttribute(NameOID.COMMON_NAME, f"wa-agents development CA {_now():%Y-%m-%d}"),
        ]
    )
    now = _now()
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )


def _issue(
    identity: str,
    names: list[str],
    public: ec.EllipticCurvePublicKey,
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
) -> x509.Certificate:
    now = _now()
    # Never past the CA's own end: a chain is only as valid as its shortest link.
    end = min(now + datetime.timedelta(days=LEAF_DAYS), ca_cert.not_valid_after_utc)
    return (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, "wa-agents"),
                    x509.NameAttribute(NameOID.COMMON_NAME, identity),
                ]
            )
        )
        .issuer_name(ca_cert.subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=True,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(
            x509.SubjectAlternativeName(
                [*_general_names(names), x509.UniformResourceIdentifier(URI_PREFIX + identity)]
            ),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )


def _issued_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(ca)
    except (InvalidSignature, ValueError, TypeError):  # not its signature, name or key type
        return False
    return True


def identities_of(cert: x509.Certificate) -> list[str]:
    """The identities a certificate names (`spiffe://wa-agents/<identity>`, what the servers
    authorize by, common/authz.py)."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    return [u.removeprefix(URI_PREFIX) for u in uris if u.startswith(URI_PREFIX)]


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)
