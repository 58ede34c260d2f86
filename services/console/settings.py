"""What the console reads (README, Operator console)."""

from __future__ import annotations

from common import config


class ConsoleSettings(config.Base):
    # The operator role's login (common/roles.py): every read goes through its row level
    # security, narrowed per request to the logged-in operator's numbers.
    database_url: str = config.env("OPERATOR_DATABASE_URL", "")
    console_host: str = config.env("CONSOLE_HOST", "127.0.0.1")
    console_port: int = config.env("CONSOLE_PORT", 8081)
    # A message's trace link: `<JAEGER_UI_URL>/trace/<trace id>`; none when empty.
    jaeger_ui_url: str = config.env("JAEGER_UI_URL", "")
    # The gateway's base URL, for its /readyz on the overview (none shown when empty; make run
    # sets it).
    gateway_url: str = config.env("CONSOLE_GATEWAY_URL", "")
    session_hours: float = config.env("CONSOLE_SESSION_HOURS", 12.0, gt=0)
    # Lock-out: this many failed logins within the window lock the name for the window.
    max_failed_logins: int = config.env("CONSOLE_MAX_FAILED_LOGINS", 5, gt=0)
    lockout_minutes: float = config.env("CONSOLE_LOCKOUT_MINUTES", 15.0, gt=0)
