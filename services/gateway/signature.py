"""Meta's `X-Hub-Signature-256`: HMAC-SHA256 of the raw body with the app secret.

During a rotation of the app secret two are configured (`WHATSAPP_APP_SECRET=old,new`) and a
signature made with either is valid. Every configured secret is tried on every delivery, and
the comparisons are not cut short, so the time taken says nothing about which one matched or
how close a forgery came; with one secret the check costs what it always did.
"""

from __future__ import annotations

import hashlib
import hmac

PREFIX = "sha256="


def sign(body: bytes, secret: str) -> str:
    return PREFIX + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def equal(a: str, b: str) -> bool:
    """Constant-time comparison of two secrets (signatures, tokens)."""
    return hmac.compare_digest(a.encode(), b.encode())


def secrets_of(value: str) -> tuple[str, ...]:
    """The secrets of a `WHATSAPP_APP_SECRET` value: comma-separated, blanks ignored."""
    return tuple(s for s in (part.strip() for part in value.split(",")) if s)


def verify(body: bytes, header: str | None, secrets: str | tuple[str, ...]) -> bool:
    """Constant-time check of the header against the body with each secret; False when the
    header is missing or malformed, or no secret is configured."""
    if isinstance(secrets, str):
        secrets = (secrets,) if secrets else ()
    if not header or not secrets or not header.startswith(PREFIX):
        return False
    given = header.strip().lower().encode()
    if len(secrets) == 1:  # the usual case: exactly the single-secret path
        return hmac.compare_digest(sign(body, secrets[0]).encode(), given)
    matched = False
    for secret in secrets:
        # `|`, not `or`: every secret is compared whatever the previous ones gave.
        matched = hmac.compare_digest(sign(body, secret).encode(), given) | matched
    return matched
