"""Files that hold keys, certificates and passwords: written whole or not at all (a reader never
sees half of one), readable only as their mode says (by default only their owner), also where an
older file with a wider mode was."""

from __future__ import annotations

import os
from pathlib import Path


def write_atomic(path: Path, data: bytes | str, mode: int = 0o600) -> None:
    if isinstance(data, str):
        data = data.encode()
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(fd, data)
        os.fchmod(fd, mode)  # O_CREAT's mode does not apply to a file that was there
    finally:
        os.close(fd)
    os.replace(tmp, path)
