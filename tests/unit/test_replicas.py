"""WA_SCALE: what it means, what it refuses, and the processes it plans."""

from __future__ import annotations

import pytest

from devtools import replicas


def test_wa_scale_names_replicas_per_service_and_the_rest_run_alone() -> None:
    assert replicas.parse("agent=3, state=2,dlq=2,gateway=2") == {
        "state": 2,
        "agent": 3,
        "dlq": 2,
        "gateway": 2,
    }
    assert replicas.parse("") == {"state": 1, "agent": 1, "dlq": 1, "gateway": 1}
    assert replicas.parse("agent=2")["state"] == 1


@pytest.mark.parametrize("text", ["agent", "agent=0", "agent=x", "agents=2", "agent=17"])
def test_a_wa_scale_that_cannot_be_understood_is_refused(text: str) -> None:
    with pytest.raises(replicas.ScaleError, match="WA_SCALE"):
        replicas.parse(text)


def test_replicas_get_their_own_ports_and_clients_one_target_naming_them_all() -> None:
    taken = {50061}  # the second state replica's preferred port is in use

    def port_for(preferred: int) -> int:
        return preferred + 1000 if preferred in taken else preferred

    plan = replicas.plan(
        replicas.parse("state=2,agent=3,gateway=2"),
        grpc_ports={"state": 50051, "agent": 50052, "dlq": 50053},
        metrics_ports={"state": 9101, "agent": 9102, "dlq": 9103},
        port_for=port_for,
    )
    assert plan.names("state") == ["state-1", "state-2"]
    assert plan.names("dlq") == ["dlq"]
    assert [r.grpc_port for r in plan.replicas["agent"]] == [50052, 50062, 50072]
    assert [r.metrics_port for r in plan.replicas["state"]] == [9101, 9111]
    state_2 = plan.replicas["state"][1]
    assert plan.env_for(state_2) == {
        "STATE_GRPC_PORT": "51061",
        "METRICS_PORT": "9111",
        "STATE_ADDR": "ipv4:127.0.0.1:50051,127.0.0.1:51061",
        "AGENT_ADDR": "ipv4:127.0.0.1:50052,127.0.0.1:50062,127.0.0.1:50072",
        "GATEWAY_REUSE_PORT": "true",
        "DATABASE_POOL_SIZE": "10",  # half of what state opens alone
    }
    # dlq runs alone: its clients keep their usual target.
    assert "DLQ_ADDR" not in plan.env_for(state_2)
    gateway = plan.replicas["gateway"][0]
    assert gateway.grpc_port is None and plan.env_for(gateway)["GATEWAY_REUSE_PORT"] == "true"


def test_one_of_each_is_the_system_as_it_always_ran() -> None:
    plan = replicas.plan(
        replicas.parse(""),
        grpc_ports={"state": 50051, "agent": 50052, "dlq": 50053},
        metrics_ports={"state": 9101, "agent": 9102, "dlq": 9103},
        port_for=lambda p: p,
    )
    assert not plan.scaled
    assert [r.name for r in plan.all()] == ["state", "agent", "dlq", "gateway"]
    assert plan.env_for(plan.replicas["state"][0]) == {
        "STATE_GRPC_PORT": "50051",
        "METRICS_PORT": "9101",
    }


def test_replicas_share_their_service_s_postgresql_connections() -> None:
    def pools(scale: str, pool_size: int = 0) -> dict[str, list[str | None]]:
        plan = replicas.plan(
            replicas.parse(scale),
            grpc_ports={"state": 50051, "agent": 50052, "dlq": 50053},
            metrics_ports={"state": 9101, "agent": 9102, "dlq": 9103},
            port_for=lambda p: p,
            pool_size=pool_size,
        )
        return {
            s: [plan.env_for(r).get("DATABASE_POOL_SIZE") for r in plan.replicas[s]]
            for s in ("state", "agent", "dlq", "gateway")
        }

    # Alone, each service opens what it always did; replicas divide it (rounded up), down to
    # two each; the gateway has no pool.
    assert pools("") == {"state": [None], "agent": [None], "dlq": [None], "gateway": [None]}
    assert pools("state=4,agent=3,dlq=2,gateway=2") == {
        "state": ["5"] * 4,
        "agent": ["7"] * 3,
        "dlq": ["5"] * 2,
        "gateway": [None] * 2,
    }
    assert pools("state=16")["state"] == ["2"] * 16
    # The operator's DATABASE_POOL_SIZE is every process's: nothing divided.
    assert pools("state=4", pool_size=3)["state"] == [None] * 4
