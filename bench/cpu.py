"""CPU time of the system's processes, read from /proc: the services, PostgreSQL (the
postmaster, its live children, and what its exited children spent, which the kernel adds to
the postmaster's cutime/cstime when it reaps them) and the Redis-compatible server.

Linux only; on another system `snapshot` returns nothing and the figures are left out.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


@dataclass(frozen=True)
class Stat:
    pid: int
    ppid: int
    comm: str
    own: float  # utime + stime, seconds
    reaped: float  # cutime + cstime: children it has waited for, seconds


def _stat(pid: int) -> Stat | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # comm is in parentheses and may hold spaces; the fields after it are plain.
    comm = raw[raw.index("(") + 1 : raw.rindex(")")]
    fields = raw[raw.rindex(")") + 2 :].split()
    ppid = int(fields[1])
    utime, stime, cutime, cstime = (int(f) for f in fields[11:15])
    return Stat(pid, ppid, comm, (utime + stime) / TICK, (cutime + cstime) / TICK)


def _all() -> list[Stat]:
    if not Path("/proc/self/stat").exists():
        return []
    stats = (_stat(int(p)) for p in os.listdir("/proc") if p.isdigit())
    return [s for s in stats if s is not None]


def _tree(stats: list[Stat], root: int) -> float:
    """CPU of `root`, its descendants, and the children it has reaped."""
    children: dict[int, list[Stat]] = {}
    by_pid = {s.pid: s for s in stats}
    for s in stats:
        children.setdefault(s.ppid, []).append(s)
    total, todo = 0.0, [root]
    while todo:
        pid = todo.pop()
        node = by_pid.get(pid)
        if node is None:
            continue
        total += node.own + node.reaped
        todo.extend(c.pid for c in children.get(pid, []))
    return total


def process_cpu(pid: int) -> float:
    """Seconds of CPU one process has spent so far (0 where /proc cannot tell): from its
    schedstat, in nanoseconds, where the kernel keeps one (its stat counts clock ticks, 10 ms)."""
    try:
        return int(Path(f"/proc/{pid}/schedstat").read_text().split()[0]) / 1e9
    except (OSError, ValueError, IndexError):
        pass
    stat = _stat(pid)
    return stat.own if stat is not None else 0.0


def snapshot(
    roots: Mapping[str, int | None], by_name: Mapping[str, Iterable[str]]
) -> dict[str, float]:
    """Seconds of CPU so far per component: `roots` are process trees (a service, an
    embedded server), `by_name` components found by process name (a real server of another
    user, e.g. {"postgres": ["postgres"]}: every process of that name on the machine)."""
    stats = _all()
    if not stats:
        return {}
    out = {name: _tree(stats, pid) for name, pid in roots.items() if pid is not None}
    for name, comms in by_name.items():
        wanted = set(comms)
        out[name] = sum(s.own + s.reaped for s in stats if s.comm in wanted)
    return out


def per_message(
    before: dict[str, float], after: dict[str, float], messages: int
) -> dict[str, float]:
    """Milliseconds of CPU per message, per component, between two snapshots."""
    return {
        name: (after[name] - before.get(name, 0.0)) * 1000 / messages for name in after if messages
    }
