from common import grpcserver

from .server import setup

grpcserver.main("state", lambda s: s.state_port, setup)
