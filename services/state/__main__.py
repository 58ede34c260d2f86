from common import grpcserver
from services.state.settings import StateSettings

from .server import setup

grpcserver.main("state", StateSettings, lambda s: s.state_port, setup)
