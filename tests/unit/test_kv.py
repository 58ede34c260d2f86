"""What common/kv.py says of a Redis URL and of the state service's ACL user."""

from __future__ import annotations

import pytest

from common import kv


@pytest.mark.parametrize(
    ("url", "anonymous"),
    [
        ("redis://redis.example.internal:6379/0", "redis.example.internal"),
        ("rediss://10.0.0.7:6379/0", "10.0.0.7"),
        ("redis://wa-state@redis:6379/0", "redis"),  # a user without a password
        ("redis://wa-state:pw@redis:6379/0", None),
        ("rediss://:pw@redis:6379/0", None),  # the `default` user's password
        ("redis://127.0.0.1:6379/0", None),  # this host: the tests' server, CI's
        ("redis://127.0.0.2:6379/0", None),
        ("redis://[::1]:6379/0", None),
        ("redis://localhost:6379/0", None),
        ("redis:///0", None),  # redis-py's default host, localhost
        ("unix:///run/redis.sock?db=0", None),
    ],
)
def test_a_url_without_a_password_to_another_host_is_anonymous(
    url: str, anonymous: str | None
) -> None:
    assert kv.anonymous_remote(url) == anonymous


def test_the_state_user_gets_its_prefix_and_its_commands_only() -> None:
    rules = kv.state_acl_rules("wa:").split()
    assert rules[:5] == ["resetkeys", "~wa:*", "resetchannels", "&wa:*", "-@all"]
    assert rules[5:] == [f"+{c}" for c in kv.STATE_COMMANDS]
    assert kv.state_acl_rules("wa:test:1f:").split()[1] == "~wa:test:1f:*"


@pytest.mark.parametrize("prefix", ["", "wa*", "w?:", "wa[1]:", "wa :", "wa:\n", "wa\\:"])
def test_a_prefix_that_is_no_plain_acl_pattern_is_refused(prefix: str) -> None:
    with pytest.raises(ValueError, match="REDIS_KEY_PREFIX"):
        kv.state_acl_rules(prefix)
