"""The same burst against our system and against the peer users would pick instead: a minimal
pywa bot (bench/peer_bot.py), with pywa's defaults and with other settings.

Each run posts a burst of signed deliveries (MESSAGES_PER_CONVERSATION x 200 conversations)
over 32 keep-alive connections (bench.load), then waits until every message has its reply at
the Graph API stand-in (bench/graph.py, a fresh one per run) or until no reply has come for
--settle seconds. It reports, per run and as medians over --repeat runs:

- messages/s: distinct messages answered / (last reply - first POST);
- CPU per message: the system's CPU (from /proc, bench.cpu) / messages posted. For ours: every
  service, PostgreSQL and the Redis-compatible server; for pywa: its process and its workers
  (it has no database);
- lost: posted - answered when the run ends; duplicates: messages answered more than once.

With --statuses the stand-in also posts every reply's three status webhooks (sent, delivered,
read), as Meta does, to the system under test; the run then also waits until they are all
acknowledged (ours acknowledges a delivery once stored), and CPU per message includes them.

Ours marks each message read, with a typing indicator, as its turn starts (the agent's
mark_read: two Graph API calls a message, with the reply). With --typing the pywa bot does the
same (`Message.indicate_typing` before its reply), so that both do the same work; its rows are
then named `<setting>+typing`. Without it, the bot only replies.

Every customer carries a business-scoped user id (as Meta names customers since BSUIDs: pywa
4.5 cannot parse a contact without one); half also carry a phone number.

pywa is an optional extra: `uv sync --extra peer` (or `make bench-peer`).

    .venv/bin/python -m bench.peer [--per 25] [--repeat 3] [--typing]
        [--run ours --run pywa-quiet ...]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import orjson

from cli.simulate import text_delivery, username_bsuid
from devtools.ports import free_port
from devtools.system import SECRET, VERIFY_TOKEN

from . import cpu, graph, harness, load
from .e2e import _cpu as system_cpu

CONVERSATIONS = 200
CONNECTIONS = 32


@dataclass(frozen=True)
class Peer:
    """One way of running the pywa bot: its client, thread limit, pool and uvicorn workers."""

    client: str = "sync"
    threads: int | None = None
    connections: int | None = None
    pool_timeout: str | None = None  # None: httpx's 5 s; "none": wait for ever
    workers: int | None = None
    log_level: str | None = None  # None: `pywa run`'s own default, info
    # Each message marked read with a typing indicator before its reply: the Graph API calls
    # ours makes for a message (the agent's mark_read), so the same work for both.
    typing: bool = False
    about: str = ""


PEERS: dict[str, Peer] = {
    "pywa-default": Peer(about="`pywa run`, sync client: 40 threads, httpx's pool, info logs"),
    "pywa-quiet": Peer(log_level="warning", about="the defaults, but warning logs"),
    "pywa-threads16": Peer(
        threads=16, log_level="warning", about="sync, 16 handlers in flight, warning logs"
    ),
    "pywa-threads64": Peer(
        threads=64,
        connections=64,
        log_level="warning",
        about="sync, 64 handlers in flight (AnyIO threads), 64 connections",
    ),
    "pywa-threads64-2w": Peer(
        threads=64,
        connections=64,
        workers=2,
        log_level="warning",
        about="sync, 64 threads and 64 connections in each of 2 uvicorn workers",
    ),
    "pywa-async": Peer(
        client="async", log_level="warning", about="pywa_async: handlers on the event loop"
    ),
    "pywa-async-64": Peer(
        client="async",
        connections=64,
        pool_timeout="none",
        log_level="warning",
        about="pywa_async, 64 connections, requests wait for one without a time limit",
    ),
    "pywa-async-2w": Peer(
        client="async",
        workers=2,
        log_level="warning",
        about="pywa_async in each of 2 uvicorn workers",
    ),
}

# The first table (docs/benchmarks.md, "Against pywa"): ours, pywa's defaults, the best
# settings found, the 64 handlers in flight, and pywa's async client. (The README's
# keeps the first three: `--run ours --run pywa-default --run pywa-quiet`.)
DEFAULT_RUNS = ["ours", "pywa-default", "pywa-quiet", "pywa-threads64", "pywa-async"]


@dataclass(frozen=True)
class Run:
    name: str
    posted: int
    not_acked: int
    answered: int
    duplicates: int
    seconds: float
    cpu_ms: float | None  # per message posted; None without /proc
    cpu_parts: dict[str, float]  # the same per process (tree) or server
    statuses: int = 0  # status webhooks acknowledged (--statuses)
    statuses_refused: int = 0  # and refused, each after bench.graph.ATTEMPTS tries

    @property
    def rate(self) -> float:
        return self.answered / self.seconds if self.seconds > 0 else 0.0

    @property
    def lost(self) -> int:
        return self.posted - self.answered


def delivery(conv: int, n: int, base_ts: int) -> dict[str, Any]:
    user_id = username_bsuid(f"customer-{conv}")
    phone = f"1555{conv:07d}" if conv % 2 else None
    text = f"c{conv:03d}-m{n} please help"
    return text_delivery(text, wa_id=phone, user_id=user_id, timestamp=base_ts + n)


async def _replies(client: httpx.AsyncClient, graph_url: str) -> dict[str, Any]:
    out: dict[str, Any] = (await client.get(f"{graph_url}/replies")).json()
    return out


async def burst(
    name: str,
    url: str,
    graph_url: str,
    per: int,
    settle: float,
    cpu_now: Any,
    kill: Any = None,
    rate: float | None = None,
    statuses: bool = False,
) -> Run:
    """Posts the burst to `url` and waits for its replies; `cpu_now()` gives the system's CPU
    seconds so far; `kill()`, if given, is called once every delivery is acknowledged. With
    `statuses`, also waits for the replies' status webhooks to be acknowledged."""
    base = int(time.time())
    host = url.split("//")[1].split("/")[0]
    path = "/" + url.split("//")[1].partition("/")[2]
    requests = [
        load.signed_request(host, path, SECRET, orjson.dumps(delivery(c, n, base)))
        for n in range(per)
        for c in range(CONVERSATIONS)
    ]
    total = len(requests)
    async with httpx.AsyncClient(timeout=10) as client:
        if statuses:
            await client.post(f"{graph_url}/statuses", json={"url": url, "secret": SECRET})
        before = cpu_now()
        started = time.monotonic()
        not_acked = await load.post_all(url, requests, CONNECTIONS, rate)
        if kill is not None:
            kill()
        answered, last_change, deadline = -1, time.monotonic(), started + 900
        while True:
            counts = await _replies(client, graph_url)
            now = time.monotonic()
            if counts["answered"] != answered:
                answered, last_change = counts["answered"], now
            if answered >= total or now - last_change > settle or now > deadline:
                break
            await asyncio.sleep(0.05)
        if statuses:
            counts = await _statuses_done(client, graph_url, answered, settle)
            await client.post(f"{graph_url}/statuses", json={"url": None})
        after = cpu_now()
    seconds = (counts["last"] - started) if answered else 0.0
    parts = cpu.per_message(before, after, total)
    cpu_ms = sum(parts.values()) if parts else None
    return Run(
        name,
        total,
        not_acked,
        answered,
        counts["duplicates"],
        seconds,
        cpu_ms,
        parts,
        counts.get("statuses", 0),
        counts.get("status_errors", 0),
    )


async def _statuses_done(
    client: httpx.AsyncClient, graph_url: str, answered: int, settle: float
) -> dict[str, Any]:
    """The stand-in's counts once the statuses of `answered` replies were all acknowledged or
    refused, or once none was for `settle` seconds."""
    expected = len(graph.STATUSES) * answered
    posted, last_change = -1, time.monotonic()
    while True:
        counts = await _replies(client, graph_url)
        now = time.monotonic()
        if counts["statuses"] + counts["status_errors"] != posted:
            posted, last_change = counts["statuses"] + counts["status_errors"], now
        if posted >= expected or now - last_change > settle:
            return counts
        await asyncio.sleep(0.05)


async def run_ours(
    s: harness.Servers,
    per: int,
    settle: float,
    rate: float | None = None,
    statuses: bool = False,
    rows: int = 0,
) -> Run:
    """One burst against a fresh system (its own database) on the shared servers; with `rows`,
    after writing a business's history of that many messages."""
    with harness.graph_standin() as graph_url:
        async with s.system(WHATSAPP_API_BASE_URL=graph_url) as system:
            if rows:
                await harness.write_history(system, rows)
            return await burst(
                "ours",
                f"{system.url}/webhook",
                graph_url,
                per,
                settle,
                lambda: system_cpu(s, system),
                rate=rate,
                statuses=statuses,
            )


def peer_env(peer: Peer, graph_url: str) -> dict[str, str]:
    env = {
        **os.environ,
        "PEER_GRAPH_URL": graph_url,
        "PEER_CLIENT": peer.client,
        "PEER_APP_SECRET": SECRET,
        "PEER_VERIFY_TOKEN": VERIFY_TOKEN,
    }
    for key, value in (
        ("PEER_THREADS", peer.threads),
        ("PEER_CONNECTIONS", peer.connections),
        ("PEER_POOL_TIMEOUT", peer.pool_timeout),
        ("PEER_TYPING", "1" if peer.typing else None),
    ):
        env.pop(key, None)
        if value is not None:
            env[key] = str(value)
    return env


@contextlib.asynccontextmanager
async def pywa_bot(peer: Peer, graph_url: str, log: Path) -> AsyncIterator[tuple[str, int]]:
    """Starts the bot with `pywa run`; yields its webhook URL and its pid."""
    port = free_port()
    argv = [sys.executable, "-m", "pywa", "run", "--entrypoint", "bench.peer_bot:wa"]
    argv += ["--port", str(port)]
    if peer.workers:
        argv += ["--workers", str(peer.workers)]
    if peer.log_level:
        argv += ["--log-level", peer.log_level]
    with log.open("ab") as out:
        # Its own process group: --kill-after-ack kills the workers too.
        proc = subprocess.Popen(  # noqa: ASYNC220 (starting it does not wait for it)
            argv,
            env=peer_env(peer, graph_url),
            stdout=out,
            stderr=out,
            start_new_session=True,
        )
    try:
        url = f"http://127.0.0.1:{port}/"
        await _ready(url, proc, peer.workers or 1)
        yield url, proc.pid
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                await asyncio.to_thread(proc.wait, 15)
            except subprocess.TimeoutExpired:
                proc.kill()
                await asyncio.to_thread(proc.wait, 5)


async def _ready(url: str, proc: subprocess.Popen[bytes], workers: int) -> None:
    """Waits until the verification handshake is answered `workers` times in a row (each
    connection may reach another worker), for at most 60 s."""
    params = {"hub.mode": "subscribe", "hub.verify_token": VERIFY_TOKEN, "hub.challenge": "ok"}
    deadline = time.monotonic() + 60
    ok = 0
    while ok < 4 * workers:
        if proc.poll() is not None:
            raise RuntimeError(f"the pywa bot exited with {proc.returncode}")
        if time.monotonic() > deadline:
            raise RuntimeError("the pywa bot did not answer its handshake in 60 s")
        try:
            async with httpx.AsyncClient(timeout=2) as client:
                ok = ok + 1 if (await client.get(url, params=params)).text == "ok" else 0
        except httpx.HTTPError:
            ok = 0
            await asyncio.sleep(0.2)


async def run_peer(
    name: str,
    peer: Peer,
    per: int,
    settle: float,
    log: Path,
    kill: bool,
    rate: float | None = None,
    statuses: bool = False,
) -> Run:
    """One burst against a fresh pywa bot."""
    with harness.graph_standin() as graph_url:
        async with pywa_bot(peer, graph_url, log) as (url, pid):
            return await burst(
                name,
                url,
                graph_url,
                per,
                settle,
                lambda: cpu.snapshot({"pywa": pid}, {}),
                (lambda: os.killpg(pid, signal.SIGKILL)) if kill else None,
                rate,
                statuses,
            )


def line(r: Run) -> str:
    cpu_ms = f"{r.cpu_ms:.2f} ms" if r.cpu_ms is not None else "n/a"
    if len(r.cpu_parts) > 1:
        cpu_ms += " (" + ", ".join(f"{k} {v:.2f}" for k, v in r.cpu_parts.items()) + ")"
    return (
        f"{r.name:<20} {r.rate:6.0f} messages/s  CPU {cpu_ms}/message  answered {r.answered}"
        f"/{r.posted}  lost {r.lost}  duplicates {r.duplicates}  not acknowledged {r.not_acked}"
        f"  ({r.seconds:.1f} s)"
        + (f"  statuses {r.statuses} (refused {r.statuses_refused})" if r.statuses else "")
    )


def summary(results: dict[str, list[Run]]) -> Iterator[str]:
    """Medians per configuration, with throughput and CPU relative to ours when measured."""
    med: dict[str, tuple[float, float | None, float, float]] = {}
    for name, runs in results.items():
        cpus = [r.cpu_ms for r in runs if r.cpu_ms is not None]
        med[name] = (
            statistics.median(r.rate for r in runs),
            statistics.median(cpus) if cpus else None,
            statistics.median(r.lost for r in runs),
            statistics.median(r.duplicates for r in runs),
        )
    ours = med.get("ours")
    yield "| system | messages/s | CPU per message | lost | duplicates | vs ours (msg/s, CPU) |"
    yield "| --- | --- | --- | --- | --- | --- |"
    for name, (rate, cpu_ms, lost, dups) in med.items():
        runs = results[name]
        posted = runs[0].posted
        cpu_s = f"{cpu_ms:.2f} ms" if cpu_ms is not None else "n/a"
        vs = ""
        if ours and name != "ours" and ours[0]:
            vs = f"{rate / ours[0]:.2f}"
            if cpu_ms is not None and ours[1]:
                vs += f", {cpu_ms / ours[1]:.2f}"
        yield (f"| {name} | {rate:.0f} | {cpu_s} | {lost:.0f} of {posted} | {dups:.0f} | {vs} |")


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.peer",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        epilog="pywa settings: "
        + "; ".join(f"{name}: {peer.about}" for name, peer in PEERS.items()),
    )
    parser.add_argument(
        "--per", type=int, default=25, help="messages per conversation (200 conversations)"
    )
    parser.add_argument("--repeat", type=int, default=3, help="runs of each (medians reported)")
    parser.add_argument(
        "--run",
        action="append",
        choices=["ours", *PEERS],
        help="what to run (repeatable; default: " + ", ".join(DEFAULT_RUNS) + ")",
    )
    parser.add_argument(
        "--settle",
        type=float,
        default=10.0,
        help="a run ends once no reply has come for this many seconds",
    )
    parser.add_argument(
        "--rate",
        type=float,
        help="offer the messages at this rate (messages/s) instead of as fast as acknowledged",
    )
    parser.add_argument(
        "--statuses",
        action="store_true",
        help="the stand-in posts every reply's statuses (sent, delivered, read) as Meta does;"
        " CPU per message includes them",
    )
    parser.add_argument(
        "--rows",
        type=int,
        default=0,
        metavar="N",
        help="ours: first write a business's history of N answered messages (bench.e2e --rows)",
    )
    parser.add_argument(
        "--typing",
        action="store_true",
        help="the pywa bot marks each message read with a typing indicator before replying,"
        " as ours does",
    )
    parser.add_argument(
        "--kill-after-ack",
        action="store_true",
        help="SIGKILL the pywa bot once every delivery is acknowledged: what it loses",
    )
    parser.add_argument(
        "--log", type=Path, default=Path("/tmp/bench-peer.log"), help="the pywa bot's output"
    )
    args = parser.parse_args()
    names = args.run or DEFAULT_RUNS
    harness.analyzed_plans()  # as bench.e2e: ours on analyzed tables, as deployed
    results: dict[str, list[Run]] = {}

    async def go() -> None:
        async with contextlib.AsyncExitStack() as stack:
            s = await stack.enter_async_context(harness.servers()) if "ours" in names else None
            # Interleaved (each configuration once, then again), so that the machine's drift
            # is shared rather than falling on one configuration.
            for _ in range(args.repeat):
                for name in names:
                    if s is not None and name == "ours":
                        run = await run_ours(
                            s, args.per, args.settle, args.rate, args.statuses, args.rows
                        )
                    else:
                        peer, label = PEERS[name], name
                        if args.typing:
                            peer, label = dataclasses.replace(peer, typing=True), f"{name}+typing"
                        run = await run_peer(
                            label,
                            peer,
                            args.per,
                            args.settle,
                            args.log,
                            args.kill_after_ack,
                            args.rate,
                            args.statuses,
                        )
                    print(line(run), flush=True)
                    results.setdefault(run.name, []).append(run)

    asyncio.run(go())
    print()
    offered = f", offered at {args.rate:g}/s" if args.rate else ""
    offered += ", each reply followed by 3 status webhooks" if args.statuses else ""
    offered += f", ours on a history of {args.rows} messages" if args.rows else ""
    print(
        f"{args.per * CONVERSATIONS} messages over {CONVERSATIONS} conversations{offered},"
        " medians of"
    )
    print(f"{args.repeat} runs, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    for row in summary(results):
        print(row)


if __name__ == "__main__":
    main()
