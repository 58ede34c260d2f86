"""A Graph API stand-in for benchmarks, in its own process on raw asyncio streams.

Meta's servers cost the system nothing on its own machine; the tests' FakeGraph (a threaded
http.server) spent about 200 us of this 2-core machine's CPU per call, two calls per message,
which a benchmark would count against the system. This one answers `POST .../messages` like
the Graph API, counts replies per inbound message (`context.message_id`; mark-as-read calls
are answered, not counted) and reports `{"sent": N, "duplicates": N}` at `GET /replies`.

    python -m bench.graph PORT
"""

from __future__ import annotations

import asyncio
import itertools
import sys
from collections import Counter

import orjson
import uvloop

replies: Counter[str] = Counter()
ids = itertools.count(1)


def answer(body: bytes) -> bytes:
    doc = orjson.loads(body)
    if doc.get("status") == "read":
        return b'{"success":true}'
    replies[doc.get("context", {}).get("message_id", "")] += 1
    return orjson.dumps(
        {
            "messaging_product": "whatsapp",
            "contacts": [{"input": doc.get("to", ""), "wa_id": doc.get("to", "")}],
            "messages": [{"id": f"wamid.bench{next(ids)}"}],
        }
    )


async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            body = await reader.readexactly(length) if length else b""
            if head.startswith(b"GET /replies"):
                duplicates = sum(1 for n in replies.values() if n > 1)
                out = orjson.dumps({"sent": replies.total(), "duplicates": duplicates})
            else:
                out = answer(body)
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
                + str(len(out)).encode()
                + b"\r\n\r\n"
                + out
            )
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


async def main(port: int) -> None:
    server = await asyncio.start_server(serve, "127.0.0.1", port)
    print("ready", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    uvloop.run(main(int(sys.argv[1])))
