from common import config, grpcserver

from .server import setup

grpcserver.main("state", config.StateSettings, lambda s: s.state_port, setup)
