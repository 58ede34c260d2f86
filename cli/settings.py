"""What `wa` reads: every service's settings, since it starts, checks and drives them all."""

from __future__ import annotations

from common import config
from common.roles import RoleSettings
from services.agent.settings import AgentSettings
from services.dlq.settings import DlqSettings
from services.gateway.settings import GatewaySettings
from services.state.settings import StateSettings


class CliSettings(GatewaySettings, StateSettings, AgentSettings, DlqSettings, RoleSettings):
    """`wa` starts, checks and drives every service: it reads every setting. Its database
    login is the operator's role (OPERATOR_DATABASE_URL, read by RoleSettings);
    `wa run` and `wa migrate` use the owner's DATABASE_URL to migrate and provision."""

    database_url: str = config.env("DATABASE_URL", "")
    # `wa run`: processes per service, e.g. "agent=3,state=2" (devtools/replicas.py).
    scale: str = config.env("WA_SCALE", "")
