"""The Redis client every service uses, with timeouts on connect and on every command, and
what the state service (its only user) needs of the server: its own ACL user."""

from __future__ import annotations

import ipaddress
import re
from urllib.parse import urlsplit

import redis.asyncio as aioredis

# The state service's user (README, Security): the embedded server's, compose's, and the one
# deploy/kubernetes/README.md asks for.
STATE_USER = "wa-state"
# Every command the state service sends (services/state: locks.py, sweeper.py, handback.py)
# and those its Lua scripts call (locks.py). Nothing that reads or changes keys beyond them, the
# server's configuration, or other clients. (Not CLIENT SETINFO: create_client does not send
# it, and before Redis 7.2 a rule naming it would stop the server from loading its users.)
STATE_COMMANDS = (
    "ping",
    "get",
    "set",
    "del",
    "pexpire",
    "exists",
    "pttl",
    "evalsha",
    "script|load",
    "publish",
    "subscribe",
)
# A key prefix the ACL rules below can name as it is: no glob pattern, no space.
_PREFIX = re.compile(r"[A-Za-z0-9:_.{}/-]+")


def state_acl_rules(prefix: str) -> str:
    """The state user's rules but its `on` and password: its keys and pub/sub channels (all
    under `prefix`, REDIS_KEY_PREFIX) and STATE_COMMANDS, nothing else."""
    if not _PREFIX.fullmatch(prefix):
        raise ValueError(
            f"REDIS_KEY_PREFIX {prefix!r}: use letters, digits and :_.{{}}/- only "
            "(it becomes an ACL key pattern)"
        )
    commands = " ".join(f"+{c}" for c in STATE_COMMANDS)
    return f"resetkeys ~{prefix}* resetchannels &{prefix}* -@all {commands}"


def anonymous_remote(url: str) -> str | None:
    """The host of a URL that logs in with no password to a server not on this host (where
    anyone on the network could take or break every lease), else None."""
    parts = urlsplit(url)
    if parts.scheme == "unix" or parts.password:
        return None
    host = parts.hostname or ""
    if host in ("", "localhost"):  # redis-py's default host is localhost
        return None
    try:
        if ipaddress.ip_address(host).is_loopback:
            return None
    except ValueError:
        pass
    return host


def create_client(url: str) -> aioredis.Redis:
    return aioredis.Redis.from_url(
        url,
        socket_timeout=2.0,
        socket_connect_timeout=2.0,
        health_check_interval=15,
        retry_on_timeout=False,
        decode_responses=True,
        # No CLIENT SETINFO on connecting: a round trip per connection for a label in
        # CLIENT LIST, which the state's user may not send (STATE_COMMANDS).
        driver_info=None,
    )
