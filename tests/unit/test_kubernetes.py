"""deploy/kubernetes cannot be applied here (no cluster): the kustomization is rendered offline
(devtools.kustomize), every object is validated against the Kubernetes API's schemas
(kubernetes-validate, strict: unknown fields are errors), and what README promises of the
manifests is checked on the result. Each check is also shown to reject a broken copy."""

from __future__ import annotations

import copy
import math
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes_validate import utils as kubernetes_validate

from cli.run import SERVICES, service_command
from cli.settings import CliSettings
from common import kv
from devtools import kustomize
from devtools.kustomize import KustomizeError, Object
from tests.support.grace import longest_stop
from tests.unit.test_compose import JOB_CONNECTIONS, SECRET_NAME, known_variables

ROOT = Path(__file__).resolve().parents[2]
KUBERNETES = ROOT / "deploy" / "kubernetes"
BASE = KUBERNETES / "base"
PRODUCTION = KUBERNETES / "overlays" / "production"
# The oldest Kubernetes the manifests promise to work on (README, Kubernetes).
KUBERNETES_VERSION = "1.30.0"
NAMESPACE = "wa"
GRPC_PORTS = {"state": 50051, "agent": 50052, "dlq": 50053}
# Who calls whom over gRPC: the code's channels (the gateway's /readyz asks all three,
# common/components.py), and operators' CLI and console.
CALLERS = {
    "state": {"gateway", "dlq", "operator", "console"},
    "agent": {"state", "dlq", "gateway", "operator", "console"},
    "dlq": {"state", "gateway", "operator", "console"},
}
OWN_DATABASE_URL = {
    "state": "STATE_DATABASE_URL",
    "agent": "AGENT_DATABASE_URL",
    "dlq": "DLQ_DATABASE_URL",
    "gateway": None,
}


def render(directory: Path = PRODUCTION) -> list[Object]:
    return kustomize.build(directory)


def find(objects: list[Object], kind: str, name: str) -> Object:
    matches = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(matches) == 1, f"{kind}/{name}: {len(matches)} found"
    return matches[0]


def schema_errors(objects: list[Object]) -> list[str]:
    errors = []
    for obj in objects:
        try:
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            errors.append(f"{obj['kind']}/{obj['metadata']['name']}: {exc.message}")
    return errors


def _container(deployment: Object) -> Object:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    container: Object = containers[0]
    return container


def _env(container: Object) -> dict[str, Any]:
    return {e["name"]: e for e in container.get("env", [])}


def deployment_problems(objects: list[Object]) -> list[str]:
    problems = []
    for name in SERVICES:
        deployment = find(objects, "Deployment", name)
        pod = deployment["spec"]["template"]["spec"]
        container = _container(deployment)
        port = "http" if name == "gateway" else "metrics"
        # The gateway is routed to while it can store a delivery (services/gateway/app.py).
        ready = "/readyz?for=ingest" if name == "gateway" else "/readyz"
        for probe, path in (("readinessProbe", ready), ("livenessProbe", "/healthz")):
            get = container.get(probe, {}).get("httpGet", {})
            if (get.get("path"), get.get("port")) != (path, port):
                problems.append(f"{name}: {probe} is not GET {path} on port {port}")
        ports = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
        if name != "gateway" and (
            ports.get("metrics") != 9100 or ports.get("grpc") != GRPC_PORTS[name]
        ):
            problems.append(f"{name}: ports {ports}")
        resources = container.get("resources", {})
        for kind in ("requests", "limits"):
            if not {"cpu", "memory"} <= set(resources.get(kind, {})):
                problems.append(f"{name}: no cpu and memory {kind}")
        security = pod.get("securityContext", {})
        if security.get("runAsNonRoot") is not True:
            problems.append(f"{name}: may run as root")
        if security.get("seccompProfile", {}).get("type") != "RuntimeDefault":
            problems.append(f"{name}: no RuntimeDefault seccomp profile")
        csc = container.get("securityContext", {})
        if csc.get("readOnlyRootFilesystem") is not True:
            problems.append(f"{name}: writable root filesystem")
        if csc.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{name}: may escalate privileges")
        if csc.get("capabilities", {}).get("drop") != ["ALL"]:
            problems.append(f"{name}: keeps capabilities")
        if pod.get("enableServiceLinks") is not False:
            problems.append(f"{name}: service links set GATEWAY_PORT=tcp://... and the like")
        if pod.get("automountServiceAccountToken") is not False:
            problems.append(f"{name}: mounts a Kubernetes API token it does not need")
        if container.get("command") != service_command(name, "python"):
            problems.append(f"{name}: {container.get('command')} is not what make run starts")
        values = {k: str(e["value"]) for k, e in _env(container).items() if "value" in e}
        grace = pod.get("terminationGracePeriodSeconds", 30)
        # The preStop hook's time counts against the grace.
        pre_stop = container.get("lifecycle", {}).get("preStop", {}).get("exec", {})
        waits = float(pre_stop["command"][1]) if pre_stop.get("command", [""])[0] == "sleep" else 0
        if name == "gateway" and waits < 2:
            problems.append("gateway: no preStop wait for its endpoints to be removed")
        if grace < waits + (stops := longest_stop(name, values)):
            problems.append(
                f"{name}: terminationGracePeriodSeconds {grace} kills it before it can stop on"
                f" its own ({waits:g} + {stops:g} s)"
            )
        mounts = {m["mountPath"]: m for m in container.get("volumeMounts", [])}
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        tls = mounts.get("/etc/wa/tls", {})
        secret = volumes.get(tls.get("name", ""), {}).get("secret", {})
        if tls.get("readOnly") is not True or secret.get("secretName") != f"wa-tls-{name}":
            problems.append(f"{name}: its own TLS secret wa-tls-{name} not at /etc/wa/tls, ro")
        if "emptyDir" not in volumes.get(mounts.get("/tmp", {}).get("name", ""), {}):
            problems.append(f"{name}: no writable /tmp on its read-only root")
        env = _env(container)
        urls = {k for k in env if k.endswith("DATABASE_URL")}
        own = OWN_DATABASE_URL[name]
        if urls != ({own} if own else set()):
            problems.append(f"{name}: database URLs {sorted(urls)}, expected only {own}")
        if own:
            problems += _schema_wait_problems(name, pod, env[own])
    return problems


def _schema_wait_problems(name: str, pod: Object, url: Object) -> list[str]:
    """A service with a database first waits, with its own URL from the same secret, until the
    migrate Job has brought the schema its image needs (`common.migrate --wait`)."""
    variable = url["name"]
    for init in pod.get("initContainers", []):
        command = init.get("command", [])
        if command[:4] == ["python", "-m", "common.migrate", "--wait"] and command[5:] == [
            "--url-from",
            variable,
        ]:
            if _env(init).get(variable) != url:
                return [f"{name}: its schema wait reads another {variable}"]
            if init.get("securityContext", {}).get("readOnlyRootFilesystem") is not True:
                return [f"{name}: its schema wait has a writable root filesystem"]
            return []
    return [f"{name}: starts without waiting for the schema (common.migrate --wait)"]


def secret_problems(objects: list[Object]) -> list[str]:
    """Secrets are referenced, never inlined: no Secret object, no literal secret value."""
    problems = []
    for obj in objects:
        if obj["kind"] == "Secret":
            problems.append(f"Secret/{obj['metadata']['name']} inlined")
        if obj["kind"] == "ConfigMap":
            problems += [
                f"ConfigMap/{obj['metadata']['name']}: {key}"
                for key in obj.get("data", {})
                if SECRET_NAME.search(key) or key.endswith(("DATABASE_URL", "REDIS_URL"))
            ]
        if obj["kind"] not in kustomize.WORKLOADS:
            continue
        for container in kustomize.containers(obj):
            for name, entry in _env(container).items():
                secretish = SECRET_NAME.search(name) or name.endswith(("DATABASE_URL", "REDIS_URL"))
                if secretish and "secretKeyRef" not in entry.get("valueFrom", {}):
                    problems.append(f"{obj['metadata']['name']}: {name} not from a Secret")
    return problems


def _selects(rule_peer: Object) -> str | None:
    """The `app.kubernetes.io/name` a peer selects within the namespace, else None."""
    if set(rule_peer) != {"podSelector"}:
        return None
    name: str | None = rule_peer["podSelector"].get("matchLabels", {}).get("app.kubernetes.io/name")
    return name


def network_problems(objects: list[Object]) -> list[str]:
    problems = []
    policies = [o for o in objects if o["kind"] == "NetworkPolicy"]
    deny = [
        p
        for p in policies
        if p["spec"]["podSelector"] == {}
        and set(p["spec"].get("policyTypes", [])) == {"Ingress", "Egress"}
        and not p["spec"].get("ingress")
        and not p["spec"].get("egress")
    ]
    if not deny:
        problems.append("no default-deny NetworkPolicy")
    for policy in policies:
        selected = (
            policy["spec"]["podSelector"].get("matchLabels", {}).get("app.kubernetes.io/name")
        )
        for rule in policy["spec"].get("ingress", []):
            peers = rule.get("from")
            outside = not peers or any(_selects(p) is None for p in peers)
            if outside and selected != "gateway":
                problems.append(
                    f"NetworkPolicy/{policy['metadata']['name']}: lets traffic from outside "
                    f"the namespace reach {selected or 'every pod'}"
                )
            for port in rule.get("ports", []):
                for service, number in GRPC_PORTS.items():
                    if port.get("port") == number and selected == service:
                        peer_names = {_selects(p) for p in peers or [{}]}
                        if not peer_names <= set(CALLERS[service]):
                            problems.append(f"{service}: gRPC open to {peer_names}")
    for service, callers in CALLERS.items():
        ingress = [
            rule
            for p in policies
            if p["spec"]["podSelector"].get("matchLabels", {}).get("app.kubernetes.io/name")
            == service
            for rule in p["spec"].get("ingress", [])
        ]
        allowed = {
            _selects(peer)
            for rule in ingress
            for peer in rule.get("from", [])
            if any(p.get("port") == GRPC_PORTS[service] for p in rule.get("ports", []))
        }
        if allowed != callers:
            problems.append(f"{service}: gRPC callers {allowed}, expected {callers}")
    return problems


# --- the renderer --------------------------------------------------------------------------


def _write(directory: Path, files: dict[str, Any]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        text = content if isinstance(content, str) else yaml.safe_dump_all(content)
        (directory / name).write_text(text)
    return directory


DEPLOYMENT: dict[str, Any] = {
    "apiVersion": "apps/v1",
    "kind": "Deployment",
    "metadata": {"name": "web"},
    "spec": {
        "replicas": 1,
        "template": {
            "spec": {
                "containers": [
                    {
                        "name": "web",
                        "image": "registry.local:5000/web:1",
                        "args": ["a", "b"],
                        "env": [{"name": "A", "value": "1"}, {"name": "B", "value": "2"}],
                    },
                    {"name": "side", "image": "side"},
                ]
            }
        },
    },
}


def test_the_renderer_applies_kustomizes_subset_as_kustomize_does(tmp_path: Path) -> None:
    _write(
        tmp_path / "base",
        {
            "kustomization.yaml": [{"resources": ["web.yaml", "ns.yaml"], "namespace": "one"}],
            "web.yaml": [DEPLOYMENT],
            "ns.yaml": [{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "one"}}],
        },
    )
    patch = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "web"},
        "spec": {
            "template": {
                "spec": {
                    "containers": [
                        {
                            "name": "web",
                            "args": ["c"],
                            "env": [{"name": "B", "value": "3"}, {"name": "C", "value": "4"}],
                        }
                    ]
                }
            }
        },
    }
    _write(
        tmp_path / "overlay",
        {
            "kustomization.yaml": [
                {
                    "resources": ["../base"],
                    "namespace": "two",
                    "images": [
                        {"name": "registry.local:5000/web", "newName": "r/web", "newTag": "2"},
                        {"name": "side", "digest": "sha256:" + "a" * 64},
                    ],
                    "replicas": [{"name": "web", "count": 4}],
                    "patches": [{"path": "patch.yaml"}],
                }
            ],
            "patch.yaml": [patch],
        },
    )
    web, namespace = kustomize.build(tmp_path / "overlay")
    assert namespace == {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "one"}}
    assert web["metadata"]["namespace"] == "two"
    assert web["spec"]["replicas"] == 4
    main, side = web["spec"]["template"]["spec"]["containers"]
    assert main["image"] == "r/web:2"
    assert side["image"] == "side@sha256:" + "a" * 64
    assert main["args"] == ["c"], "a list without a merge key is replaced"
    assert main["env"] == [
        {"name": "A", "value": "1"},
        {"name": "B", "value": "3"},
        {"name": "C", "value": "4"},
    ], "env merges on name"
    assert DEPLOYMENT["spec"]["replicas"] == 1, "the input is not modified"


@pytest.mark.parametrize(
    "kustomization",
    [
        {"resources": ["web.yaml"], "commonLabels": {"a": "b"}},
        {"resources": ["missing.yaml"]},
        {"resources": ["web.yaml"], "patches": [{"path": "web.yaml", "target": {"kind": "X"}}]},
        {"resources": ["web.yaml"], "replicas": [{"name": "other", "count": 2}]},
        {"resources": ["web.yaml"], "images": [{"name": "nothing", "newTag": "2"}]},
        {"resources": ["web.yaml", "web.yaml"]},
    ],
)
def test_the_renderer_refuses_what_it_cannot_render_faithfully(
    tmp_path: Path, kustomization: dict[str, Any]
) -> None:
    _write(tmp_path, {"kustomization.yaml": [kustomization], "web.yaml": [DEPLOYMENT]})
    with pytest.raises(KustomizeError):
        kustomize.build(tmp_path)


def test_the_renderer_prints_the_objects(capsys: pytest.CaptureFixture[str]) -> None:
    assert kustomize.main([str(PRODUCTION)]) == 0
    printed = list(yaml.safe_load_all(capsys.readouterr().out))
    assert printed == render()
    assert kustomize.main([str(ROOT / "nowhere")]) == 1


# --- the manifests -------------------------------------------------------------------------


@pytest.mark.parametrize("directory", [BASE, PRODUCTION], ids=["base", "production"])
def test_every_object_is_valid_for_the_kubernetes_api(directory: Path) -> None:
    objects = render(directory)
    assert len(objects) > 20
    assert schema_errors(objects) == []


def test_the_validator_rejects_a_broken_manifest(tmp_path: Path) -> None:
    copy_of = tmp_path / "kubernetes"
    shutil.copytree(KUBERNETES, copy_of)
    state = copy_of / "base" / "state.yaml"
    state.write_text(state.read_text().replace("readinessProbe:", "readinesProbe:", 1))
    dlq = copy_of / "base" / "dlq.yaml"
    dlq.write_text(dlq.read_text().replace("containerPort: 50053", "containerPort: grpc", 1))
    errors = schema_errors(render(copy_of / "overlays" / "production"))
    assert any("Deployment/state" in e and "readinesProbe" in e for e in errors), errors
    assert any("Deployment/dlq" in e for e in errors), errors


def test_deployments_keep_their_promises() -> None:
    for directory in (BASE, PRODUCTION):
        assert deployment_problems(render(directory)) == []


def _deployment(objects: list[Object], name: str) -> Object:
    return find(objects, "Deployment", name)


MUTATIONS: dict[str, Callable[[list[Object]], None]] = {
    "no readiness probe": lambda o: _container(_deployment(o, "agent")).pop("readinessProbe"),
    "liveness on the gRPC port": lambda o: _container(_deployment(o, "state"))["livenessProbe"][
        "httpGet"
    ].update(port="grpc"),
    "no limits": lambda o: _container(_deployment(o, "dlq"))["resources"].pop("limits"),
    "root allowed": lambda o: _deployment(o, "gateway")["spec"]["template"]["spec"][
        "securityContext"
    ].update(runAsNonRoot=False),
    "writable root": lambda o: _container(_deployment(o, "state"))["securityContext"].update(
        readOnlyRootFilesystem=False
    ),
    "capabilities kept": lambda o: _container(_deployment(o, "agent"))["securityContext"].pop(
        "capabilities"
    ),
    "another command": lambda o: _container(_deployment(o, "dlq")).update(
        command=["python", "services/dlq"]
    ),
    "owner URL": lambda o: _container(_deployment(o, "state"))["env"].append(
        {"name": "DATABASE_URL", "valueFrom": {"secretKeyRef": {"name": "x", "key": "y"}}}
    ),
    "another service's certificate": lambda o: _deployment(o, "gateway")["spec"]["template"][
        "spec"
    ]["volumes"][0]["secret"].update(secretName="wa-tls-state"),
    "no schema wait": lambda o: _deployment(o, "agent")["spec"]["template"]["spec"].pop(
        "initContainers"
    ),
    "a schema wait with another URL": lambda o: _deployment(o, "dlq")["spec"]["template"]["spec"][
        "initContainers"
    ][0]["env"][1]["valueFrom"]["secretKeyRef"].update(key="state-url"),
    "a grace shorter than the agent's drain": lambda o: _container(_deployment(o, "agent"))[
        "env"
    ].append({"name": "AGENT_DRAIN_SECONDS", "value": "40"}),
    "a grace shorter than the state's drain": lambda o: _deployment(o, "state")["spec"]["template"][
        "spec"
    ].update(terminationGracePeriodSeconds=10),
    "no preStop wait on the gateway": lambda o: _container(_deployment(o, "gateway")).pop(
        "lifecycle"
    ),
    "a preStop wait longer than the grace": lambda o: _container(_deployment(o, "gateway"))[
        "lifecycle"
    ]["preStop"]["exec"].update(command=["sleep", "29"]),
    "service links": lambda o: _deployment(o, "gateway")["spec"]["template"]["spec"].pop(
        "enableServiceLinks"
    ),
}


@pytest.mark.parametrize("mutation", sorted(MUTATIONS))
def test_the_deployment_check_rejects_a_broken_deployment(mutation: str) -> None:
    objects = copy.deepcopy(render())
    MUTATIONS[mutation](objects)
    assert deployment_problems(objects) != []


def test_grpc_services_are_headless_and_the_gateway_is_not() -> None:
    objects = render()
    for name, port in GRPC_PORTS.items():
        service = find(objects, "Service", name)
        assert service["spec"]["clusterIP"] == "None", f"{name}: clients must see every pod"
        assert service["spec"]["selector"] == {"app.kubernetes.io/name": name}
        assert [p["port"] for p in service["spec"]["ports"]] == [port]
    gateway = find(objects, "Service", "gateway")
    assert gateway["spec"].get("clusterIP") != "None"
    assert gateway["spec"]["ports"][0]["targetPort"] == "http"
    config = find(objects, "ConfigMap", "wa-config")["data"]
    for name, port in GRPC_PORTS.items():
        assert config[f"{name.upper()}_ADDR"] == (
            f"dns:///{name}.{NAMESPACE}.svc.cluster.local:{port}"
        )
    assert config["GRPC_HOST"] == "0.0.0.0"
    assert config["GRPC_TLS_DIR"] == "/etc/wa/tls"
    assert config["METRICS_PORT"] == "9100"
    assert {o["metadata"].get("namespace") for o in objects if o["kind"] != "Namespace"} == {
        NAMESPACE
    }


# At most what the manifests open to PostgreSQL at once: what a managed PostgreSQL of a small
# production size allows (its max_connections less the provider's reserved ones).
CONNECTION_BUDGET = 200


def _surge(deployment: Object, replicas: int) -> int:
    """The pods a rolling update adds beside `replicas` (maxSurge: 25 % by default)."""
    strategy = deployment["spec"].get("strategy", {})
    surge = strategy.get("rollingUpdate", {}).get("maxSurge", "25%")
    if strategy.get("type") == "Recreate":
        return 0
    if isinstance(surge, str) and surge.endswith("%"):
        return math.ceil(replicas * int(surge[:-1]) / 100)
    return int(surge)


def postgres_connections(objects: list[Object]) -> tuple[int, list[str]]:
    """The most connections the manifests open to PostgreSQL at once: each Deployment with a
    database URL at its autoscaler's maximum (else its replicas) plus a rolling update's surge,
    times its pool (DATABASE_POOL_SIZE, which each must set: unset, every pod would open its
    whole service's POOL_SIZES share); JOB_CONNECTIONS for each Job."""
    most = {
        o["spec"]["scaleTargetRef"]["name"]: int(o["spec"]["maxReplicas"])
        for o in objects
        if o["kind"] == "HorizontalPodAutoscaler"
    }
    total, problems = 0, []
    for obj in objects:
        if obj["kind"] not in ("Deployment", "Job"):
            continue
        containers = obj["spec"]["template"]["spec"]["containers"]
        env = {k: e for c in containers for k, e in _env(c).items()}
        if not any(k.endswith("DATABASE_URL") for k in env):
            continue
        name = obj["metadata"]["name"]
        if obj["kind"] == "Job":
            total += JOB_CONNECTIONS
            continue
        pool = env.get("DATABASE_POOL_SIZE", {}).get("value")
        if pool is None:
            problems.append(f"{name}: no DATABASE_POOL_SIZE")
            continue
        replicas = most.get(name, obj["spec"].get("replicas", 1))
        total += (replicas + _surge(obj, replicas)) * int(pool)
    if total > CONNECTION_BUDGET:
        problems.append(f"{total} PostgreSQL connections at most, over {CONNECTION_BUDGET}")
    return total, problems


def test_every_pod_fits_in_postgresqls_connections_and_the_readme_says_how_many() -> None:
    readme = " ".join((KUBERNETES / "README.md").read_text().split())
    for directory, name in ((PRODUCTION, "production overlay"), (BASE, "base")):
        total, problems = postgres_connections(render(directory))
        assert problems == []
        assert f"the {name} opens at most {total} connections to PostgreSQL" in readme


def test_the_connection_check_rejects_an_unbounded_pool_or_a_larger_autoscaler() -> None:
    objects = render()
    unbounded = copy.deepcopy(objects)
    container = _container(_deployment(unbounded, "agent"))
    container["env"] = [e for e in container["env"] if e["name"] != "DATABASE_POOL_SIZE"]
    assert "agent: no DATABASE_POOL_SIZE" in postgres_connections(unbounded)[1]
    wider = copy.deepcopy(objects)
    find(wider, "HorizontalPodAutoscaler", "agent")["spec"]["maxReplicas"] = 40
    assert postgres_connections(wider)[1] != []
    assert postgres_connections(wider)[0] > postgres_connections(objects)[0]


def test_the_readme_removes_the_previous_migrate_job_before_applying() -> None:
    # A Job's pod template is immutable: `kubectl apply` of a new image's Job beside the
    # previous release's (kept an hour for its logs) is refused, and no migration runs.
    readme = (KUBERNETES / "README.md").read_text()
    job = find(render(), "Job", "migrate")
    assert job["spec"].get("ttlSecondsAfterFinished", 0) > 0
    delete = readme.index("kubectl -n wa delete job migrate --ignore-not-found")
    assert delete < readme.index("kubectl apply -k deploy/kubernetes/overlays/production")


def test_disruption_budgets_and_autoscalers() -> None:
    objects = render()
    for name in SERVICES:
        budget = find(objects, "PodDisruptionBudget", name)
        assert budget["spec"]["selector"]["matchLabels"] == {"app.kubernetes.io/name": name}
    for name in ("gateway", "agent"):
        hpa = find(objects, "HorizontalPodAutoscaler", name)
        assert hpa["spec"]["scaleTargetRef"] == {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "name": name,
        }
        assert 2 <= hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"]
        assert "replicas" not in _deployment(objects, name)["spec"], "the autoscaler's to set"


def test_the_migrate_job_alone_gets_the_owner_url_from_a_secret() -> None:
    objects = render()
    job = find(objects, "Job", "migrate")
    container = _container(job)
    assert container["command"] == ["python", "-m", "common.migrate"]
    env = _env(container)
    assert env["DATABASE_URL"]["valueFrom"]["secretKeyRef"] == {
        "name": "wa-database",
        "key": "owner-url",
    }
    for role in ("STATE", "AGENT", "DLQ", "OPERATOR"):
        assert "secretKeyRef" in env[f"{role}_DATABASE_URL"]["valueFrom"]
    for obj in objects:
        if obj["kind"] in kustomize.WORKLOADS and obj is not job:
            for c in kustomize.containers(obj):
                assert "DATABASE_URL" not in _env(c), obj["metadata"]["name"]


def test_no_secret_is_inlined() -> None:
    objects = render()
    assert secret_problems(objects) == []
    broken = copy.deepcopy(objects)
    _container(_deployment(broken, "gateway"))["env"].append(
        {"name": "WHATSAPP_APP_SECRET", "value": "s3cret"}
    )
    broken.append(
        {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "x"}, "data": {"a": "Yg=="}}
    )
    assert len(secret_problems(broken)) == 2


def test_network_policies_deny_by_default_and_open_only_what_is_called() -> None:
    objects = render()
    assert network_problems(objects) == []
    # Broken copies: no default deny; a gRPC port open to everyone; one caller too many.
    for breakage in ("deny", "open", "caller"):
        broken = copy.deepcopy(objects)
        if breakage == "deny":
            broken = [o for o in broken if o["metadata"]["name"] != "default-deny"]
        elif breakage == "open":
            find(broken, "NetworkPolicy", "agent")["spec"]["ingress"][0].pop("from")
        else:
            find(broken, "NetworkPolicy", "state")["spec"]["ingress"][0]["from"].append(
                {"podSelector": {"matchLabels": {"app.kubernetes.io/name": "agent"}}}
            )
        assert network_problems(broken) != [], breakage


def test_the_console_runs_what_make_run_starts_with_its_own_certificate_and_role() -> None:
    objects = render()
    console = _deployment(objects, "console")
    pod = console["spec"]["template"]["spec"]
    container = _container(console)
    assert container["command"] == service_command("console", "python")
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert pod["volumes"][0]["secret"]["secretName"] == "wa-tls-console"
    env = _env(container)
    assert {k for k in env if k.endswith("DATABASE_URL")} == {"OPERATOR_DATABASE_URL"}
    assert env["OPERATOR_DATABASE_URL"]["valueFrom"]["secretKeyRef"]["key"] == "operator-url"
    assert container["readinessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    policy = find(objects, "NetworkPolicy", "console")
    assert policy["spec"]["ingress"] == [], "not reachable from outside the namespace"


def test_the_production_overlay_sets_image_replicas_and_resources() -> None:
    base, production = render(BASE), render(PRODUCTION)
    for name in SERVICES:
        assert _container(_deployment(base, name))["image"] == "wa-agents"
        image = _container(_deployment(production, name))["image"]
        assert image.startswith("registry.example.com/wa-agents:"), image
        assert (
            _container(_deployment(production, name))["resources"]
            != _container(_deployment(base, name))["resources"]
        )
    assert _deployment(production, "state")["spec"]["replicas"] >= 2
    assert _deployment(production, "dlq")["spec"]["replicas"] >= 2


def test_manifests_set_only_variables_the_services_read() -> None:
    known = known_variables()
    objects = render()
    config = find(objects, "ConfigMap", "wa-config")["data"]
    assert sorted(set(config) - known) == []
    for obj in objects:
        for container in kustomize.containers(obj) if obj["kind"] in kustomize.WORKLOADS else []:
            unknown = sorted(set(_env(container)) - known)
            assert unknown == [], f"{obj['metadata']['name']}: {unknown}"


def test_the_redis_secret_is_the_state_users_and_the_readme_names_its_acl() -> None:
    """deploy/kubernetes/README.md gives the Redis server the same user as compose and the
    embedded server (common/kv.py), and the Secret's URL logs in as it."""
    readme = (KUBERNETES / "README.md").read_text()
    rules = kv.state_acl_rules(CliSettings.from_env({}).redis_prefix)
    assert f"#   ACL SETUSER {kv.STATE_USER} on >PASSWORD {rules}\n" in readme
    assert f"url='rediss://{kv.STATE_USER}:PASSWORD@" in readme
    env = _env(_container(_deployment(render(), "state")))
    assert env["REDIS_URL"]["valueFrom"]["secretKeyRef"] == {"name": "wa-redis", "key": "url"}
