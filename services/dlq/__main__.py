from common import grpcserver

from .server import setup

grpcserver.main("dlq", lambda s: s.dlq_port, setup)
