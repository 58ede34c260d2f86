"""Stand-ins for the Graph API and the model, for benchmarks, in their own process on raw
asyncio streams.

Meta's servers and the model cost the system nothing on its own machine; the tests' threaded
fakes cost this machine's CPU per call (README, Benchmarks), which a benchmark would count
against the system. This one answers `POST .../messages` like the Graph API, counts replies
per inbound message (`context.message_id`; mark-as-read calls are answered, not counted) and
reports `{"sent": N, "answered": N, "duplicates": N, "last": T}` at `GET /replies` (calls,
distinct message ids answered, ids answered more than once, `time.monotonic()` of the last
reply); `POST /chat/completions` is an OpenAI-compatible model that echoes the last user
message after MODEL_DELAY seconds.

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

replies: Counter[str] = Counter()
ids = itertools.count(1)
model_delay = 0.0
last_reply = 0.0


def answer(body: bytes) -> bytes:
    global last_reply
    doc = orjson.loads(body)
    if doc.get("status") == "read":
        return b'{"success":true}'
    replies[doc.get("context", {}).get("message_id", "")] += 1
    last_reply = time.monotonic()
    # As the Graph API answers: the recipient as given, and as a phone number (`to`) or a
    # business-scoped user id (`recipient`).
    if "recipient" in doc:
        contact = {"input": doc["recipient"], "user_id": doc["recipient"]}
    else:
        contact = {"input": doc.get("to", ""), "wa_id": doc.get("to", "")}
    return orjson.dumps(
        {
            "messaging_product": "whatsapp",
            "contacts": [contact],
            "messages": [{"id": f"wamid.bench{next(ids)}"}],
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
                    }
                )
            elif head.startswith(b"POST /chat/completions"):
                out = await model_answer(body)
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
    if len(sys.argv) > 2:
        model_delay = float(sys.argv[2])
    uvloop.run(main(int(sys.argv[1])))
