"""`wa certs create`: the CA and the certificate of each identity that internal mutual TLS
uses (README, Security), made or completed in a directory; what is there and usable is kept."""

from __future__ import annotations

import sys
from pathlib import Path

from cli.settings import CliSettings
from common import tls


def create(directory: str, hosts: list[str]) -> int:
    settings = CliSettings.from_env()
    where = Path(directory) if directory else settings.tls_dir
    names = [h for arg in hosts for h in arg.split(",") if h.strip()]
    written = tls.create(where, names)
    if written:
        print(f"{where}: wrote {', '.join(written)}")
    else:
        print(f"{where}: every certificate is there and usable, nothing written")
    print(
        "a service mounts ca.crt, <identity>.crt and <identity>.key (never ca.key); "
        f"grpcurl: {grpcurl(where, settings.dlq_addr)} list",
        file=sys.stderr,
    )
    return 0


def grpcurl(directory: Path, target: str) -> str:
    """How `grpcurl` reaches a service as the operator."""
    return (
        f"grpcurl -cacert {directory}/ca.crt -cert {directory}/operator.crt "
        f"-key {directory}/operator.key {target.removeprefix('dns:///')}"
    )
