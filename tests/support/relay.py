"""A TCP relay on 127.0.0.1 between a process under test and a server: counts the connections
made through it, and can start listening late or forward nowhere yet (a server not there)."""

from __future__ import annotations

import asyncio
import contextlib
from types import TracebackType

# How long a close waits for its relays to end once their sockets are closed.
CLOSE_TIMEOUT = 5.0


class Relay:
    """Relays each connection accepted on 127.0.0.1:`port` (0: any free port) to `upstream`,
    a (host, port) or a Unix socket's path, settable later; until it is set, or when it cannot
    be reached, a connection is closed at once. `accepted` counts the connections."""

    def __init__(self, port: int = 0, upstream: tuple[str, int] | str | None = None) -> None:
        self.port = port
        self.upstream = upstream
        self.accepted = 0
        self._server: asyncio.Server | None = None
        self._relays: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> int:
        """Listens; returns the port."""
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", self.port)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self.port

    async def close(self) -> None:
        """Stops listening and cuts the connections still relayed. Their sockets are closed,
        not their tasks cancelled: each pipe then reads its end and closes the other side, so
        no transport is left for the garbage collector to report (pytest fails whichever test
        it collects one in)."""
        if self._server is None:
            return
        self._server.close()
        for writer in list(self._writers):
            writer.close()
        if self._relays:
            _, late = await asyncio.wait(set(self._relays), timeout=CLOSE_TIMEOUT)
            for task in late:
                task.cancel()
        await self._server.wait_closed()
        self._server = None

    async def __aenter__(self) -> Relay:
        await self.start()
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        task = asyncio.current_task()
        assert task is not None
        self._relays.add(task)
        self._writers.add(writer)
        try:
            upstream = self.upstream
            try:
                if upstream is None:
                    raise ConnectionRefusedError("no upstream yet")
                if isinstance(upstream, str):
                    up_reader, up_writer = await asyncio.open_unix_connection(upstream)
                else:
                    up_reader, up_writer = await asyncio.open_connection(*upstream)
            except OSError:
                return
            self._writers.add(up_writer)
            try:
                await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
            finally:
                up_writer.close()
                self._writers.discard(up_writer)
        finally:
            writer.close()
            self._writers.discard(writer)
            self._relays.discard(task)


async def _pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
    try:
        with contextlib.suppress(OSError):
            while data := await src.read(65536):
                dst.write(data)
                await dst.drain()
    finally:
        dst.close()
