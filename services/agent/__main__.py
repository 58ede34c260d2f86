from common import config, grpcserver

from .server import setup

grpcserver.main("agent", config.AgentSettings, lambda s: s.agent_port, setup)
