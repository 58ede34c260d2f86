"""The whole system as real processes: the four services on free ports, supervised, with
their logs kept for assertions and for reading when a test (or a benchmark) fails. `WA_SCALE`
in its environment runs replicas (devtools/replicas.py): each its own process and log file."""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path
from typing import Any, ClassVar

import asyncpg
import httpx
import orjson

from cli.run import RUN_DRAINS
from common import roles, tls
from services.gateway import signature

from . import replicas, supervisor
from .ports import free_port
from .replicas import Replica

SECRET = "test-app-secret"
VERIFY_TOKEN = "test-verify-token"
ACCESS_TOKEN = "test-access-token"
SERVICES = ("state", "agent", "dlq", "gateway")
# Each database's service URLs, as provisioned by this process (roles.provision).
_provisioned: dict[str, dict[str, str]] = {}


def sign(doc: dict[str, Any] | bytes, secret: str) -> tuple[bytes, dict[str, str]]:
    """A delivery's body and the headers Meta sends with it, signed with `secret`."""
    body = doc if isinstance(doc, bytes) else orjson.dumps(doc)
    return body, {
        "Content-Type": "application/json",
        "X-Hub-Signature-256": signature.sign(body, secret),
    }


class System:
    # Systems running now: a failing test's report shows their logs (tests/conftest.py).
    running: ClassVar[set[System]] = set()

    def __init__(
        self, root: Path, database_url: str, redis_url: str, redis_prefix: str, env: dict[str, str]
    ) -> None:
        self.root = root
        self.database_url = database_url
        self.ports = {
            name: free_port()
            for name in ("gateway", "state", "agent", "dlq", "m_state", "m_agent", "m_dlq")
        }
        self.env = {
            "DATABASE_URL": "",  # the services never connect as the owner
            "REDIS_URL": redis_url,
            "REDIS_KEY_PREFIX": redis_prefix,
            "WHATSAPP_APP_SECRET": SECRET,
            "WHATSAPP_VERIFY_TOKEN": VERIFY_TOKEN,
            "WHATSAPP_ACCESS_TOKEN": ACCESS_TOKEN,
            "WHATSAPP_API_VERSION": "v23.0",
            "GATEWAY_HOST": "127.0.0.1",
            "GATEWAY_PORT": str(self.ports["gateway"]),
            "STATE_GRPC_PORT": str(self.ports["state"]),
            "AGENT_GRPC_PORT": str(self.ports["agent"]),
            "DLQ_GRPC_PORT": str(self.ports["dlq"]),
            "LOG_LEVEL": "INFO",
            "OTEL_SDK_DISABLED": "true",
            # As `make run` sets them: a stopped service's teardown stays short.
            **RUN_DRAINS,
            # Each system its own CA: one system's certificates are refused by another's.
            "GRPC_TLS_DIR": str(root / "tls"),
            **env,
        }
        if self.env.get("GRPC_INSECURE", "").lower() != "true":
            tls.create(Path(self.env["GRPC_TLS_DIR"]))
        # Every replica of each service (one each unless env has WA_SCALE).
        self.scale = replicas.plan(
            replicas.parse(self.env.get("WA_SCALE", "")),
            grpc_ports={s: self.ports[s] for s in replicas.GRPC_SERVICES},
            metrics_ports={s: self.ports[f"m_{s}"] for s in replicas.GRPC_SERVICES},
            port_for=lambda _preferred: free_port(),
        )
        # What the supervisor saw (starts, exits, restarts), for a failing test's report.
        self.events: list[str] = []
        self.sup = supervisor.Supervisor(
            backoff_base=0.2,
            backoff_max=2.0,
            on_event=lambda name, what: self.events.append(
                f"{time.strftime('%H:%M:%S')} {name}: {what}"
            ),
        )
        self.url = f"http://127.0.0.1:{self.ports['gateway']}"
        # uvicorn closes a connection idle for 5 s, and httpx reuses one idle for up to 5 s by
        # default: a request sent on a connection at that instant fails with ReadError. Idle
        # connections are let go well before the server lets go of them.
        self.http = httpx.AsyncClient(timeout=15, limits=httpx.Limits(keepalive_expiry=2.0))
        self._db: asyncpg.Pool | None = None
        self.console_url = ""  # start_console()

    def transport(self, identity: str = "operator") -> tls.Transport:
        """How a test calls the services as `identity` (plaintext when GRPC_INSECURE=true)."""
        if self.env.get("GRPC_INSECURE", "").lower() == "true":
            return None
        return tls.Credentials.load(Path(self.env["GRPC_TLS_DIR"]), identity)

    async def provision(self) -> dict[str, str]:
        """Each service's login role on this system's database (once per database and test
        process: a second system on it reuses the roles and their passwords). The services
        get their own role's URL; the owner's (`database_url`, `db()`) is the tests'. A URL
        the test chose in `env` is provisioned as given."""
        urls = _provisioned.get(self.database_url)
        if urls is None:
            # A test may choose a service's login (as compose's secrets do): it is kept.
            given = {s: self.env[v] for s, v in roles.VARIABLES.items() if self.env.get(v)}
            urls = await roles.provision(self.database_url, given)
            _provisioned[self.database_url] = urls
        for service, url in urls.items():
            self.env.setdefault(roles.VARIABLES[service], url)
        return urls

    def env_for(self, name: str) -> dict[str, str]:
        env = dict(self.env)
        if name != "gateway":
            env["METRICS_PORT"] = str(self.ports[f"m_{name}"])
        return env

    def log_path(self, name: str) -> Path:
        return self.root / f"{name}.log"

    def replicas(self, service: str) -> list[str]:
        """The process names of a service's replicas (just `service` when it runs alone)."""
        return self.scale.names(service)

    def _processes(self, names: tuple[str, ...]) -> list[Replica]:
        """Services (all their replicas) or single replicas, by name."""
        wanted = set(names)
        return [r for r in self.scale.all() if r.service in wanted or r.name in wanted]

    async def start(self, names: tuple[str, ...] = SERVICES, wait: bool = True) -> System:
        System.running.add(self)
        await self.provision()
        processes = self._processes(names)
        for replica in processes:
            await self.sup.start(
                supervisor.Spec(
                    replica.name,
                    [sys.executable, "-m", f"services.{replica.service}"],
                    env={**self.env_for(replica.service), **self.scale.env_for(replica)},
                    log_file=str(self.log_path(replica.name)),
                )
            )
        if wait:
            # Each Python process spends a second or two of CPU starting: replicas take longer.
            await self.wait_ready(timeout=30.0 + 10.0 * max(0, len(processes) - len(SERVICES)))
        return self

    async def start_console(self, **env: str) -> str:
        """The operator console (services/console) as its own process, on a free loopback
        port with the operator role's URL; returns its base URL once it answers."""
        await self.provision()
        port = free_port()
        await self.sup.start(
            supervisor.Spec(
                "console",
                [sys.executable, "-m", "services.console"],
                env={
                    **self.env,
                    **self.scale.shared,
                    "CONSOLE_HOST": "127.0.0.1",
                    "CONSOLE_PORT": str(port),
                    "CONSOLE_GATEWAY_URL": self.url,
                    **env,
                },
                log_file=str(self.log_path("console")),
            )
        )
        self.console_url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                if (
                    await self.http.get(f"{self.console_url}/healthz", timeout=2)
                ).status_code == 200:
                    return self.console_url
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"console not ready\n{self.tail_logs()}")
            await asyncio.sleep(0.1)

    async def restart(self, name: str, **env: str) -> None:
        """Stops one service and starts it again, with `env` changed."""
        await self.sup.stop([r.name for r in self._processes((name,))])
        self.env.update(env)
        await self.start((name,), wait=False)

    def kill(self, name: str) -> int:
        """SIGKILLs one service or replica (the supervisor restarts it); returns the killed
        pid."""
        import os
        import signal

        pid = self.sup.pid(name)
        assert pid is not None, f"{name} is not running"
        os.kill(pid, signal.SIGKILL)
        return pid

    async def deliver(self, doc: dict[str, Any], timeout: float = 90.0) -> httpx.Response:
        """Posts until the gateway answers 200, as Meta does (it retries non-200 answers)."""
        deadline = time.monotonic() + timeout
        delay = 0.1
        while True:
            try:
                resp = await self.post(doc)
                if resp.status_code == 200:
                    return resp
                assert resp.status_code in (502, 503, 504), resp.text
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("delivery never acknowledged")
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)

    async def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            try:
                resp = await self.http.get(f"{self.url}/readyz", timeout=5)
                if resp.status_code == 200:
                    return
                last = resp.text
            except httpx.HTTPError as exc:
                last = repr(exc)
            await asyncio.sleep(0.1)
        raise TimeoutError(f"system not ready: {last}\n{self.tail_logs()}")

    def tail_logs(self, lines: int = 30) -> str:
        out = ["--- supervisor ---", *self.events[-lines:]]
        for name in [*(r.name for r in self.scale.all()), "console"]:
            path = self.log_path(name)
            if path.exists():
                text = path.read_text(errors="replace").splitlines()[-lines:]
                out.append(f"--- {name} ---\n" + "\n".join(text))
        return "\n".join(out)

    def log_lines(self, name: str) -> list[dict[str, Any]]:
        result = []
        for line in self.log_path(name).read_text(errors="replace").splitlines():
            if line.startswith("{"):
                try:
                    result.append(orjson.loads(line))
                except orjson.JSONDecodeError:
                    pass
        return result

    async def stop(self) -> None:
        System.running.discard(self)
        await self.sup.stop(timeout=10)
        await self.http.aclose()
        if self._db is not None:
            await self._db.close()

    async def db(self) -> asyncpg.Pool:
        if self._db is None:
            self._db = await asyncpg.create_pool(self.database_url, min_size=1, max_size=4)
        assert self._db is not None
        return self._db

    async def post(
        self,
        doc: dict[str, Any] | bytes,
        secret: str = SECRET,
        headers: dict[str, str] | None = None,
    ) -> httpx.Response:
        body, signed = sign(doc, secret)
        return await self.http.post(
            f"{self.url}/webhook", content=body, headers={**signed, **(headers or {})}
        )

    async def statuses(self) -> dict[str, str]:
        pool = await self.db()
        rows = await pool.fetch(
            "SELECT message_id, status FROM processed_webhook_messages WHERE kind = 'message'"
        )
        return {r["message_id"]: r["status"] for r in rows}

    async def wait_status(
        self, message_ids: list[str], statuses: set[str], timeout: float = 30.0
    ) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        current: dict[str, str] = {}
        while time.monotonic() < deadline:
            current = await self.statuses()
            if all(current.get(m) in statuses for m in message_ids):
                return current
            await asyncio.sleep(0.1)
        missing = {m: current.get(m) for m in message_ids if current.get(m) not in statuses}
        pool = await self.db()
        trail = []
        for m in list(missing)[:3]:
            rows = await pool.fetch(
                "SELECT from_state, to_state, reason FROM conversation_state_transitions "
                "WHERE message_id = $1 ORDER BY id",
                m,
            )
            trail.append(
                f"{m}: "
                + " | ".join(f"{r['from_state']}->{r['to_state']} ({r['reason']})" for r in rows)
            )
        raise TimeoutError(
            f"not {statuses}: {list(missing.items())[:5]}\n"
            + "\n".join(trail)
            + f"\n{self.tail_logs()}"
        )
