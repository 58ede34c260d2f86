"""A CA rotation as README (Security) tells it: while ca.crt holds both CAs, services on the old
CA's certificates and services on the new one's call each other."""

from __future__ import annotations

from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2_grpc

from common import grpcserver, tls


async def serving(creds: tls.Credentials) -> tuple[grpc.aio.Server, str]:
    server = grpc.aio.server(interceptors=grpcserver.interceptors(creds))
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
    port = grpcserver.bind(server, "127.0.0.1", 0, creds)
    await server.start()
    return server, f"127.0.0.1:{port}"


async def test_old_and_new_certificates_call_each_other_while_both_cas_are_trusted(
    tmp_path: Path,
) -> None:
    old, new = tmp_path / "old", tmp_path / "new"
    tls.create(old)
    tls.create(new)
    new_ca = (new / "ca.crt").read_bytes()
    bundle = (old / "ca.crt").read_bytes() + new_ca
    for where in (old, new):
        (where / "ca.crt").write_bytes(bundle)
    server, target = await serving(tls.Credentials.load(old, "state"))
    try:
        ok, detail = await grpcserver.check_health(
            target, transport=tls.Credentials.load(new, "gateway")
        )
        assert ok, detail
        # Dropping the old CA before every certificate is replaced cuts the caller off.
        (new / "ca.crt").write_bytes(new_ca)
        ok, detail = await grpcserver.check_health(
            target, transport=tls.Credentials.load(new, "gateway")
        )
        assert not ok and detail.startswith("UNAVAILABLE"), detail
    finally:
        await server.stop(None)
