from common import grpcserver

from .server import setup

grpcserver.main("agent", lambda s: s.agent_port, setup)
