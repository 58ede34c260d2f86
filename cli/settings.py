"""What `wa` reads: every service's settings, since it starts, checks and drives them all."""

from __future__ import annotations

from common import config
from services.agent.settings import AgentSettings
from services.dlq.settings import DlqSettings
from services.gateway.settings import GatewaySettings
from services.state.settings import StateSettings


class CliSettings(GatewaySettings, StateSettings, AgentSettings, DlqSettings):
    """`wa` starts, checks and drives every service: it reads every setting (RUN_DIR is
    common/config.py's)."""

    # `wa run`: processes per service, e.g. "agent=3,state=2" (devtools/replicas.py).
    scale: str = config.env("WA_SCALE", "")
