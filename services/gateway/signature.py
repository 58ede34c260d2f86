"""Meta's `X-Hub-Signature-256`: HMAC-SHA256 of the raw body with the app secret."""

from __future__ import annotations

import hashlib
import hmac

PREFIX = "sha256="


def sign(body: bytes, secret: str) -> str:
    return PREFIX + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def equal(a: str, b: str) -> bool:
    """Constant-time comparison of two secrets (signatures, tokens)."""
    return hmac.compare_digest(a.encode(), b.encode())


def verify(body: bytes, header: str | None, secret: str) -> bool:
    """Constant-time check of the header against the body; False when missing or malformed."""
    if not header or not secret or not header.startswith(PREFIX):
        return False
    return equal(sign(body, secret), header.strip().lower())
