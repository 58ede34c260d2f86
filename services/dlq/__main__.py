from common import grpcserver
from services.dlq.settings import DlqSettings

from .server import setup

grpcserver.main("dlq", DlqSettings, lambda s: s.dlq_port, setup)
