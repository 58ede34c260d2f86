"""End to end with the rules backend: messages across 200 conversations, from the first POST
to the last reply at the (fake, loopback) Graph API. Target: at least 500 messages/s.

    .venv/bin/python -m bench.e2e [MESSAGES_PER_CONVERSATION]
"""

from __future__ import annotations

import asyncio
import sys
import time

import orjson

from tests.support import conversations as cv
from tests.support.fakes import FakeGraph
from tests.support.system import SECRET

from . import harness, load

CONVERSATIONS = 200


async def main() -> None:
    per = int(sys.argv[1]) if len(sys.argv) > 1 else 10
    graph = FakeGraph().start()
    try:
        async with harness.servers() as s, s.system(WHATSAPP_API_BASE_URL=graph.url) as system:
            base = int(time.time())
            docs = [cv.message_doc(c, n, base) for n in range(per) for c in range(CONVERSATIONS)]
            total = len(docs)
            host = system.url.split("//")[1]
            requests = [
                load.signed_request(host, "/webhook", SECRET, orjson.dumps(doc)) for _, doc in docs
            ]
            started = time.monotonic()
            errors = await load.post_all(f"{system.url}/webhook", requests, 32)
            acked = time.monotonic() - started
            assert errors == 0, f"{errors} deliveries were not acknowledged"
            await asyncio.to_thread(graph.wait_for, lambda: len(graph.sends) >= total, 600)
            elapsed = time.monotonic() - started
            replies = cv.replies_per_message(graph)
            print(f"{total} messages across {CONVERSATIONS} conversations (rules backend)")
            print(f"  all acknowledged after {acked:.1f} s ({total / acked:.0f} acks/s)")
            print(
                f"  {len(graph.sends)} replies after {elapsed:.1f} s: "
                f"{len(graph.sends) / elapsed:.0f} messages/s end to end"
            )
            print(f"  duplicates: {sum(1 for n in replies.values() if n > 1)}")
    finally:
        graph.stop()


if __name__ == "__main__":
    asyncio.run(main())
