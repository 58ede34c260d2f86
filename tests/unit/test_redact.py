"""Passwords of URLs never printed: the helper, the JSON log lines, configuration errors and
`wa run`'s endpoints."""

from __future__ import annotations

import io
import logging
from pathlib import Path

import orjson
import pytest

from cli import run
from cli.settings import CliSettings
from common import logs
from common.config import ConfigError
from common.redact import mask_url, mask_urls


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("postgresql://svc:s3cret@db:5432/wa", "postgresql://svc:***@db:5432/wa"),
        (
            "postgresql://u:p@ss:w@rd@h/db?sslmode=require",
            "postgresql://u:***@h/db?sslmode=require",
        ),
        ("redis://:s3cret@redis:6379/0", "redis://:***@redis:6379/0"),
        ("rediss://default:s3cret@redis:6379/0", "rediss://default:***@redis:6379/0"),
        # Nothing to hide: unchanged.
        (
            "postgresql://postgres@127.0.0.1:5432/postgres",
            "postgresql://postgres@127.0.0.1:5432/postgres",
        ),
        (
            "postgresql://postgres@/db?host=/tmp/pg&port=5432",
            "postgresql://postgres@/db?host=/tmp/pg&port=5432",
        ),
        ("http://127.0.0.1:8080/webhook", "http://127.0.0.1:8080/webhook"),
        ("", ""),
    ],
)
def test_a_urls_password_is_masked(url: str, shown: str) -> None:
    assert mask_url(url) == shown


def test_every_url_in_a_text_is_masked() -> None:
    text = 'connect to "postgresql://a:pw1@h/d" failed; redis://:pw2@r:1/0 too'
    masked = mask_urls(text)
    assert "pw1" not in masked and "pw2" not in masked
    assert masked == 'connect to "postgresql://a:***@h/d" failed; redis://:***@r:1/0 too'


def test_log_lines_never_hold_a_urls_password() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logs.JsonFormatter("test"))
    log = logging.getLogger("test.redact")
    log.addHandler(handler)
    log.propagate = False
    try:
        log.error(
            "cannot connect to %s",
            "postgresql://state:pg-pass@db/wa",
            extra={"url": "redis://:r-pass@r/0"},
        )
    finally:
        log.removeHandler(handler)
    line = stream.getvalue()
    assert "pg-pass" not in line and "r-pass" not in line
    entry = orjson.loads(line)
    assert entry["msg"] == "cannot connect to postgresql://state:***@db/wa"
    assert entry["url"] == "redis://:***@r/0"


def test_a_configuration_error_never_shows_a_urls_password() -> None:
    with pytest.raises(ConfigError) as caught:
        CliSettings.from_env({"METRICS_PORT": "postgresql://u:cfg-pass@h/db"})
    assert "cfg-pass" not in str(caught.value) and "METRICS_PORT" in str(caught.value)


def test_wa_run_prints_the_servers_urls_with_their_passwords_masked(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    settings = CliSettings.from_env({})
    run._print_endpoints(
        settings,
        "postgresql://owner:own-pass@db:5432/wa",
        "redis://:r-pass@r:6379/0",
        run._replicas(settings),
        tmp_path,
        None,
    )
    err = capsys.readouterr().err
    assert "own-pass" not in err and "r-pass" not in err
    assert "postgresql://owner:***@db:5432/wa" in err and "redis://:***@r:6379/0" in err
