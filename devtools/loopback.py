"""The HTTP servers the tests and benchmarks play Meta, a model or a collector with."""

from __future__ import annotations

from http.server import ThreadingHTTPServer


class LoopbackServer(ThreadingHTTPServer):
    """A thread per connection, on 127.0.0.1, with a listen backlog fit for a burst.

    socketserver's default backlog is 5: a burst of new connections (a fresh agent replica
    opening its pool to the model under load) overflows it, the kernel drops the SYNs, and
    the client sends them again only after 1 s, then 3 s. A turn then waits seconds for a
    server that is idle (`nstat` counts these as TcpExtListenDrops)."""

    request_queue_size = 1024
    daemon_threads = True
