"""A container healthcheck: `python -m common.healthcheck grpc HOST:PORT` asks the standard gRPC
health service, `python -m common.healthcheck http URL` expects a 200. Exit 0 healthy, 1 not."""

from __future__ import annotations

import asyncio
import sys
import urllib.request

from . import grpcserver


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in ("grpc", "http"):
        print("usage: python -m common.healthcheck grpc HOST:PORT | http URL", file=sys.stderr)
        return 2
    kind, target = argv
    if kind == "grpc":
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
