"""The dependency rules of ``service/``, checked by walking every module's imports.

API → data plane → core → state → store base; the core, state and stores know
nothing of gRPC, protobuf or the client package; an API touches only the data
plane; the store interface imports no implementation; nothing imports the server.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SERVICE = ROOT / "service"

TRANSPORT = ("grpc", "grpc_health", "grpc_reflection", "google.protobuf", "lstm_stream")
INNER = ("service.core", "service.state", "service.store")
API_MAY_USE = ("service.api", "service.dataplane", "service.settings", "service.metrics")
ENTRY_POINTS = ("service.__main__", "service.launch", "service.server", "service.healthcheck")
STORE_IMPLEMENTATIONS = ("service.store.sqlite", "service.store.redis", "service.store.null")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(source: str, module: str, is_package: bool = False) -> set[str]:
    """Every module a source imports, anywhere in it (functions too), relative ones resolved."""
    found: set[str] = set()
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            # ``from service.store import sqlite`` imports a module too.
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def under(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def violations(module: str, imported: set[str]) -> list[str]:
    """What ``module`` may not import, among ``imported``."""
    found = []
    for name in sorted(imported):
        if under(module, INNER) and under(name, (*TRANSPORT, "service.api", "service.server")):
            found.append(f"{module} (core/state/store) imports {name}")
        if under(module, INNER) and under(name, ("service.dataplane",)):
            found.append(f"{module} imports the data plane above it: {name}")
        if under(module, ("service.state",)) and under(name, ("service.core",)):
            found.append(f"{module} (state) imports the core above it: {name}")
        if under(module, ("service.store",)) and under(name, ("service.core", "service.state")):
            found.append(f"{module} (store) imports {name} above it")
        if module == "service.store.base" and under(name, ("service",)):
            found.append(f"the store interface imports {name}")
        api_reach = under(name, ("service",)) and not under(name, API_MAY_USE)
        if under(module, ("service.api",)) and api_reach:
            found.append(f"{module} (an API) reaches past the data plane: {name}")
        if under(name, ("service.server",)) and module not in ENTRY_POINTS:
            found.append(f"{module} calls up into the server: {name}")
        if under(name, STORE_IMPLEMENTATIONS) and not under(module, ("service.store",)):
            found.append(f"{module} imports a store implementation: {name}")
    return found


def service_modules() -> list[tuple[str, Path]]:
    return sorted((module_name(p), p) for p in SERVICE.rglob("*.py"))


def test_the_service_keeps_its_dependency_rules() -> None:
    problems = []
    for module, path in service_modules():
        source = path.read_text()
        problems += violations(module, imports(source, module, path.name == "__init__.py"))
    assert not problems, "\n".join(problems)


def test_the_layout_the_rules_speak_of_exists() -> None:
    names = {m for m, _ in service_modules()}
    for expected in (
        "service.core.engine",
        "service.state.table",
        "service.state.cache",
        "service.store.base",
        "service.api.native",
        "service.api.oip",
        "service.dataplane",
    ):
        assert expected in names


@pytest.mark.parametrize(
    ("module", "source", "complaint"),
    [
        ("service.core.plan", "import grpc", "imports grpc"),
        ("service.core.engine", "from google.protobuf import message", "google.protobuf"),
        ("service.state.cache", "from lstm_stream.v1 import lstm_stream_pb2", "lstm_stream"),
        ("service.state.table", "from service.core.types import Code", "imports the core"),
        ("service.core.engine", "from service.dataplane import DataPlane", "data plane"),
        ("service.store.base", "from service.store.sqlite import SqliteStore", "interface"),
        ("service.store.base", "from . import redis", "interface"),
        ("service.store.sqlite", "from service.state.table import SessionTable", "above it"),
        ("service.api.native", "from service.core.engine import Engine", "past the data plane"),
        ("service.api.oip", "from service.state.cache import SessionCache", "past the data"),
        ("service.api.native", "from service.store import open_store", "past the data plane"),
        ("service.core.engine", "from service.server import Server", "into the server"),
        ("service.dataplane", "from service.store.redis import RedisStore", "implementation"),
        ("service.core.engine", "def f():\n    import grpc.aio\n", "imports grpc.aio"),
    ],
)
def test_a_forbidden_import_is_found(module: str, source: str, complaint: str) -> None:
    found = violations(module, imports(source, module))
    assert any(complaint in problem for problem in found), found


def test_allowed_imports_pass() -> None:
    allowed = {
        "service.api.native": "from service.dataplane import DataPlane\nimport grpc",
        "service.core.engine": "from service.state.cache import SessionCache\nimport numpy",
        "service.state.cache": "from service.store.base import StoredRows",
        "service.store": "from service.store.sqlite import SqliteStore",
        "service.server": "from service.store import open_store",
    }
    for module, source in allowed.items():
        assert violations(module, imports(source, module)) == []
