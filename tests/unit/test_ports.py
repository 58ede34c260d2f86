"""Ports for the services a test or `make run` starts: free, never handed out twice, and out of
the kernel's range for outgoing connections, which a connection to PostgreSQL or Redis could
otherwise take between the choice and the server's bind (the agent then could not bind its
metrics port and restarted forever)."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from devtools.ports import free_port


def test_ports_are_free_distinct_and_below_the_range_outgoing_connections_use() -> None:
    with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
        ephemeral_floor = int(f.read().split()[0])
    ports = [free_port() for _ in range(200)]
    assert len(set(ports)) == len(ports)
    assert all(port < ephemeral_floor for port in ports)
    for port in ports[:20]:
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))


def _unbound_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_a_preferred_port_is_used_when_free_and_passed_over_when_taken() -> None:
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        taken = held.getsockname()[1]
        assert free_port(taken) != taken
    free = _unbound_port()
    assert free_port(free) == free


def test_two_processes_are_never_handed_the_same_port() -> None:
    # Two test workers pick from the same range, each binding its ports seconds later: a port
    # one process picked must not be the other's too, although nothing listens on it yet.
    other = subprocess.run(
        [
            sys.executable,
            "-c",
            "from devtools.ports import free_port\n"
            "print(' '.join(str(free_port()) for _ in range(500)))",
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
        cwd=Path(__file__).resolve().parents[2],
    )
    theirs = {int(p) for p in other.stdout.split()}
    ours = {free_port() for _ in range(500)}
    assert len(theirs) == len(ours) == 500
    assert theirs & ours == set()  # ~11 in common without the claims (500 x 500 / ~22,700)


def _in_another_process(code: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", "from devtools.ports import free_port\n" + code],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
    )


def test_a_preferred_port_is_taken_again_by_the_next_run() -> None:
    # `make run`, stopped and run again, gets the port it asked for.
    free = _unbound_port()
    for _ in range(2):
        run = _in_another_process(f"print(free_port({free}))")
        out, _ = run.communicate(timeout=60)
        assert int(out) == free


def test_a_preferred_port_another_live_process_was_handed_is_passed_over() -> None:
    # Two `make run`s starting at once both asked for 16379 for their Valkey and both got it,
    # neither having bound it yet: the second Valkey never started, nor did that system.
    free = _unbound_port()
    first = _in_another_process(f"print(free_port({free}), flush=True)\ninput()")
    try:
        assert first.stdout is not None
        assert int(first.stdout.readline()) == free
        second = _in_another_process(f"print(free_port({free}))")
        out, _ = second.communicate(timeout=60)
        assert int(out) != free
        assert free_port(free) != free
    finally:
        first.communicate("\n", timeout=60)
    assert free_port(free) == free  # its claimer has exited


# Run in a network namespace of its own whose outgoing connections draw from 11 ports: 40
# attempts at a connection take every port not reserved. Prints the ports they got, then binds
# a gRPC server (the services' options) on the reserved ports and, after it stopped, again.
_CROWDED = """
import asyncio, json, socket, sys
import grpc
from common.grpcserver import SERVER_OPTIONS
from devtools.ports import reserve

async def main(reserved):
    target = socket.socket()
    target.bind(("127.0.0.1", 30000))
    target.listen(64)
    held = [reserve(p) for p in reserved]
    conns = []
    for _ in range(40):  # more than there are ports: the kernel's search gives up now and then
        try:
            conns.append(socket.create_connection(("127.0.0.1", 30000)))
        except OSError:
            pass
    print(json.dumps(sorted(c.getsockname()[1] for c in conns)))
    for attempt in range(2):
        server = grpc.aio.server(options=SERVER_OPTIONS)
        for p in (40003, 40005):
            server.add_insecure_port(f"127.0.0.1:{p}")
        await server.start()
        for p in (40003, 40005):
            async with grpc.aio.insecure_channel(f"127.0.0.1:{p}") as ch:
                await asyncio.wait_for(ch.channel_ready(), 5)
        await server.stop(0)
    print("served")

asyncio.run(main([int(p) for p in sys.argv[1:]]))
"""


def _crowded(*reserved: int) -> subprocess.CompletedProcess[str]:
    script = (
        "ip link set lo up && echo '40000 40010' > /proc/sys/net/ipv4/ip_local_port_range"
        f' && exec {sys.executable} -c "$0" "$@"'
    )
    return subprocess.run(
        ["unshare", "--net", "sh", "-c", script, _CROWDED, *map(str, reserved)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).parents[2],
    )


def test_a_reserved_port_is_no_outgoing_connections_and_a_server_still_binds_it() -> None:
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        pytest.skip("needs unshare and ip (util-linux, iproute2)")
    # Without the reservation, the connections take the servers' ports and the bind fails.
    unreserved = _crowded()
    if unreserved.stderr.startswith("unshare:"):
        pytest.skip(f"cannot make a network namespace here: {unreserved.stderr.strip()}")
    taken = json.loads(unreserved.stdout)
    assert unreserved.returncode != 0 and {40003, 40005} & set(taken), unreserved
    reserved = _crowded(40003, 40005)
    assert reserved.returncode == 0, reserved.stderr
    listed, said = reserved.stdout.splitlines()
    assert {40003, 40005}.isdisjoint(json.loads(listed)) and said == "served"
