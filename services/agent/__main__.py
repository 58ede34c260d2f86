from common import grpcserver
from services.agent.settings import AgentSettings

from .server import setup

grpcserver.main(
    "agent", AgentSettings, lambda s: s.agent_port, setup, grace_of=lambda s: s.drain_seconds
)
