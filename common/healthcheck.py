"""A container healthcheck. `python -m common.healthcheck http URL` expects a 200: a service's
`http://127.0.0.1:$METRICS_PORT/readyz` needs no certificate. `python -m common.healthcheck
grpc HOST:PORT [IDENTITY]` asks the standard gRPC health service, presenting IDENTITY's
certificate of GRPC_TLS_DIR (default `operator`; any identity of the CA may ask). Exit 0
healthy, 1 not, 2 misused or misconfigured."""

from __future__ import annotations

import sys
import urllib.request

USAGE = "usage: python -m common.healthcheck grpc HOST:PORT [IDENTITY] | http URL"


def main(argv: list[str]) -> int:
    arity = {"grpc": (2, 3), "http": (2,)}
    if not argv or len(argv) not in arity.get(argv[0], ()):
        print(USAGE, file=sys.stderr)
        return 2
    kind, target, *rest = argv
    if kind == "grpc":
        # Imported here: gRPC, OpenTelemetry and pydantic take over a second of CPU to import,
        # which the http check, run every few seconds by compose, must not pay.
        import asyncio

        from . import config, grpcserver, tls

        try:
            tls.configure(config.Base.from_env(), rest[0] if rest else "operator")
        except config.ConfigError as exc:
            print(f"configuration error: {exc}", file=sys.stderr)
            return 2
        ok, detail = asyncio.run(grpcserver.check_health(target))
        print(detail)
        return 0 if ok else 1
    try:
        with urllib.request.urlopen(target, timeout=3) as resp:
            return 0 if resp.status == 200 else 1
    except OSError as exc:
        print(exc, file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
