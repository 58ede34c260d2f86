"""What the operator sees when something the command needs is down: one line on stderr and
exit code 2, never a traceback."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import grpc

from common import grpcserver


class ServiceDown(Exception):
    """A service the command needs did not answer."""


def one_line(text: str) -> str:
    return " ".join(text.split())


@contextlib.contextmanager
def calling(service: str, target: str) -> Iterator[None]:
    """Turns a call to `service` that found nobody (or nobody in time) into ServiceDown."""
    try:
        yield
    except grpc.aio.AioRpcError as exc:
        if exc.code() not in grpcserver.UNREACHABLE:
            raise
        raise ServiceDown(
            f"the {service} service at {target} did not answer "
            f"({exc.code().name}: {one_line(exc.details() or '')})"
        ) from exc
