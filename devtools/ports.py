"""Free TCP ports on 127.0.0.1 for the servers `make run`, the tests and the benchmarks start."""

from __future__ import annotations

import fcntl
import os
import random
import socket
import tempfile
import time
from pathlib import Path

# Ports handed out by free_port in this process, so two callers never get the same one.
_handed_out: set[int] = set()
_LOWEST_PORT = 10000
# Ports handed out by any process on this machine lately, one file each: two test workers (or a
# test run and a benchmark) draw from the same range, and a server binds its port seconds after
# it was picked, so a port free when one process checks it may be another's already (CI once
# saw a gateway fail to bind and the test's POST answered by another worker's server).
_CLAIMS = Path(tempfile.gettempdir()) / f"wa-ports-{os.getuid()}"
_CLAIM_SECONDS = 300.0


def _ephemeral_floor() -> int:
    """Where the kernel's range of ports for outgoing connections starts."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _claimer_gone(path: Path) -> bool:
    """Whether the process that claimed this port has exited."""
    try:
        pid = int(path.read_text() or "0")
    except (OSError, ValueError):
        return False
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False  # alive, another user's
    return False


def _claim(port: int, *, reclaim_from_exited: bool = False) -> bool:
    """Whether no other process handed this port out in the last _CLAIM_SECONDS; if so, it is
    this process's now. Only an exclusive create claims, so two processes cannot both win. An
    old claim is removed for a later call to take; with `reclaim_from_exited`, one whose process
    has exited is taken over at once (a preferred port: `make run` again gets it)."""
    path = _CLAIMS / str(port)
    try:
        _CLAIMS.mkdir(exist_ok=True)
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    except FileExistsError:
        return _reclaim(path, exited_too=reclaim_from_exited) and _claim(port)
    except OSError:
        return True  # no shared directory to claim in: this process's own set still holds
    try:
        os.write(fd, str(os.getpid()).encode())
    finally:
        os.close(fd)
    return True


def _reclaim(path: Path, *, exited_too: bool) -> bool:
    """Removes a claim that is old (or, `exited_too`, whose process has exited); whether it
    did. Under a lock, so two processes that both found it so cannot remove each other's new
    claim."""
    try:
        with open(_CLAIMS / ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            old = time.time() - path.stat().st_mtime > _CLAIM_SECONDS
            if old or (exited_too and _claimer_gone(path)):
                path.unlink()
                return True
    except OSError:
        pass
    return False


def free_port(preferred: int = 0) -> int:
    """`preferred` when it is free on 127.0.0.1 and no live process claimed it, else a free
    port below the kernel's range for outgoing connections. A port from that range (what
    binding to port 0 gives) can be taken by any outgoing connection (to PostgreSQL, Redis, ...)
    between this call and the server's bind; one below it can only be taken by another
    listener. (Two `make run`s starting at once both found 16379 free for their Valkey before
    either bound it, when a preferred port was not claimed: the second's Valkey never started.)"""
    candidates = [preferred] if preferred else []
    floor = _ephemeral_floor()
    if floor > _LOWEST_PORT + 100:
        candidates += random.sample(range(_LOWEST_PORT, floor), 50)
    candidates.append(0)
    for candidate in candidates:
        if candidate in _handed_out:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", candidate))
            except OSError:
                continue
            port = int(s.getsockname()[1])
        # A port asked for by number is taken again by the next `make run` once the last exited.
        if port in _handed_out or not _claim(port, reclaim_from_exited=port == preferred):
            continue
        _handed_out.add(port)
        return port
    raise OSError("no free port")


def reserve(port: int, host: str = "127.0.0.1") -> socket.socket:
    """A socket bound to `port` and never listening, for as long as it stays open: the kernel
    then never gives that port to an outgoing connection, and a server (which, as gRPC's and
    the probes' do, sets SO_REUSEADDR) still binds and listens on it, and binds it again after
    a restart. `make run`'s replica ports (the contract's 50051 and up) lie in the range the
    kernel draws outgoing connections' ports from: a service's connection to Redis once took
    one between the plan and the bind, and that replica never started."""
    family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    s = socket.socket(family, socket.SOCK_STREAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(address)
    except OSError:
        s.close()
        raise
    return s
