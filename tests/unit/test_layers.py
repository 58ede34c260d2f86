"""Which package may use which: developer tooling (`devtools`: embedded servers, supervisor,
codegen, free ports) is for `wa run`, the tests and the benchmarks, never loaded by a service;
the benchmarks do not use the tests' code; the CLI does not load the gateway's Starlette app.
Checked on what a fresh interpreter really loads (lazy imports inside functions too, by reading
every import statement)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

ROOT = Path(__file__).resolve().parents[2]
SERVICES = ("gateway", "state", "agent", "dlq")
# What the tooling defines, wherever it lives: free ports, the embedded servers, the supervisor,
# protoc for the code generation.
TOOLING_NAMES = ("free_port", "prepare_postgres", "prepare_valkey", "Supervisor", "protoc")

# Imports every module of the packages named (their __main__ aside: it starts the service),
# then prints what the interpreter has loaded, and which of the repository's modules define one
# of the tooling's names.
PROBE = """
import importlib, pkgutil, sys, orjson
names = TOOLING_NAMES
for name in sys.argv[1:]:
    module = importlib.import_module(name)
    for info in pkgutil.walk_packages(getattr(module, "__path__", []), name + "."):
        if info.name.rsplit(".", 1)[-1] != "__main__":
            importlib.import_module(info.name)
ours = ("common", "services", "cli", "devtools", "bench", "tests", "fastotel")
tooling = sorted(
    m for m, module in list(sys.modules.items())
    if m.split(".")[0] in ours and any(hasattr(module, n) for n in names)
)
print(orjson.dumps({"loaded": sorted(sys.modules), "tooling": tooling}).decode())
"""


def loaded_by(*packages: str) -> tuple[set[str], set[str]]:
    """The modules loaded by importing `packages`, and those of ours defining tooling."""
    out = subprocess.run(
        [sys.executable, "-c", PROBE.replace("TOOLING_NAMES", repr(TOOLING_NAMES)), *packages],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    result = orjson.loads(out)
    return set(result["loaded"]), set(result["tooling"])


def imported_names(folder: str, skip: frozenset[str] = frozenset()) -> dict[str, set[str]]:
    """Every module each file under `folder` imports, at any depth of its code."""
    found: dict[str, set[str]] = {}
    for path in sorted((ROOT / folder).rglob("*.py")):
        rel = str(path.relative_to(ROOT))
        if rel in skip:
            continue
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), rel)):
            if isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module)
                names.update(f"{node.module}.{alias.name}" for alias in node.names)
        found[rel] = names
    return found


def _under(names: set[str], package: str) -> set[str]:
    return {n for n in names if n == package or n.startswith(package + ".")}


@pytest.mark.parametrize("service", SERVICES)
def test_a_service_loads_no_developer_tooling(service: str) -> None:
    loaded, tooling = loaded_by(f"services.{service}", "common")
    assert f"services.{service}.server" in loaded or f"services.{service}.app" in loaded
    assert not _under(loaded, "devtools")
    assert not _under(loaded, "tests")
    assert tooling == set()


def test_no_service_or_common_module_imports_developer_tooling() -> None:
    for folder in ("services", "common"):
        for path, names in imported_names(folder).items():
            assert not _under(names, "devtools"), path
            assert not _under(names, "tests"), path


def test_the_benchmarks_do_not_use_the_tests_code() -> None:
    loaded, tooling = loaded_by("bench")
    assert "bench.harness" in loaded and "devtools.system" in loaded
    assert "devtools.ports" in tooling  # the probe does recognise the tooling
    assert not _under(loaded, "tests")
    for path, names in imported_names("bench").items():
        assert not _under(names, "tests"), path


def test_the_cli_loads_neither_the_gateway_app_nor_tooling_outside_wa_run() -> None:
    modules = [
        f"cli.{p.stem}" for p in sorted((ROOT / "cli").glob("*.py")) if p.stem not in ("run",)
    ]
    loaded, tooling = loaded_by(*modules)
    assert "cli.health" in loaded and "cli.simulate" in loaded
    assert "services.gateway.app" not in loaded
    assert not _under(loaded, "starlette")
    assert not _under(loaded, "devtools")
    assert tooling == set()
    for path, names in imported_names("cli", skip=frozenset({"cli/run.py"})).items():
        assert "services.gateway.app" not in names, path
        assert not _under(names, "devtools"), path
