from common import config, grpcserver

from .server import setup

grpcserver.main("dlq", config.DlqSettings, lambda s: s.dlq_port, setup)
