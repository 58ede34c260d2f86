"""How long each service may take to stop on its own once told to (SIGTERM): what the grace
of an orchestrator (compose's `stop_grace_period`, Kubernetes' `terminationGracePeriodSeconds`)
must exceed, or it kills a replica that is still handing back its work."""

from __future__ import annotations

from collections.abc import Mapping

from common import config, grpcserver
from services.agent import server as agent_server
from services.agent.settings import AgentSettings
from services.state import dispatcher, handback
from services.state import server as state_server
from services.state.settings import StateSettings

# Beyond the services' own bounds: the signal's delivery, the pool's and the exporter's close.
MARGIN_SECONDS = 3.0


def _setting(env: Mapping[str, str], variable: str, cls: type[config.Base], field: str) -> float:
    return float(env.get(variable, cls.model_fields[field].default))


def longest_stop(service: str, env: Mapping[str, str]) -> float:
    """The longest a `service` replica with this environment takes from SIGTERM to its exit,
    margin included."""
    if service == "agent":
        # The turns' drain (as long as the server's grace), then the records and the cut.
        drain = _setting(env, "AGENT_DRAIN_SECONDS", AgentSettings, "drain_seconds")
        own = drain + agent_server.CUT_SECONDS + agent_server.CLOSE_SECONDS
    elif service == "state":
        # Beside the server's grace and then the batches still being stored: the listener's
        # stop, the turns' drain, the cut drivers' releases and the hand-backs. Then the
        # last close: the cut drivers and hand-backs again (state/server.py's set-up).
        drain = _setting(env, "DRAIN_SECONDS", StateSettings, "drain_seconds")
        close = dispatcher.CLOSE_TIMEOUT + 2 * handback.HANDBACK_TIMEOUT
        own = (
            max(
                grpcserver.GRACE_SECONDS + state_server.INGEST_DRAIN_SECONDS,
                state_server.LISTENER_STOP_SECONDS + drain + close,
            )
            + close
        )
    else:
        own = grpcserver.GRACE_SECONDS
    return own + MARGIN_SECONDS
