"""Passwords out of what is printed and logged: `postgresql://svc:s3cret@db/wa` is shown as
`postgresql://svc:***@db/wa`. The one helper for it: `wa run`'s endpoints, configuration
errors and every JSON log line (common.logs) go through it."""

from __future__ import annotations

import re

MASK = "***"

# scheme://user:password@ : the password is what lies between the first ':' after the
# user and the last '@' before the host (a password may itself hold '@' or ':').
_USERINFO = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.\-]*://[^:/?#@\s\"']*:)[^\s\"'/?#]*@")


def mask_url(url: str) -> str:
    """`url` with its password, if any, replaced by `***`."""
    return _USERINFO.sub(lambda m: f"{m['head']}{MASK}@", url)


def mask_urls(text: str) -> str:
    """`text` with the password of every URL in it masked (cheap when it holds none)."""
    if "://" not in text or "@" not in text:
        return text
    return mask_url(text)
