"""The certificates of internal mutual TLS (`wa certs create`, make run, the test harness) and
the table of who may call what."""

from __future__ import annotations

import datetime
import ipaddress
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from wa.v1 import agent_pb2, dlq_pb2, state_pb2

from common import authz, tls
from common.config import ConfigError


def cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def test_a_ca_and_a_certificate_per_identity_with_their_names_and_private_keys(
    tmp_path: Path,
) -> None:
    where = tmp_path / "tls"
    written = tls.create(where, ["{id}.wa.svc", "*.{id}-headless.wa.svc.cluster.local", "10.0.0.7"])
    assert sorted(written) == sorted(
        ["ca.crt", "ca.key", *(f"{i}.{ext}" for i in tls.IDENTITIES for ext in ("crt", "key"))]
    )
    assert stat.S_IMODE(where.stat().st_mode) == 0o700
    ca = cert(where / "ca.crt")
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    for identity in tls.IDENTITIES:
        assert stat.S_IMODE((where / f"{identity}.key").stat().st_mode) == 0o600
        leaf = cert(where / f"{identity}.crt")
        leaf.verify_directly_issued_by(ca)
        assert leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == identity
        public = leaf.public_key()
        assert isinstance(public, ec.EllipticCurvePublicKey)
        assert public.curve.name == "secp256r1"
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert san.get_values_for_type(x509.DNSName) == [
            identity,
            "localhost",
            f"{identity}.wa.svc",
            f"*.{identity}-headless.wa.svc.cluster.local",
        ]
        assert san.get_values_for_type(x509.IPAddress) == [
            ipaddress.ip_address(a) for a in ("127.0.0.1", "::1", "10.0.0.7")
        ]
        assert san.get_values_for_type(x509.UniformResourceIdentifier) == [
            f"spiffe://wa-agents/{identity}"
        ]
        usage = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        assert set(usage) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
        life = leaf.not_valid_after_utc - leaf.not_valid_before_utc
        assert datetime.timedelta(days=300) < life < datetime.timedelta(days=400)
        assert tls.Credentials.load(where, identity).identity == identity


def test_usable_files_are_kept_and_the_ca_is_never_replaced(tmp_path: Path) -> None:
    tls.create(tmp_path)
    first = snapshot(tmp_path)
    assert tls.create(tmp_path) == []
    assert snapshot(tmp_path) == first
    # A name that a certificate lacks: issued again by the same CA, the CA untouched.
    assert "state.crt" in tls.create(tmp_path, ["state.wa.svc"])
    after = snapshot(tmp_path)
    assert after["ca.crt"] == first["ca.crt"] and after["ca.key"] == first["ca.key"]
    assert after["state.crt"] != first["state.crt"]
    cert(tmp_path / "state.crt").verify_directly_issued_by(cert(tmp_path / "ca.crt"))
    # A certificate spoiled on disk is issued again.
    (tmp_path / "agent.key").write_text("not a key")
    assert sorted(tls.create(tmp_path, ["state.wa.svc"])) == ["agent.crt", "agent.key"]


def test_a_certificate_near_its_end_is_issued_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tls, "LEAF_DAYS", 10)  # within RENEW_BEFORE from the start
    tls.create(tmp_path, identities=["dlq"])
    monkeypatch.setattr(tls, "LEAF_DAYS", 397)
    assert sorted(tls.create(tmp_path, identities=["dlq"])) == ["dlq.crt", "dlq.key"]
    assert tls.create(tmp_path, identities=["dlq"]) == []


def test_certificates_of_either_ca_of_a_bundle_are_kept_during_a_rotation(tmp_path: Path) -> None:
    old, new = tmp_path / "old", tmp_path / "new"
    tls.create(old)
    tls.create(new)
    bundle = (old / "ca.crt").read_bytes() + (new / "ca.crt").read_bytes()
    (new / "ca.crt").write_bytes(bundle)
    for name in ("state.crt", "state.key"):  # a service still on the old CA's certificate
        (new / name).write_bytes((old / name).read_bytes())
    before = snapshot(new)
    assert tls.create(new) == []  # the new CA (matching ca.key) is found in the bundle
    assert snapshot(new) == before
    assert tls.Credentials.load(new, "state").ca == bundle


def test_without_the_cas_key_nothing_can_be_issued_and_it_says_so(tmp_path: Path) -> None:
    tls.create(tmp_path)
    (tmp_path / "ca.key").unlink()  # a service's mounted copy: no CA key
    assert tls.create(tmp_path) == []
    (tmp_path / "dlq.crt").unlink()
    with pytest.raises(ConfigError, match=r"ca\.key is missing"):
        tls.create(tmp_path)


def test_files_that_cannot_be_used_are_named_with_the_command_that_makes_them(
    tmp_path: Path,
) -> None:
    with pytest.raises(ConfigError) as missing:
        tls.Credentials.load(tmp_path, "agent")
    assert f"cannot read {tmp_path}/ca.crt" in str(missing.value)
    assert f"wa certs create --dir {tmp_path}" in str(missing.value)
    tls.create(tmp_path)
    (tmp_path / "agent.key").write_bytes((tmp_path / "dlq.key").read_bytes())
    with pytest.raises(ConfigError, match=r"agent\.key is not the key of agent\.crt"):
        tls.Credentials.load(tmp_path, "agent")
    other = tmp_path / "other"
    tls.create(other)
    (tmp_path / "ca.crt").write_bytes((other / "ca.crt").read_bytes())
    with pytest.raises(ConfigError, match=r"state\.crt is not signed by a CA of ca\.crt"):
        tls.Credentials.load(tmp_path, "state")
    (tmp_path / "ca.crt").write_bytes((other / "ca.crt").read_bytes())
    (tmp_path / "gateway.crt").write_bytes((other / "operator.crt").read_bytes())
    (tmp_path / "gateway.key").write_bytes((other / "operator.key").read_bytes())
    with pytest.raises(ConfigError, match="not a certificate of spiffe://wa-agents/gateway"):
        tls.Credentials.load(tmp_path, "gateway")


def test_every_internal_rpc_names_who_may_call_it() -> None:
    """A new RPC is refused to everyone until common/authz.py says who calls it; the table
    names no RPC that does not exist and no identity without a certificate."""
    methods = {
        f"/{service.full_name}/{method.name}"
        for module in (state_pb2, agent_pb2, dlq_pb2)
        for service in module.DESCRIPTOR.services_by_name.values()
        for method in service.methods
    }
    assert set(authz.CALLERS) == methods
    assert all(callers and callers <= set(tls.IDENTITIES) for callers in authz.CALLERS.values())
