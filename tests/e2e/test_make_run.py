"""`make run`: the whole system from the Makefile, stopped by SIGTERM with nothing left behind;
with WA_SCALE, replicas of the services, each restarted on its own when killed."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest
import redis

from common import roles
from devtools.ports import free_port
from tests.support import payloads

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]


def _wait_ready(make_run: tuple[subprocess.Popen[bytes], str, Path], timeout: float = 90) -> None:
    """Until the gateway is ready; else fails with the end of what `make run` printed (and as
    soon as it has exited), so a failure in CI says why."""
    proc, url, log = make_run
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(f"{url}/readyz", timeout=3).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    state = "did not become ready" if proc.poll() is None else f"exited with {proc.returncode}"
    raise TimeoutError(f"make run {state}:\n{log.read_text(errors='replace')[-4000:]}")


def _service_pid(root: psutil.Process, module: str) -> int | None:
    for p in root.children(recursive=True):
        try:
            if module in " ".join(p.cmdline()):
                return int(p.pid)
        except psutil.NoSuchProcess:
            continue
    return None


@pytest.fixture
def make_run(
    tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[tuple[subprocess.Popen[bytes], str, Path]]:
    ports = {k: free_port() for k in ("gw", "st", "ag", "dq", "ms", "ma", "md", "co")}
    env = {
        **getattr(request, "param", {}),
        **{k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL")},
        "RUN_DIR": str(tmp_path / "run"),
        "GATEWAY_PORT": str(ports["gw"]),
        "STATE_GRPC_PORT": str(ports["st"]),
        "AGENT_GRPC_PORT": str(ports["ag"]),
        "DLQ_GRPC_PORT": str(ports["dq"]),
        "STATE_METRICS_PORT": str(ports["ms"]),
        "AGENT_METRICS_PORT": str(ports["ma"]),
        "DLQ_METRICS_PORT": str(ports["md"]),
        "CONSOLE_PORT": str(ports["co"]),
    }
    log = (tmp_path / "make-run.log").open("wb")
    proc = subprocess.Popen(
        ["make", "--no-print-directory", "run"],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        yield proc, f"http://127.0.0.1:{ports['gw']}", tmp_path / "make-run.log"
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)
        log.close()


def test_make_run_serves_and_sigterm_leaves_nothing_behind(make_run: tuple) -> None:  # type: ignore[type-arg]
    proc, url, log = make_run
    run_dir = log.parent / "run"
    _wait_ready(make_run)
    root = psutil.Process(proc.pid)
    family = [p.pid for p in root.children(recursive=True)]
    names = " ".join(" ".join(psutil.Process(p).cmdline()) for p in family)
    for expected in (
        "services.state",
        "services.agent",
        "services.dlq",
        "services.gateway",
        "services.console",
        "valkey-server",
        "postgres",
    ):
        assert expected in names
    # The running system answers a real signed delivery with the development secret.
    body, headers = payloads.sign(payloads.text_delivery("hello"), "dev-app-secret-change-me")
    assert httpx.post(f"{url}/webhook", content=body, headers=headers).status_code == 200
    output = log.read_text()
    assert "DEVELOPMENT value" in output
    assert url.split("//")[1] in output or str(url.rsplit(":", 1)[1]) in output
    # Internal ports over mutual TLS, on loopback only; the CLI presents the operator's
    # certificate that make run made, and the output says how grpcurl does.
    env = root.environ()
    tls_dir = Path(env["RUN_DIR"]) / "tls"
    assert (tls_dir / "operator.key").stat().st_mode & 0o077 == 0
    assert f"grpcurl -cacert {tls_dir}/ca.crt -cert {tls_dir}/operator.crt" in output
    for module in ("services.state", "services.agent", "services.dlq", "services.console"):
        pid = _service_pid(root, module)
        assert pid is not None
        listening = [
            c.laddr.ip for c in psutil.Process(pid).net_connections("tcp") if c.status == "LISTEN"
        ]
        # gRPC listens on an IPv6 socket bound to the v4-mapped loopback address.
        assert listening and set(listening) <= {"127.0.0.1", "::ffff:127.0.0.1"}, listening
    cli = subprocess.run(
        [str(ROOT / ".venv" / "bin" / "wa"), "dlq", "list", "--json"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert cli.returncode == 0, cli.stderr
    # Each service got its own database role, with a generated password kept in a file only
    # the user reads, and never printed; none got the owner's URL.
    urls = roles.read_urls(run_dir / roles.URLS_FILE)
    assert set(urls) == set(roles.SERVICES)
    assert (run_dir / roles.URLS_FILE).stat().st_mode & 0o777 == 0o600
    for service, service_url in urls.items():
        password = roles.user_of(service_url)[1]
        assert password and password not in output
        pid = _service_pid(root, f"services.{service}")
        if pid is not None:
            penv = psutil.Process(pid).environ()
            assert penv[roles.VARIABLES[service]] == service_url
            assert not penv.get("DATABASE_URL")
    # The embedded Redis: the state service's own user, and an admin URL for a developer's
    # redis-cli in a file only the user reads, named in the output, never printed itself.
    admin_file = run_dir / "redis-admin.url"
    assert admin_file.stat().st_mode & 0o777 == 0o600
    admin_url = admin_file.read_text().strip()
    assert admin_url not in output and f'redis-cli -u "$(cat {admin_file})"' in output
    admin = redis.Redis.from_url(admin_url, socket_timeout=5)
    try:
        assert admin.execute_command("ACL", "WHOAMI") in (b"wa-admin", "wa-admin")
    finally:
        admin.close()
    # The console reads as the operator role, on loopback, and says where it is.
    console = psutil.Process(_service_pid(root, "services.console") or 0).environ()
    assert console["OPERATOR_DATABASE_URL"] == urls["operator"]
    assert not console.get("DATABASE_URL")
    console_url = f"http://127.0.0.1:{env['CONSOLE_PORT']}"
    assert f"console   {console_url}/" in output
    deadline = time.monotonic() + 30
    while True:
        try:
            login = httpx.get(f"{console_url}/login", timeout=3)
            break
        except httpx.HTTPError:
            assert time.monotonic() < deadline, "the console never answered"
            time.sleep(0.2)
    assert login.status_code == 200 and "Log in" in login.text

    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    deadline = started + 15
    while time.monotonic() < deadline and any(
        psutil.pid_exists(p) and psutil.Process(p).status() != "zombie" for p in family
    ):
        time.sleep(0.1)
    alive = [p for p in family if psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"]
    assert alive == [], f"left behind: {alive}\n{log.read_text()[-3000:]}"
    assert time.monotonic() - started < 12


def _services(root: psutil.Process) -> dict[str, int]:
    counts: dict[str, int] = {}
    for p in root.children(recursive=True):
        try:
            cmdline = p.cmdline()
        except psutil.NoSuchProcess:
            continue
        if "-m" in cmdline and cmdline[-1].startswith("services."):
            counts[cmdline[-1]] = counts.get(cmdline[-1], 0) + 1
    return counts


@pytest.mark.parametrize("make_run", [{"WHATSAPP_SKIP_SIGNATURE": "true"}], indirect=True)
def test_make_run_with_signatures_skipped_takes_unsigned_deliveries(make_run: tuple) -> None:  # type: ignore[type-arg]
    # The development opt-out: make run fills no development app secret then (the gateway
    # refuses a secret and the opt-out together, and would never come up).
    _, url, log = make_run
    _wait_ready(make_run)
    body = payloads.text_delivery("unsigned, on purpose")
    answered = httpx.post(f"{url}/webhook", json=body, timeout=10)
    assert answered.status_code == 200, answered.text
    output = log.read_text()
    assert "WHATSAPP_APP_SECRET is not set" not in output


@pytest.mark.parametrize("make_run", [{"WA_SCALE": "agent=2,state=2,gateway=2"}], indirect=True)
def test_make_run_with_wa_scale_runs_prints_and_restarts_each_replica(make_run: tuple) -> None:  # type: ignore[type-arg]
    proc, url, log = make_run
    _wait_ready(make_run)
    root = psutil.Process(proc.pid)
    expected = {
        "services.state": 2,
        "services.agent": 2,
        "services.dlq": 1,
        "services.gateway": 2,
        "services.console": 1,
    }
    deadline = time.monotonic() + 30
    while _services(root) != expected and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _services(root) == expected
    output = log.read_text()
    for name in ("state-1", "state-2", "agent-1", "agent-2", "dlq ", "gateway-1", "gateway-2"):
        assert f"  {name}" in output, output[-3000:]
    assert "STATE_ADDR ipv4:127.0.0.1:" in output and "AGENT_ADDR ipv4:127.0.0.1:" in output
    run_dir = log.parent / "run"
    # Both gateways answer on the one port, each replica logs to its own file. The kernel
    # spreads connections over the two by a hash of their addresses: a handful can all land
    # on one (1 in 32 for six), so posting goes on, each on a new connection, until both logged.
    logs = run_dir / "logs"

    def quiet(name: str) -> bool:
        path = logs / f"{name}.log"
        return not path.exists() or path.stat().st_size == 0

    for _ in range(60):
        body, headers = payloads.sign(payloads.text_delivery("hi"), "dev-app-secret-change-me")
        assert httpx.post(f"{url}/webhook", content=body, headers=headers).status_code == 200
        if not quiet("gateway-1") and not quiet("gateway-2"):
            break
    for name in ("state-1", "state-2", "agent-2", "gateway-1", "gateway-2"):
        assert not quiet(name), name

    victim = _service_pid(root, "services.agent")
    assert victim is not None
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and (
        _services(root) != expected or psutil.pid_exists(victim)
    ):
        time.sleep(0.2)
    assert _services(root) == expected
    assert "agent-1: exited" in log.read_text() or "agent-2: exited" in log.read_text()

    family = [p.pid for p in root.children(recursive=True)]
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    proc.wait(15)
    alive = [p for p in family if psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"]
    assert alive == [] and time.monotonic() - started < 12


def test_ctrl_c_stops_everything_in_order_and_restarts_nothing(make_run: tuple) -> None:  # type: ignore[type-arg]
    """A terminal's Ctrl-C sends SIGINT to the whole foreground process group, not only to
    `make run`: the database and Redis must not stop (and be restarted by the supervisor,
    which had not yet heard it was stopping) while the services still use them."""
    proc, url, log = make_run
    _wait_ready(make_run)
    root = psutil.Process(proc.pid)
    body, headers = payloads.sign(payloads.text_delivery("hello"), "dev-app-secret-change-me")
    assert httpx.post(f"{url}/webhook", content=body, headers=headers).status_code == 200
    family = [p.pid for p in root.children(recursive=True)]
    started = time.monotonic()
    os.killpg(proc.pid, signal.SIGINT)  # what the terminal does (the fixture's own session)
    proc.wait(15)
    alive = [p for p in family if psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"]
    assert alive == [] and time.monotonic() - started < 12
    output = log.read_text()
    shutdown = output[output.index("[wa run] stopping") :]
    assert "restarting" not in shutdown and "exited with" not in shutdown, shutdown[-3000:]
    # Stopped in order: the services before the servers they use, so none of them lost its
    # database or Redis while stopping.
    assert shutdown.index("state: stopped") < shutdown.index("postgres: stopped"), shutdown
    assert "Traceback" not in shutdown and '"level":"ERROR"' not in shutdown, shutdown


def test_sigint_to_make_alone_stops_everything(make_run: tuple) -> None:  # type: ignore[type-arg]
    """GNU make passes SIGTERM on to its children but not SIGINT, expecting the terminal to
    have sent it to every process: a SIGINT to `make run`'s pid alone must stop it all too."""
    proc, _url, log = make_run
    _wait_ready(make_run)
    family = [p.pid for p in psutil.Process(proc.pid).children(recursive=True)]
    started = time.monotonic()
    proc.send_signal(signal.SIGINT)
    proc.wait(15)
    alive = [p for p in family if psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"]
    assert alive == [] and time.monotonic() - started < 12, log.read_text()[-3000:]
    shutdown = log.read_text().split("[wa run] stopping", 1)[1]
    assert "restarting" not in shutdown, shutdown[-3000:]
