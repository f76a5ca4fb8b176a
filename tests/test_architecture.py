"""The layering of docs/architecture.md, checked on the source: no cycle between
packages, the HTTP server and the remotes independent of each other, no SQL in ops/."""

from __future__ import annotations

import ast
import re
from collections import defaultdict
from pathlib import Path

import chatsave

ROOT = Path(chatsave.__file__).parent


def _package(module: str) -> str | None:
    """The package a ``chatsave.X...`` module belongs to (backend/storage on its own)."""
    parts = module.split(".")
    if len(parts) < 2 or parts[0] != "chatsave":
        return None
    if parts[1:3] == ["backend", "storage"]:
        return "backend/storage"
    return parts[1]


def imports() -> dict[str, set[str]]:
    """Package -> the chatsave packages and modules it imports (module level and inside
    functions)."""
    edges: dict[str, set[str]] = defaultdict(set)
    for path in ROOT.rglob("*.py"):
        me = _package(".".join(("chatsave", *path.relative_to(ROOT).with_suffix("").parts)))
        if me is None:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names: list[str] = []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            for name in names:
                other = _package(name)
                if other is not None and other != me and (
                        (ROOT / other).is_dir() or (ROOT / f"{other}.py").exists()):
                    edges[me].add(other)
    return edges


def test_no_cycle_between_packages() -> None:
    edges = imports()
    packages = {p for p in edges if (ROOT / p).is_dir()}

    def reaches(start: str, goal: str) -> list[str] | None:
        stack, seen = [(start, [start])], {start}
        while stack:
            node, path = stack.pop()
            for nxt in edges.get(node, ()):
                if nxt == goal:
                    return [*path, nxt]
                if nxt in packages and nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, [*path, nxt]))
        return None

    cycles = [cycle for p in sorted(packages) if (cycle := reaches(p, p))]
    assert not cycles, f"import cycles between packages: {cycles}"
    assert {"ops", "store", "remote", "server", "backend"} <= packages, "the scan sees them"


def test_the_http_server_and_the_remotes_do_not_import_each_other() -> None:
    edges = imports()
    assert "remote" not in edges["server"] and "server" not in edges["remote"]
    assert not edges["backend"] & {"server", "remote", "ops", "store", "cli"}, \
        "the backend core imports no transport and no client package"
    assert not edges["remote"] & {"ops", "store", "cli"}


def test_ops_runs_no_sql() -> None:
    sql = re.compile(r"\.execute(many)?\(|\b(SELECT|INSERT INTO|UPDATE \w+ SET|DELETE FROM)\b")
    found = [f"{p.name}:{n}" for p in (ROOT / "ops").glob("*.py")
             for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
             if sql.search(line)]
    assert not found, f"SQL outside store/: {found}"


def test_no_module_over_500_lines() -> None:
    """One concern a module: past 500 lines a module is split (docs/architecture.md)."""
    long = {str(p.relative_to(ROOT)): n for p in ROOT.rglob("*.py")
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > 500}
    assert not long, long
