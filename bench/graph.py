"""Stand-ins for the Graph API and the model, for benchmarks, in their own process on raw
asyncio streams.

Meta's servers and the model cost the system nothing on its own machine; the tests' threaded
fakes cost this machine's CPU per call (docs/benchmarks.md), which a benchmark would count
against the system. This one answers `POST .../messages` like the Graph API, counts replies
per inbound message (`context.message_id`; mark-as-read calls are answered, not counted) and
reports `{"sent": N, "answered": N, "duplicates": N, "last": T, "statuses": N,
"status_errors": N}` at `GET /replies` (calls, distinct message ids answered, ids answered more
than once, `time.monotonic()` of the last reply, status webhooks acknowledged and refused);
`POST /chat/completions` is an OpenAI-compatible model that echoes the last user message after
MODEL_DELAY seconds.

Like Meta, it can also report on what was sent: after `POST /statuses` with
`{"url": WEBHOOK_URL, "secret": APP_SECRET}` (until one with `{"url": null}`), every reply it
answers is followed by three signed status webhooks to that URL, `sent`, `delivered` and
`read`, one delivery each and in that order, over STATUS_CONNECTIONS keep-alive connections,
each with the send's `biz_opaque_callback_data`; one refused, or whose connection fails, is
tried again (ATTEMPTS in all, then counted in `status_errors`).

    python -m bench.graph PORT [MODEL_DELAY]
"""

from __future__ import annotations

import asyncio
import itertools
import sys
import time
from collections import Counter

import orjson
import uvloop

from cli.simulate import status_delivery, status_entry

from . import load

# Meta posts webhooks over many connections at once. Three statuses in a row per connection,
# each answered up to 50 ms late (GATEWAY_STATUS_LINGER_SECONDS): 16 connections would carry
# at most about 107 replies' statuses a second, too close to `--rate 100`.
STATUS_CONNECTIONS = 64

replies: Counter[str] = Counter()
ids = itertools.count(1)
model_delay = 0.0
last_reply = 0.0


# What Meta sends for each message delivered and read, in this order.
STATUSES = ("sent", "delivered", "read")
# Attempts at one status webhook: a keep-alive connection the server closed meanwhile (uvicorn
# closes idle ones after 5 s) or a refusal is tried again on a new connection, as Meta retries.
ATTEMPTS = 5


class Statuses:
    """Meta's status webhooks for the replies sent, posted to the system under test."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[tuple[str, str, dict[str, str]]] = asyncio.Queue()
        self.acked = 0
        self.errors = 0  # status webhooks refused ATTEMPTS times, or that failed otherwise
        self.workers: list[asyncio.Task[None]] = []

    def start(self, url: str, secret: str) -> None:
        """Posts the statuses of replies answered from now on to `url` (those of earlier ones,
        still queued for an earlier target, are dropped)."""
        for task in self.workers:
            task.cancel()  # each closes its connection
        self.queue = asyncio.Queue()
        self.workers = [
            asyncio.create_task(self._post(self.queue, url, secret))
            for _ in range(STATUS_CONNECTIONS)
        ]

    def stop(self) -> None:
        for task in self.workers:
            task.cancel()
        self.workers = []

    def follow(self, phone_number_id: str, message_id: str, recipient: dict[str, str]) -> None:
        self.queue.put_nowait((phone_number_id, message_id, recipient))

    async def _post(
        self, queue: asyncio.Queue[tuple[str, str, dict[str, str]]], url: str, secret: str
    ) -> None:
        host, port, path = load.endpoint(url)
        connection: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        try:
            while True:
                phone_number_id, message_id, recipient = await queue.get()
                for status in STATUSES:
                    entry = status_entry(
                        message_id,
                        status,
                        recipient_id=recipient.get("recipient_id", ""),
                        recipient_user_id=recipient.get("recipient_user_id", ""),
                    )
                    doc = status_delivery(entry, phone_number_id=phone_number_id)
                    request = load.signed_request(f"{host}:{port}", path, secret, orjson.dumps(doc))
                    for attempt in range(ATTEMPTS):
                        try:
                            if connection is None:
                                connection = await asyncio.open_connection(host, port)
                            connection[1].write(request)
                            if await load.read_response(connection[0]) == 200:
                                self.acked += 1
                                break
                        except (OSError, ValueError, asyncio.IncompleteReadError):
                            if connection is not None:
                                connection[1].close()
                            connection = None
                        await asyncio.sleep(0.05 * 2**attempt)
                    else:
                        self.errors += 1
        finally:
            if connection is not None:
                connection[1].close()


statuses = Statuses()


def answer(head: bytes, body: bytes) -> bytes:
    global last_reply
    doc = orjson.loads(body)
    if doc.get("status") == "read":
        return b'{"success":true}'
    replies[doc.get("context", {}).get("message_id", "")] += 1
    last_reply = time.monotonic()
    wamid = f"wamid.bench{next(ids)}"
    # As the Graph API answers: the recipient as given, and as a phone number (`to`) or a
    # business-scoped user id (`recipient`). As Meta's statuses: the recipient named as the send
    # named it, and the send's callback data repeated.
    about = {"callback_data": doc.get("biz_opaque_callback_data", "")}
    if "recipient" in doc:
        contact = {"input": doc["recipient"], "user_id": doc["recipient"]}
        about["recipient_user_id"] = doc["recipient"]
    else:
        contact = {"input": doc.get("to", ""), "wa_id": doc.get("to", "")}
        about["recipient_id"] = doc.get("to", "")
    if statuses.workers:
        # POST /vXX.X/PHONE_NUMBER_ID/messages
        statuses.follow(head.split(b" ", 2)[1].split(b"/")[2].decode(), wamid, about)
    return orjson.dumps(
        {
            "messaging_product": "whatsapp",
            "contacts": [contact],
            "messages": [{"id": wamid}],
        }
    )


async def model_answer(body: bytes) -> bytes:
    await asyncio.sleep(model_delay)
    messages = orjson.loads(body).get("messages", [])
    last = next((m["content"] for m in reversed(messages) if m.get("role") == "user"), "")
    text = f"echo: {last}"
    usage = {"prompt_tokens": 1, "completion_tokens": len(text.split())}
    return orjson.dumps(
        {
            "id": f"chatcmpl-{next(ids)}",
            "object": "chat.completion",
            "choices": [
                {
                    "index": 0,
                    "finish_reason": "stop",
                    "message": {"role": "assistant", "content": text},
                }
            ],
            "usage": {**usage, "total_tokens": sum(usage.values())},
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
                answered = sum(1 for key in replies if key)
                out = orjson.dumps(
                    {
                        "sent": replies.total(),
                        "answered": answered,
                        "duplicates": duplicates,
                        "last": last_reply,
                        "statuses": statuses.acked,
                        "status_errors": statuses.errors,
                    }
                )
            elif head.startswith(b"POST /statuses"):
                target = orjson.loads(body)
                if target.get("url"):
                    statuses.start(target["url"], target["secret"])
                else:
                    statuses.stop()
                out = b"{}"
            elif head.startswith(b"POST /chat/completions"):
                out = await model_answer(body)
            else:
                out = answer(head, body)
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
    if len(sys.argv) > 2:
        model_delay = float(sys.argv[2])
    uvloop.run(main(int(sys.argv[1])))
