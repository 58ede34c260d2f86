"""Operators' passwords: scrypt (memory-hard, in the standard library) with a random salt per
password. N=2**15, r=8 takes 32 MiB and ~0.1 s per guess on one core: slow for an offline
attacker, bearable at a login. The parameters are stored with each hash, so raising them
later leaves existing hashes verifiable."""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import secrets

N, R, P = 2**15, 8, 1
KEY_BYTES = 32
MIN_LENGTH = 12
# 128 * N * r bytes are needed; the default limit (32 MiB) is just below it.
_MAXMEM = 64 * 1024 * 1024


def hash_password(password: str) -> str:
    salt = secrets.token_bytes(16)
    key = hashlib.scrypt(
        password.encode(), salt=salt, n=N, r=R, p=P, dklen=KEY_BYTES, maxmem=_MAXMEM
    )
    b64 = base64.b64encode
    return f"scrypt${N}${R}${P}${b64(salt).decode()}${b64(key).decode()}"


def verify(password: str, stored: str) -> bool:
    try:
        scheme, n, r, p, salt, key = stored.split("$")
        if scheme != "scrypt":
            return False
        expected = base64.b64decode(key)
        got = hashlib.scrypt(
            password.encode(),
            salt=base64.b64decode(salt),
            n=int(n),
            r=int(r),
            p=int(p),
            dklen=len(expected),
            maxmem=_MAXMEM,
        )
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(got, expected)


@functools.cache
def dummy_hash() -> str:
    """Verified when the name is unknown, so an unknown name takes as long as a wrong
    password."""
    return hash_password(secrets.token_urlsafe(16))


def weak(password: str) -> str | None:
    """Why a new password is refused, or None."""
    if len(password) < MIN_LENGTH:
        return f"a password needs at least {MIN_LENGTH} characters"
    return None
