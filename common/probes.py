"""A gRPC service's METRICS_PORT: `/metrics` (Prometheus), `/healthz` (200 while the process
runs) and `/readyz` (200 while its gRPC health status is SERVING, 503 before and while it shuts
down). Plain HTTP without a certificate, for what cannot present one: Kubernetes probes,
compose healthchecks, Prometheus (README, Security)."""

from __future__ import annotations

import socket
import socketserver
import threading
from collections.abc import Callable, Iterable
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import prometheus_client


class Readiness:
    """Whether the gRPC server is SERVING; set on the event loop, read by the HTTP thread (a
    bool's assignment is atomic)."""

    serving = False


class _Server(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True
    allow_reuse_address = True


class _Quiet(WSGIRequestHandler):
    # A client that opens a connection and sends nothing holds one thread for this long only.
    timeout = 5

    def log_message(self, format: str, *args: Any) -> None:
        pass  # probes every few seconds would drown the service's own log lines


def _app(readiness: Readiness) -> Callable[..., Iterable[bytes]]:
    metrics = prometheus_client.make_wsgi_app()

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == "/healthz":
            start_response("200 OK", [("Content-Type", "text/plain")])
            return [b"ok\n"]
        if path == "/readyz":
            if readiness.serving:
                start_response("200 OK", [("Content-Type", "text/plain")])
                return [b"serving\n"]
            start_response("503 Service Unavailable", [("Content-Type", "text/plain")])
            return [b"not serving\n"]
        return metrics(environ, start_response)  # type: ignore[no-any-return]

    return app


class ProbeServer:
    """The listener, in a daemon thread; `close` stops it."""

    def __init__(self, host: str, port: int, readiness: Readiness) -> None:
        server_cls = type(
            "_ProbeServer",
            (_Server,),
            {"address_family": socket.AF_INET6 if ":" in host else socket.AF_INET},
        )
        self._httpd: WSGIServer = make_server(host, port, _app(readiness), server_cls, _Quiet)
        self.port: int = self._httpd.server_port
        self._thread = threading.Thread(
            target=self._httpd.serve_forever,
            kwargs={"poll_interval": 0.5},
            daemon=True,
            name="probes",
        )
        self._thread.start()

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
