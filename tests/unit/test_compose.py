"""docker-compose.yml and the Dockerfile cannot run here (no Docker): they are checked offline.
The file is validated against the Compose Specification's JSON schema (deploy/schemas/), its
`${...}` interpolation is done the way compose does it, and the properties README promises
(secure by default, scalable, the same commands as `make run`) are checked on the result.
Each check is also shown to reject a broken copy."""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import pytest
import yaml
from opentelemetry.sdk import environment_variables as otel_environment

from cli.run import SERVICES, service_command
from cli.settings import CliSettings
from common import config, kv
from services.console.settings import ConsoleSettings
from tests.support.grace import longest_stop

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
SCHEMA = ROOT / "deploy" / "schemas" / "compose-spec.json"
IMAGE = "wa-agents:latest"
IDENTITIES = ("state", "agent", "dlq", "gateway", "operator", "console")
# What each service may connect to PostgreSQL with: its own role's URL, nothing else.
DATABASE_URLS = {
    "state": "STATE_DATABASE_URL",
    "agent": "AGENT_DATABASE_URL",
    "dlq": "DLQ_DATABASE_URL",
    "gateway": None,
}
# Variables compose must refuse to start without (no usable default).
REQUIRED = (
    "WHATSAPP_APP_SECRET",
    "WHATSAPP_VERIFY_TOKEN",
    "POSTGRES_PASSWORD",
    "STATE_DB_PASSWORD",
    "AGENT_DB_PASSWORD",
    "DLQ_DB_PASSWORD",
    "OPERATOR_DB_PASSWORD",
    "REDIS_PASSWORD",
)
SECRET_NAME = re.compile(r"SECRET|TOKEN|PASSWORD|API_KEY")
DIGEST = re.compile(r"@sha256:[0-9a-f]{64}$")

# --- compose's interpolation -------------------------------------------------------------

_VARIABLE = re.compile(
    r"\$(?:(?P<escaped>\$)|\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}"
    r"|(?P<bare>[A-Za-z_][A-Za-z0-9_]*))"
)


class MissingVariable(Exception):
    """compose refuses to start: `${NAME:?message}` with NAME unset or empty."""


def interpolate(text: str, env: Mapping[str, str]) -> str:
    """compose's `${NAME}`, `${NAME:-default}`, `${NAME-default}`, `${NAME:?error}`,
    `${NAME?error}` and `$$` (compose-spec, Interpolation)."""

    def one(match: re.Match[str]) -> str:
        if match["escaped"]:
            return "$"
        name = match["name"] or match["bare"]
        value = env.get(name)
        op, arg = match["op"], match["arg"] or ""
        unset = value is None or (op is not None and op.startswith(":") and value == "")
        if op is not None and op.endswith("?") and unset:
            raise MissingVariable(f"required variable {name} is missing a value: {arg}")
        if op is not None and op.endswith("-") and unset:
            return arg
        return value or ""

    return _VARIABLE.sub(one, text)


def variable_uses(text: str) -> list[tuple[str, str | None, str]]:
    """Every `${NAME<op><arg>}` of the file: (name, op, arg)."""
    return [
        (m["name"], m["op"], m["arg"] or "")
        for m in _VARIABLE.finditer(text)
        if m["name"] is not None
    ]


def full_env() -> dict[str, str]:
    """Every required variable set, each to a value of its own."""
    return {name: f"value-of-{name.lower()}" for name in REQUIRED}


def load(text: str, env: Mapping[str, str]) -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load(interpolate(text, env))
    return doc


def compose() -> dict[str, Any]:
    return load(COMPOSE.read_text(), full_env())


# --- the checks ----------------------------------------------------------------------------


def schema_errors(doc: Mapping[str, Any]) -> list[str]:
    schema = json.loads(SCHEMA.read_text())
    # Its `$schema` names no published metaschema; compose itself validates it as draft 7.
    validator = jsonschema.Draft7Validator(schema)
    return [
        f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)
    ]


def _ours(spec: Mapping[str, Any]) -> bool:
    return spec.get("image") == IMAGE


def _one_shot(spec: Mapping[str, Any]) -> bool:
    return spec.get("restart") == "no"


def _env(spec: Mapping[str, Any]) -> dict[str, str]:
    env = spec.get("environment") or {}
    assert isinstance(env, dict), "environment as a mapping"
    return {str(k): str(v) for k, v in env.items()}


def duration_seconds(text: str) -> float:
    """A compose duration (`30s`, `1m30s`, `500ms`) in seconds."""
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", text)
    assert parts and "".join(n + u for n, u in parts) == text, f"not a duration: {text!r}"
    unit = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6}
    return sum(float(n) * unit[u] for n, u in parts)


def structure_problems(doc: Mapping[str, Any]) -> list[str]:
    """What README promises of the file, as a list of what is wrong."""
    problems: list[str] = []
    services: dict[str, Any] = doc["services"]
    for name, spec in services.items():
        if "container_name" in spec:
            problems.append(f"{name}: container_name prevents --scale")
        if not _one_shot(spec):
            check = spec.get("healthcheck") or {}
            if not check.get("test") or check.get("disable"):
                problems.append(f"{name}: no healthcheck")
        limits = spec.get("deploy", {}).get("resources", {}).get("limits", {})
        if not {"cpus", "memory"} <= set(limits):
            problems.append(f"{name}: no cpu and memory limits")
        image = spec.get("image", "")
        if "build" not in spec and not DIGEST.search(image):
            problems.append(f"{name}: image {image!r} not pinned by digest")
        for dep, cond in (spec.get("depends_on") or {}).items():
            condition = cond.get("condition")
            target = services.get(dep, {})
            if condition == "service_healthy" and not target.get("healthcheck"):
                problems.append(f"{name}: waits for {dep}'s health, which it has no check of")
            elif condition == "service_completed_successfully" and not _one_shot(target):
                problems.append(f"{name}: waits for {dep} to complete, which never does")
            elif condition not in ("service_healthy", "service_completed_successfully"):
                problems.append(f"{name}: depends on {dep} without a health condition")
        if _ours(spec):
            if spec.get("read_only") is not True or not any(
                str(t).startswith("/tmp") for t in spec.get("tmpfs", [])
            ):
                problems.append(f"{name}: not on a read-only root with a tmpfs /tmp")
            if spec.get("cap_drop") != ["ALL"]:
                problems.append(f"{name}: keeps capabilities")
    for name in SERVICES:
        spec = services[name]
        if spec.get("ports"):
            problems.append(f"{name}: a fixed host port prevents --scale")
        if spec.get("command") != service_command(name, "python"):
            problems.append(f"{name}: {spec.get('command')} is not what make run starts")
        if not _ours(spec) or spec.get("build") != ".":
            problems.append(f"{name}: not built from this repository's Dockerfile")
        env = _env(spec)
        if env.get("GRPC_TLS_DIR") != "/etc/wa/tls" or env.get("GRPC_HOST") != "0.0.0.0":
            problems.append(f"{name}: GRPC_TLS_DIR=/etc/wa/tls and GRPC_HOST=0.0.0.0 expected")
        if env.get("GRPC_INSECURE", "false").lower() not in ("false", "0", ""):
            problems.append(f"{name}: plaintext gRPC")
        tls = [str(v) for v in spec.get("volumes", []) if str(v).startswith("tls-")]
        if tls != [f"tls-{name}:/etc/wa/tls:ro"]:
            problems.append(f"{name}: {tls}: expected only its own certificates, read-only")
        urls = {k for k in env if k.endswith("DATABASE_URL")}
        own = DATABASE_URLS[name]
        if urls != ({own} if own else set()):
            problems.append(f"{name}: database URLs {sorted(urls)}, expected only {own}")
        grace = duration_seconds(str(spec.get("stop_grace_period", "10s")))
        if grace < (stops := longest_stop(name, env)):
            problems.append(
                f"{name}: stop_grace_period {grace:g} s kills it before it can stop on its own"
                f" ({stops:g} s)"
            )
    for name, spec in services.items():
        if name != "migrate" and "DATABASE_URL" in _env(spec):
            problems.append(f"{name}: gets the owner's DATABASE_URL")
    if "data" in (services["gateway"].get("networks") or []):
        problems.append("gateway: on the database network")
    # The image's entrypoint initializes a fresh volume on a server of the Unix socket alone:
    # a check over the socket calls it healthy before the migrate job can connect over TCP.
    check = services["postgres"].get("healthcheck", {}).get("test", [])
    if "pg_isready" not in check or "-h" not in check or check[check.index("-h") + 1][:1] == "/":
        problems.append("postgres: the healthcheck does not connect over TCP")
    return problems + redis_problems(services)


def redis_users(spec: Mapping[str, Any]) -> list[str]:
    """The ACL users the redis service's command gives the server (on its stdin)."""
    command = spec.get("command") or []
    script = command[-1] if command[:2] == ["sh", "-ec"] else ""
    if not re.search(r"^exec docker-entrypoint\.sh redis-server - .*<<EOF$", script, re.M):
        return []
    return [line for line in script.splitlines() if line.startswith("user ")]


def redis_problems(services: Mapping[str, Any]) -> list[str]:
    """Redis lets in nobody anonymous, and the state service as its own user only, with the
    rules of common/kv.py and the password of the state's REDIS_URL."""
    problems = []
    redis = services["redis"]
    state = _env(services["state"])
    prefix = CliSettings.from_env(
        {k: v for k, v in state.items() if k in config.variables(CliSettings)}
    ).redis_prefix
    expected = [
        "user default off",
        f"user {kv.STATE_USER} on >$REDISCLI_AUTH {kv.state_acl_rules(prefix)}",
    ]
    if redis_users(redis) != expected:
        problems.append(f"redis: users {redis_users(redis)}, expected {expected}")
    password = _env(redis).get("REDISCLI_AUTH", "")
    url = urlsplit(state.get("REDIS_URL", ""))
    if not password or (url.username, url.password, url.hostname) != (
        kv.STATE_USER,
        password,
        "redis",
    ):
        problems.append(f"state: REDIS_URL is not {kv.STATE_USER}'s with the server's password")
    check = " ".join(redis.get("healthcheck", {}).get("test", []))
    if f"--user {kv.STATE_USER}" not in check or "PONG" not in check:
        problems.append("redis: the healthcheck does not log in (or believes redis-cli's exit)")
    for name, spec in services.items():
        if name != "state" and "REDIS_URL" in _env(spec):
            problems.append(f"{name}: gets REDIS_URL (only the state service uses Redis)")
    return problems


def secret_problems(text: str) -> list[str]:
    """Secrets have no usable default: required ones stop compose, optional ones default to
    empty, and none is written into the file."""
    problems = []
    for name, op, arg in variable_uses(text):
        if name in REQUIRED and op != ":?":
            problems.append(f"${{{name}}} must be ${{{name}:?...}}: compose must refuse to start")
        elif SECRET_NAME.search(name) and op in (":-", "-") and arg:
            problems.append(f"${{{name}}} has a default value")
    doc = yaml.safe_load(text)
    for service, spec in doc["services"].items():
        for key, value in _env(spec).items():
            if SECRET_NAME.search(key) and "${" not in value:
                problems.append(f"{service}: {key} written in the file")
    return problems


# --- the tests -----------------------------------------------------------------------------


def test_compose_file_is_valid_under_the_compose_specification() -> None:
    assert schema_errors(compose()) == []


def test_the_schema_rejects_a_broken_file() -> None:
    broken = compose()
    broken["services"]["state"]["healthchek"] = broken["services"]["state"].pop("healthcheck")
    broken["services"]["agent"]["depends_on"]["migrate"]["condition"] = "service_done"
    broken["services"]["dlq"]["read_only"] = ["yes"]
    errors = schema_errors(broken)
    assert any("state" in e and "healthchek" in e for e in errors), errors
    assert any("agent" in e for e in errors), errors
    assert any("dlq" in e for e in errors), errors


def test_compose_file_keeps_its_promises() -> None:
    doc = compose()
    assert {"postgres", "redis", "jaeger", "certs", "migrate", "proxy", *SERVICES} <= set(
        doc["services"]
    )
    assert structure_problems(doc) == []


MUTATIONS: dict[str, Callable[[dict[str, Any]], None]] = {
    "no healthcheck": lambda d: d["services"]["agent"].pop("healthcheck"),
    "host port on a scaled service": lambda d: d["services"]["gateway"].update(ports=["8080:8080"]),
    "container_name": lambda d: d["services"]["state"].update(container_name="state"),
    "another command than make run": lambda d: d["services"]["dlq"].update(
        command=["python", "-m", "services.dlq.server"]
    ),
    "owner URL in a service": lambda d: d["services"]["state"]["environment"].update(
        DATABASE_URL="postgresql://wa_owner:x@postgres/wa"
    ),
    "database URL in the gateway": lambda d: d["services"]["gateway"]["environment"].update(
        STATE_DATABASE_URL="postgresql://wa_state:x@postgres/wa"
    ),
    "unpinned image": lambda d: d["services"]["redis"].update(image="redis:7"),
    "writable root": lambda d: d["services"]["agent"].update(read_only=False),
    "no limits": lambda d: d["services"]["proxy"].pop("deploy"),
    "started, not healthy": lambda d: d["services"]["gateway"]["depends_on"]["state"].update(
        condition="service_started"
    ),
    "another service's key": lambda d: d["services"]["gateway"].update(
        volumes=["tls-state:/etc/wa/tls:ro"]
    ),
    "plaintext gRPC": lambda d: d["services"]["state"]["environment"].update(GRPC_INSECURE="true"),
    "anonymous Redis": lambda d: d["services"]["redis"].update(
        command=["redis-server", "--save", "", "--appendonly", "no"]
    ),
    "the state's user may do anything": lambda d: d["services"]["redis"].update(
        command=[
            *d["services"]["redis"]["command"][:2],
            re.sub(
                r"(user wa-state on \S+) .*",
                r"\1 ~* &* +@all",
                d["services"]["redis"]["command"][2],
            ),
        ]
    ),
    "Redis URL without credentials": lambda d: d["services"]["state"]["environment"].update(
        REDIS_URL="redis://redis:6379/0"
    ),
    "healthcheck without login": lambda d: d["services"]["redis"]["healthcheck"].update(
        test=["CMD", "redis-cli", "ping"]
    ),
    "a grace shorter than the agent's drain": lambda d: d["services"]["agent"][
        "environment"
    ].update(AGENT_DRAIN_SECONDS="40"),
    "the default grace": lambda d: d["services"]["state"].pop("stop_grace_period"),
    "Redis URL in the agent": lambda d: d["services"]["agent"]["environment"].update(
        REDIS_URL="redis://wa-state:x@redis:6379/0"
    ),
    "postgres healthy on its socket": lambda d: d["services"]["postgres"]["healthcheck"].update(
        test=["CMD", "pg_isready", "-U", "wa_owner", "-d", "wa"]
    ),
}


@pytest.mark.parametrize("mutation", sorted(MUTATIONS))
def test_each_promise_check_rejects_a_file_that_breaks_it(mutation: str) -> None:
    broken = copy.deepcopy(compose())
    MUTATIONS[mutation](broken)
    assert structure_problems(broken) != [], mutation


def test_compose_refuses_to_start_without_each_secret_and_names_it() -> None:
    text = COMPOSE.read_text()
    assert secret_problems(text) == []
    for name in REQUIRED:
        env = {k: v for k, v in full_env().items() if k != name}
        with pytest.raises(MissingVariable, match=rf"\b{name}\b.*set {name}"):
            load(text, env)
        with pytest.raises(MissingVariable, match=rf"\b{name}\b"):
            load(text, {**env, name: ""})


def test_the_secret_check_rejects_a_default_secret() -> None:
    text = COMPOSE.read_text()
    with_default = re.sub(r"\$\{WHATSAPP_APP_SECRET:\?[^}]*\}", "${WHATSAPP_APP_SECRET:-dev}", text)
    assert with_default != text
    assert any("WHATSAPP_APP_SECRET" in p for p in secret_problems(with_default))
    inline = text.replace("OPENAI_API_KEY: ${OPENAI_API_KEY:-}", "OPENAI_API_KEY: sk-123")
    assert inline != text
    assert any("OPENAI_API_KEY" in p for p in secret_problems(inline))


def test_each_service_connects_with_its_own_role_and_migrate_provisions_them() -> None:
    services = compose()["services"]
    env = full_env()
    for name, variable in DATABASE_URLS.items():
        if variable is None:
            continue
        url = _env(services[name])[variable]
        assert url.startswith(f"postgresql://wa_{name}:")
        assert env[f"{name.upper()}_DB_PASSWORD"] in url
        assert env["POSTGRES_PASSWORD"] not in url
    migrate = _env(services["migrate"])
    assert migrate["DATABASE_URL"].startswith("postgresql://wa_owner:")
    for variable in ("STATE", "AGENT", "DLQ", "OPERATOR"):
        assert f"{variable}_DATABASE_URL" in migrate, "migrate provisions every role"
    assert services["postgres"]["environment"]["POSTGRES_USER"] == "wa_owner"


def test_the_certs_job_gives_each_service_only_its_own_key() -> None:
    services = compose()["services"]
    certs = services["certs"]
    script = " ".join(certs["command"])
    assert "wa certs create --dir /var/lib/wa/tls/ca" in script
    assert "for id in " + " ".join(IDENTITIES) + ";" in script
    assert "tls-ca:/var/lib/wa/tls/ca" in certs["volumes"]
    for identity in IDENTITIES:
        assert f"tls-{identity}:/var/lib/wa/tls/{identity}" in certs["volumes"]
    mounting_ca = [n for n, s in services.items() if n != "certs" and "tls-ca" in str(s)]
    assert mounting_ca == [], "the CA's key stays with the certs job"
    assert "tls-operator:/etc/wa/tls:ro" in services["wa"]["volumes"]
    assert services["console"]["volumes"] == ["tls-console:/etc/wa/tls:ro"]
    # The mount points exist in the image, owned by the user the job runs as.
    dockerfile = (ROOT / "Dockerfile").read_text()
    for identity in ("ca", *IDENTITIES):
        assert f"/var/lib/wa/tls/{identity}" in dockerfile


# The contract's scaled command: `docker compose up --scale gateway=2 --scale state=2
# --scale agent=3 --scale dlq=2`.
SCALE = {"gateway": 2, "state": 2, "agent": 3, "dlq": 2}
# PostgreSQL's defaults: max_connections, and the superuser_reserved_connections among them.
PG_MAX_CONNECTIONS = 100
PG_RESERVED = 3
# The owner's migrate job: its lock's session beside the one that migrates or grants
# (common/roles.migrate_and_provision).
JOB_CONNECTIONS = 2


def postgres_connections(doc: Mapping[str, Any], scale: Mapping[str, int]) -> tuple[int, list[str]]:
    """The most connections our containers open to PostgreSQL at `scale`: each running
    service's replicas times its pool (DATABASE_POOL_SIZE, which each must set: unset, every
    replica opens its whole service's POOL_SIZES share); JOB_CONNECTIONS for the owner's
    migrate job, one for each other one-shot job and tool."""
    total, problems = 0, []
    for name, spec in doc["services"].items():
        env = _env(spec)
        if not _ours(spec) or not any(k.endswith("DATABASE_URL") for k in env):
            continue
        if _one_shot(spec) or spec.get("profiles"):
            total += JOB_CONNECTIONS if "DATABASE_URL" in env else 1
            continue
        pool = env.get("DATABASE_POOL_SIZE")
        if pool is None:
            problems.append(
                f"{name}: no DATABASE_POOL_SIZE (each replica would open up to "
                f"{config.POOL_SIZES.get(name)})"
            )
            continue
        total += scale.get(name, 1) * int(pool)
    return total, problems


def connection_problems(doc: Mapping[str, Any], scale: Mapping[str, int]) -> list[str]:
    total, problems = postgres_connections(doc, scale)
    command = " ".join(map(str, doc["services"]["postgres"].get("command") or []))
    found = re.search(r"max_connections=(\d+)", command)
    allowed = (int(found[1]) if found else PG_MAX_CONNECTIONS) - PG_RESERVED
    if total > allowed:
        problems.append(f"{total} PostgreSQL connections at {dict(scale)}, {allowed} allowed")
    return problems


def test_scaled_services_fit_in_postgresqls_connections() -> None:
    readme = " ".join((ROOT / "README.md").read_text().split())
    command = " ".join(f"--scale {name}={n}" for name, n in SCALE.items())
    assert f"docker compose up {command}" in readme
    assert connection_problems(compose(), SCALE) == []
    total, _ = postgres_connections(compose(), SCALE)
    assert f"{total} of PostgreSQL's connections" in readme


def test_the_connection_check_rejects_an_unbounded_pool_or_too_many_replicas() -> None:
    unbounded = compose()
    del unbounded["services"]["agent"]["environment"]["DATABASE_POOL_SIZE"]
    assert any("agent: no DATABASE_POOL_SIZE" in p for p in connection_problems(unbounded, SCALE))
    assert connection_problems(compose(), {**SCALE, "agent": 30}) != []
    larger = compose()
    larger["services"]["postgres"]["command"] = ["postgres", "-c", "max_connections=400"]
    assert connection_problems(larger, {**SCALE, "agent": 30}) == []


def image_directories(dockerfile: str) -> dict[str, str]:
    """Each directory the Dockerfile makes with `install -d`, and its owner (`root` when none
    is given)."""
    joined = re.sub(r"\\\n", " ", dockerfile)
    made: dict[str, str] = {}
    for command in re.findall(r"install -d ([^&\n]*)", joined):
        words = command.split()
        owner = "root"
        paths = []
        i = 0
        while i < len(words):
            if words[i] in ("-o", "-g", "-m"):
                if words[i] == "-o":
                    owner = words[i + 1]
                i += 2
                continue
            paths.append(words[i])
            i += 1
        made.update(dict.fromkeys(paths, owner))
    return made


def volume_owner_problems(doc: Mapping[str, Any], dockerfile: str) -> list[str]:
    """A named volume that one of our containers writes must be that user's at every mount
    point in our image: an empty volume takes the owner of the mount point of whichever
    container is created with it first (Docker copies the image's directory into it), and
    `docker compose up` creates every container before it starts any."""
    users = re.findall(r"^USER (\d+)", dockerfile, re.M)
    user = users[-1] if users else "root"
    made = image_directories(dockerfile)
    mounts: dict[str, list[tuple[str, str, bool]]] = {}
    for name, spec in doc["services"].items():
        if not _ours(spec):
            continue
        for volume in spec.get("volumes", []):
            source, target, *mode = str(volume).split(":")
            if source in doc.get("volumes", {}):
                mounts.setdefault(source, []).append((name, target, mode != ["ro"]))
    problems = []
    for volume, points in mounts.items():
        writers = [name for name, _, writes in points if writes]
        if not writers:
            continue
        for name, target, _ in points:
            owner = made.get(target)
            if owner != user:
                problems.append(
                    f"{volume}: written by {writers}, mounted by {name} on {target}, which the "
                    f"image {'does not make' if owner is None else f'makes owned by {owner}'}"
                )
    return problems


def test_a_volume_a_job_writes_is_its_user_at_every_mount_point() -> None:
    assert volume_owner_problems(compose(), _dockerfile()) == []


def test_the_volume_owner_check_rejects_a_root_owned_mount_point() -> None:
    text = _dockerfile()
    root_owned = text.replace(" /etc/wa/tls\n", "\n") + "RUN install -d -m 0755 /etc/wa/tls\n"
    assert root_owned != text
    problems = volume_owner_problems(compose(), root_owned)
    assert problems and all("/etc/wa/tls" in p for p in problems)
    unmade = text.replace(" /etc/wa/tls\n", "\n")
    assert volume_owner_problems(compose(), unmade) != []


def test_the_console_is_on_loopback_with_the_operator_role_and_what_make_run_starts() -> None:
    console = compose()["services"]["console"]
    assert console["command"] == service_command("console", "python")
    assert console["ports"] == ["127.0.0.1:8081:8081"], "published on the host's loopback only"
    env = _env(console)
    assert env["OPERATOR_DATABASE_URL"].startswith("postgresql://wa_operator:")
    assert {k for k in env if k.endswith("DATABASE_URL")} == {"OPERATOR_DATABASE_URL"}
    assert env["GRPC_TLS_DIR"] == "/etc/wa/tls"
    assert console["healthcheck"]["test"][-1] == "http://127.0.0.1:8081/healthz"
    assert (
        ConsoleSettings.from_env(
            {k: v for k, v in env.items() if k in config.variables(ConsoleSettings)}
        ).console_port
        == 8081
    )


def test_the_proxy_balances_every_gateway_replica_found_by_dns() -> None:
    services = compose()["services"]
    proxy = services["proxy"]
    assert proxy["ports"] == ["8080:8080"]
    assert proxy["depends_on"]["gateway"]["condition"] == "service_healthy"
    mount = "./deploy/compose/haproxy.cfg:/usr/local/etc/haproxy/haproxy.cfg:ro"
    assert proxy["volumes"] == [mount]
    cfg = (ROOT / mount.split(":")[0]).read_text()
    assert re.search(r"^\s*resolvers docker\s*$", cfg, re.M)
    assert re.search(r"nameserver \S+ 127\.0\.0\.11:53", cfg)
    assert re.search(r"server-template gateway \d+ gateway:8080 check", cfg)
    assert "resolvers docker" in re.search(r"default-server .*", cfg).group(0)  # type: ignore[union-attr]
    # Routed to while it can store a delivery, not only while every service is up.
    assert "http-check send meth GET uri /readyz?for=ingest\n" in cfg
    assert "monitor-uri /proxy-healthz" in cfg
    assert "/proxy-healthz" in " ".join(proxy["healthcheck"]["test"])


def test_haproxy_accepts_the_config_and_rejects_a_broken_one(tmp_path: Path) -> None:
    """Where an haproxy binary is installed (not a dependency of the suite: skipped without)."""
    haproxy = shutil.which("haproxy")
    if haproxy is None:
        pytest.skip("no haproxy binary on this machine")
    cfg = ROOT / "deploy" / "compose" / "haproxy.cfg"

    def check(path: Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [haproxy, "-c", "-f", str(path)], capture_output=True, text=True, timeout=30
        )

    assert check(cfg).returncode == 0, check(cfg).stderr
    broken = tmp_path / "haproxy.cfg"
    broken.write_text(cfg.read_text().replace("server-template gateway", "server-templat gateway"))
    assert check(broken).returncode != 0


def test_docker_compose_accepts_the_file_and_refuses_to_start_without_a_secret() -> None:
    """Where a `docker-compose` binary is installed (Debian's 1.29, which validates and
    interpolates without a Docker daemon; skipped without), as a second opinion on the schema
    and on the interpolation above."""
    binary = shutil.which("docker-compose")
    if binary is None:
        pytest.skip("no docker-compose binary on this machine")

    def config(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [binary, "--file", str(COMPOSE), "config", "--quiet"],
            capture_output=True,
            text=True,
            timeout=60,
            env={"PATH": "/usr/bin:/bin", **env},
            cwd=ROOT,
        )

    done = config(full_env())
    assert done.returncode == 0, done.stderr
    missing = config({k: v for k, v in full_env().items() if k != "WHATSAPP_APP_SECRET"})
    assert missing.returncode != 0
    assert "set WHATSAPP_APP_SECRET" in missing.stderr


def known_variables() -> frozenset[str]:
    """What the services read: every variable of the settings model, and OpenTelemetry's own
    (the SDK reads `OTEL_*` from the environment)."""
    otel = {
        value
        for name, value in vars(otel_environment).items()
        if name.startswith("OTEL_") and isinstance(value, str)
    }
    return config.variables(CliSettings) | config.variables(ConsoleSettings) | otel


def unread_variables(doc: Mapping[str, Any]) -> list[str]:
    known = known_variables()
    return [
        f"{name}: {variable} (misspelt, or read by nothing)"
        for name, spec in doc["services"].items()
        if _ours(spec)
        for variable in sorted(set(_env(spec)) - known)
    ]


def test_compose_sets_only_variables_the_services_read() -> None:
    doc = compose()
    assert {n for n, s in doc["services"].items() if _ours(s)} >= {"migrate", "certs", *SERVICES}
    assert unread_variables(doc) == []
    doc["services"]["state"]["environment"]["STATE_DATABASE_ULR"] = "postgresql://x"
    assert unread_variables(doc) == ["state: STATE_DATABASE_ULR (misspelt, or read by nothing)"]


def test_compose_environment_is_a_configuration_the_services_accept() -> None:
    services = compose()["services"]
    for name in SERVICES:
        env = _env(services[name])
        settings = CliSettings.from_env(
            {k: v for k, v in env.items() if k in config.variables(CliSettings)}
        )
        assert settings.state_addr == "dns:///state:50051"
        assert settings.agent_addr == "dns:///agent:50052"
        assert settings.dlq_addr == "dns:///dlq:50053"
        assert settings.metrics_port == 9100
    assert _env(services["state"])["REDIS_URL"] == (
        f"redis://{kv.STATE_USER}:{full_env()['REDIS_PASSWORD']}@redis:6379/0"
    )


# --- the Dockerfile ------------------------------------------------------------------------


def _dockerfile() -> str:
    return (ROOT / "Dockerfile").read_text()


def dockerfile_problems(text: str, dockerignore: str) -> list[str]:
    problems = []
    args = dict(re.findall(r"^ARG (\w+)=(\S+)", text, re.M))
    for image in re.findall(r"^FROM (\S+)", text, re.M):
        image = re.sub(r"\$\{(\w+)\}", lambda m: args.get(m[1], m[0]), image)
        if not DIGEST.search(image):
            problems.append(f"FROM {image}: not pinned by digest")
    if not re.search(r"uv==\$\{UV_VERSION\}|uv==\d", text) or not re.search(
        r"^ARG UV_VERSION=\d+\.\d+\.\d+$", text, re.M
    ):
        problems.append("uv not pinned to one version")
    if "uv sync --frozen" not in text:
        problems.append("dependencies not installed from uv.lock")
    if "python -m devtools.codegen" not in text:
        problems.append("generated gRPC code not built in the image")
    if "compileall" not in text:
        problems.append("bytecode not compiled at build (a read-only root cannot write it)")
    users = re.findall(r"^USER (\S+)", text, re.M)
    if not users or not re.fullmatch(r"[1-9]\d*(:[1-9]\d*)?", users[-1]):
        problems.append("does not end as a numeric non-root user")
    if not re.search(r"RUN_DIR=/tmp/", text):
        problems.append("RUN_DIR not under /tmp")
    for name in re.findall(r"^(?:ARG|ENV)\s+(\w+)", text, re.M) + re.findall(
        r"^\s+(\w+)=", text, re.M
    ):
        if SECRET_NAME.search(name) or name.endswith("DATABASE_URL"):
            problems.append(f"{name}: a secret in an image layer")
    ignored = {line.strip() for line in dockerignore.splitlines()}
    for path in (".env", ".run", "deploy/tls", "**/*.key"):
        if path not in ignored:
            problems.append(f".dockerignore lets {path} into the build context")
    return problems


def test_dockerfile_is_pinned_unprivileged_and_holds_no_secret() -> None:
    dockerignore = (ROOT / ".dockerignore").read_text()
    assert dockerfile_problems(_dockerfile(), dockerignore) == []


def test_the_dockerfile_check_rejects_a_broken_dockerfile() -> None:
    text = _dockerfile()
    dockerignore = (ROOT / ".dockerignore").read_text()
    unpinned = re.sub(r"@sha256:[0-9a-f]{64}", "", text)
    root = re.sub(r"^USER .*$", "USER root", text, flags=re.M)
    secret = text.replace(
        "FROM ${PYTHON_IMAGE}\n", "FROM ${PYTHON_IMAGE}\nARG WHATSAPP_APP_SECRET\n"
    )
    for broken in (unpinned, root, secret):
        assert broken != text
        assert dockerfile_problems(broken, dockerignore) != []
    assert dockerfile_problems(text, dockerignore.replace(".env\n", "")) != []
