"""`wa run` (what `make run` starts): embedded servers when DATABASE_URL / REDIS_URL are unset,
migrations, then the four services as supervised processes, in the foreground."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import sys
import time
from pathlib import Path

import asyncpg
import redis.asyncio as aioredis
import redis.exceptions
from dotenv import dotenv_values
from pydantic import TypeAdapter, ValidationError

from cli import certs
from cli.settings import CliSettings
from common import config, files, kv, logs, migrate, roles, tls
from common.redact import mask_url
from devtools import embedded, replicas, supervisor
from devtools.ports import free_port, reserve
from services.console.settings import ConsoleSettings

log = logging.getLogger("wa.run")

ROOT = Path(__file__).resolve().parent.parent
SERVICES = ("state", "agent", "dlq", "gateway")
# The operator console (services/console): one process, on loopback only under `wa run`.
CONSOLE = "console"
# The embedded Redis's admin URL, in RUN_DIR (mode 0600), for a developer's redis-cli.
REDIS_ADMIN_FILE = "redis-admin.url"
METRICS_PORTS = {"state": 9101, "agent": 9102, "dlq": 9103}


def service_command(name: str, python: str = sys.executable) -> list[str]:
    """How every service process is started, here and in docker-compose.yml."""
    return [python, "-m", f"services.{name}"]


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# The signals that stop `make run`, as bits of /proc/PID/status's SigCgt mask.
_STOP_BITS = tuple(1 << (sig - 1) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP))
PARENT_POLL_SECONDS = 0.25


def _caught(pid: int) -> int | None:
    """The signals `pid` catches (its SigCgt mask); None when that cannot be read."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("SigCgt:"):
                    return int(line.split()[1], 16)
    except (OSError, ValueError):
        return None
    return None


def _name(pid: int) -> str:
    """The process's name (procfs, whose reads never block); "" when it cannot be read."""
    try:
        with open(f"/proc/{pid}/comm") as comm:
            return comm.read().strip()
    except OSError:
        return ""


async def _follow_make(stop: asyncio.Event) -> None:
    """Sets `stop` when our parent, `make`, was sent a signal that stops it.

    GNU make passes SIGTERM on to its children but not SIGINT or SIGHUP, which it expects the
    terminal to have sent to them all (Ctrl-C does): it only waits for them to end. So a SIGINT
    sent to make alone (`kill -INT <pid of make run>`, a harness's `send_signal`) stopped
    nothing. While handling such a signal, make no longer catches it (it re-raises it once its
    children are gone): Linux shows that in /proc, and that is our stop. Elsewhere (no /proc),
    or under another parent, this does nothing."""
    parent = os.getppid()
    if _name(parent) not in {"make", "gmake"}:
        return
    before = _caught(parent)
    if before is None:
        return
    watched = [bit for bit in _STOP_BITS if before & bit]
    while not stop.is_set():
        await asyncio.sleep(PARENT_POLL_SECONDS)
        now = _caught(parent)
        if now is None or any(not now & bit for bit in watched):
            say("[wa run] make was told to stop")
            stop.set()
            return


async def _wait_postgres(dsn: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            conn = await asyncpg.connect(dsn, timeout=2)
            await conn.close()
            return
        except (OSError, asyncpg.PostgresError) as exc:
            if time.monotonic() > deadline:
                raise RuntimeError(f"PostgreSQL did not start: {exc}") from exc
            await asyncio.sleep(0.1)


async def _wait_redis(url: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    client = aioredis.Redis.from_url(url, socket_connect_timeout=1)
    try:
        while True:
            try:
                await client.ping()
                return
            except (OSError, redis.exceptions.RedisError) as exc:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"Redis did not start: {exc}") from exc
                await asyncio.sleep(0.1)
    finally:
        await client.aclose()


# `make run` stops the services within SERVICES_STOP_SECONDS: the state's and the agent's
# turns in flight finish (or are cut off) within these drains, with time left to unwind,
# unless the environment sets them: not the 15 and 20 s a deployment's orchestrator allows.
SERVICES_STOP_SECONDS = 3.5
RUN_DRAINS = {"DRAIN_SECONDS": "2", "AGENT_DRAIN_SECONDS": "2"}


# What `make run` may fill from .env.example when unset (never a deployment's).
DEVELOPMENT_VALUES = ("WHATSAPP_APP_SECRET", "WHATSAPP_VERIFY_TOKEN")


def _dev_defaults(env: dict[str, str], *, skips_signature: bool) -> list[str]:
    """Fills development-only values from .env.example; returns what was filled. Not the app
    secret when signatures are skipped: the gateway refuses the two together."""
    filled: list[str] = []
    example = {k: v for k, v in dotenv_values(ROOT / ".env.example").items() if v}
    keys = ("WHATSAPP_VERIFY_TOKEN",) if skips_signature else DEVELOPMENT_VALUES
    for key in keys:
        if not env.get(key) and key in example:
            env[key] = example[key]
            filled.append(key)
    return filled


def _skips_signature(env: dict[str, str]) -> bool:
    """Whether WHATSAPP_SKIP_SIGNATURE asks for it, read as the gateway reads it: from the
    environment only, never from .env (common/config.py, ENVIRONMENT_ONLY); a value the
    gateway refuses is its to report."""
    value = env.get("WHATSAPP_SKIP_SIGNATURE", "")
    try:
        return bool(value) and TypeAdapter(bool).validate_python(value)
    except ValidationError:
        return False


async def run() -> int:
    settings = CliSettings.from_env()
    logs.setup("run", settings.log_level)
    try:
        scale = _replicas(settings)
    except replicas.ScaleError as exc:
        say(f"[wa run] {exc}")
        return 2
    if not settings.redis_url:
        try:
            kv.state_acl_rules(settings.redis_prefix)  # the embedded server's ACL names it
        except ValueError as exc:
            say(f"[wa run] {exc}")
            return 2
    supervisor.die_with_parent(signal.SIGTERM)
    run_dir = settings.run_dir.resolve()
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    # (SIGHUP: the terminal closed. Its children, each in a session of its own, hear none
    # of these: the default action would leave them to PR_SET_PDEATHSIG, all at once, or
    # without it, running.)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        loop.add_signal_handler(sig, stop.set)
    following = asyncio.create_task(_follow_make(stop), name="follow-make")

    # Held until the end: no outgoing connection takes a replica's port (devtools/ports.py).
    held = _reserve_ports(scale, settings.grpc_host)
    sup = supervisor.Supervisor(on_event=lambda name, what: say(f"[wa run] {name}: {what}"))
    env: dict[str, str] = {}
    database_url = settings.database_url
    redis_url = settings.redis_url
    try:
        if not database_url:
            pg = await asyncio.to_thread(embedded.prepare_postgres, run_dir / "postgres")
            await sup.start(
                supervisor.Spec(
                    "postgres",
                    pg.argv,
                    stop_signal=signal.SIGINT,  # "fast" shutdown; SIGTERM waits for clients
                    user=pg.user,
                    log_file=str(run_dir / "logs" / "postgres.log"),
                )
            )
            database_url = pg.dsn
            await _wait_postgres(database_url)
        if not redis_url:
            # The state service's own ACL user, new password every run; no anonymous access.
            valkey = embedded.prepare_valkey(
                free_port(16379), run_dir / "valkey", settings.redis_prefix
            )
            await sup.start(
                supervisor.Spec(
                    "valkey", valkey.argv, log_file=str(run_dir / "logs" / "valkey.log")
                )
            )
            redis_url = valkey.url
            await _wait_redis(redis_url)
            # For a developer's redis-cli (the leases, the heartbeats); no service reads it.
            files.write_atomic(run_dir / REDIS_ADMIN_FILE, valkey.admin_url + "\n")
        applied = await migrate.migrate(database_url)
        say(f"[wa run] migrations applied: {', '.join(applied) or 'none pending'}")
        urls = await _provision(database_url, settings)

        # The owner's URL stays here: each service gets its own role's (README, Security).
        env.update(DATABASE_URL="", REDIS_URL=redis_url, RUN_DIR=str(run_dir))
        tls_dir = await _certificates(settings)
        if tls_dir is not None:
            env["GRPC_TLS_DIR"] = str(tls_dir)
        base = {**config.dotenv(), **os.environ, **env}
        filled = _dev_defaults(base, skips_signature=_skips_signature({**os.environ, **env}))
        for key in filled:
            env[key] = base[key]
            say(f"[wa run] {key} is not set: using the DEVELOPMENT value from .env.example")
        env.update({k: v for k, v in RUN_DRAINS.items() if not base.get(k)})
        for replica in scale.all():
            name = replica.service
            service_env = {**env, **scale.env_for(replica)}
            if name in urls:
                service_env[roles.VARIABLES[name]] = urls[name]
            # Replicas write a log file each (named in the list printed below).
            log_file = str(run_dir / "logs" / f"{replica.name}.log") if scale.scaled else None
            await sup.start(
                supervisor.Spec(
                    replica.name, service_command(name), env=service_env, log_file=log_file
                )
            )
        await sup.start(
            supervisor.Spec(
                CONSOLE,
                service_command(CONSOLE),
                env={
                    **env,
                    **scale.shared,
                    roles.VARIABLES["operator"]: urls["operator"],
                    "CONSOLE_HOST": "127.0.0.1",
                    "CONSOLE_GATEWAY_URL": f"http://127.0.0.1:{settings.gateway_port}",
                },
                log_file=str(run_dir / "logs" / "console.log") if scale.scaled else None,
            )
        )
        _print_endpoints(settings, database_url, redis_url, scale, run_dir, tls_dir)
        await stop.wait()
    finally:
        say("[wa run] stopping")
        sup.stopping()
        # Front door first, then the services, then the servers they use.
        # Within the contract's 10 s, with time to spare for noticing the signal.
        await sup.stop([*scale.names("gateway"), CONSOLE], timeout=3.5)
        await sup.stop(
            [r.name for r in scale.all() if r.service != "gateway"], timeout=SERVICES_STOP_SECONDS
        )
        await sup.stop(timeout=2)
        following.cancel()
        for sock in held:
            sock.close()
        say("[wa run] stopped")
    return 0


async def _certificates(settings: CliSettings) -> Path | None:
    """The development CA and each service's certificate (made once, kept while usable), or
    None when GRPC_INSECURE=true."""
    if settings.grpc_insecure:
        say("[wa run] GRPC_INSECURE=true: internal gRPC is PLAINTEXT and UNAUTHENTICATED")
        return None
    tls_dir = settings.tls_dir.resolve()
    written = await asyncio.to_thread(tls.create, tls_dir)
    if written:
        say(f"[wa run] certificates for internal mutual TLS written to {tls_dir}")
    return tls_dir


async def _provision(database_url: str, settings: CliSettings) -> dict[str, str]:
    """Each service's login role on this database; says where generated URLs were kept."""
    urls, written = await roles.provision_configured(database_url, settings)
    names = ", ".join(f"{s}={roles.user_of(u)[0]}" for s, u in urls.items())
    say(f"[wa run] database roles: {names}")
    if written is not None:
        say(f"[wa run] their URLs (with generated passwords) are in {written} (mode 0600)")
    return urls


def _replicas(settings: CliSettings) -> replicas.Plan:
    """Every process of each service: one, or as many as WA_SCALE says (devtools/replicas.py)."""
    metrics = {
        name: int(os.environ.get(f"{name.upper()}_METRICS_PORT", port))
        for name, port in METRICS_PORTS.items()
    }
    grpc_ports = {
        "state": settings.state_port,
        "agent": settings.agent_port,
        "dlq": settings.dlq_port,
    }
    return replicas.plan(
        replicas.parse(settings.scale),
        grpc_ports,
        metrics,
        port_for=free_port,
        pool_size=settings.database_pool_size,
    )


def _reserve_ports(scale: replicas.Plan, host: str) -> list[socket.socket]:
    """Every gRPC and metrics port the replicas will listen on, reserved (`ports.reserve`); a
    port that cannot be reserved any more is left for its replica's bind to report."""
    held = []
    for replica in scale.all():
        for port in (replica.grpc_port, replica.metrics_port):
            if port:
                try:
                    held.append(reserve(port, host))
                except OSError as exc:
                    log.warning("port %s cannot be reserved: %s", port, exc)
    return held


def _print_endpoints(
    settings: CliSettings,
    database_url: str,
    redis_url: str,
    scale: replicas.Plan,
    run_dir: Path,
    tls_dir: Path | None,
) -> None:
    gw = f"http://127.0.0.1:{settings.gateway_port}"
    lines = ["", "  wa is running. Ctrl-C stops everything."]
    for r in scale.all():
        if r.service == "gateway":
            where = f"{gw}/webhook   ({gw}/healthz, /readyz, /metrics)"
            if len(scale.replicas["gateway"]) > 1:
                where = f"{gw}/webhook   (port shared by the gateway replicas)"
        else:
            where = f"grpc {settings.grpc_host}:{r.grpc_port}   metrics :{r.metrics_port}"
        log_file = f"   log {run_dir / 'logs' / r.name}.log" if scale.scaled else ""
        lines.append(f"  {r.name:<9} {where}{log_file}")
    for name, target in scale.shared.items():
        if name.endswith("_ADDR"):
            lines.append(f"  {name:<10} {target}   (clients use every replica)")
    console_port = ConsoleSettings.from_env().console_port
    lines.append(
        f"  console   http://127.0.0.1:{console_port}/   (first operator: "
        ".venv/bin/wa operator add NAME --role admin)"
    )
    lines += [
        f"  postgres  {mask_url(database_url)}",
        f"  redis     {mask_url(redis_url)}",
    ]
    if not settings.redis_url:
        admin = run_dir / REDIS_ADMIN_FILE
        lines.append(f'            (every command: redis-cli -u "$(cat {admin})")')
    if tls_dir is None:
        lines.append("  grpc      PLAINTEXT (GRPC_INSECURE=true): development only")
    else:
        lines += [
            f"  certs     {tls_dir} (mutual TLS; wa uses operator.crt)",
            f"  grpcurl   {certs.grpcurl(tls_dir, f'127.0.0.1:{settings.dlq_port}')} list",
        ]
    lines += ['  try:      .venv/bin/wa simulate "hello"', ""]
    say("\n".join(lines))


def main() -> int:
    return asyncio.run(run())
