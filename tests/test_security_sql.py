"""SQL is parameterised everywhere: no value ever becomes part of an SQL string.

A static check over chatsave/ (the precise form of bandit's B608, which .ci/run skips for
that reason): every SQL text built with an f-string, ``%``, ``+`` or ``.format``, and the
first argument of every ``execute``/``executemany``/``executescript`` call, may only be made
of constants: literals, module or class constants, column lists, ``?`` placeholders, local
names assigned only from such things, parameters that every caller passes a constant, and
functions that return only such things. Anything else (a chat id, a message id, a value
read from a file or an answer) fails the test with its file and line.

The behavioural side (ids full of quotes, semicolons and comment markers stored and read
back exactly) is in test_security_ids.py.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "chatsave"
SQL = re.compile(r"\b(SELECT|INSERT|UPDATE|DELETE|CREATE|DROP|ALTER|PRAGMA|REPLACE|WHERE|"
                 r"VALUES|FROM|BEGIN|VACUUM|ATTACH|SAVEPOINT|RELEASE)\b")
EXECUTE = {"execute", "executemany", "executescript"}
STR_METHODS = {"join", "replace", "strip", "lstrip", "rstrip", "lower", "upper", "format"}
NUMERIC = {"int", "len", "float", "bool", "min", "max", "round"}
# Builtins and methods whose result holds only what their arguments (or receiver) hold.
PASSTHROUGH = {"enumerate", "zip", "sorted", "reversed", "list", "tuple", "iter"}
CONTAINER_METHODS = {"items", "values", "keys", "copy"}
CAPS = re.compile(r"_*[A-Z][A-Z0-9_]*")


@dataclass
class Module:
    path: Path
    tree: ast.Module
    parents: dict[ast.AST, ast.AST] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for node in ast.walk(self.tree):
            for child in ast.iter_child_nodes(node):
                self.parents[child] = node

    def enclosing(self, node: ast.AST, kinds: tuple[type, ...]) -> ast.AST | None:
        while node in self.parents:
            node = self.parents[node]
            if isinstance(node, kinds):
                return node
        return None


class Checker:
    """Decides whether an expression can only be built from constants."""

    def __init__(self, modules: list[Module]) -> None:
        self.modules = modules
        self.functions: dict[str, list[tuple[Module, ast.FunctionDef]]] = {}
        self.calls: dict[str, list[ast.Call]] = {}
        for mod in modules:
            for node in ast.walk(mod.tree):
                if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                    self.functions.setdefault(node.name, []).append((mod, node))  # type: ignore[arg-type]
                elif isinstance(node, ast.Call):
                    name = _called_name(node)
                    if name:
                        self.calls.setdefault(name, []).append(node)
        self._busy: set[int] = set()

    # ------------------------------------------------------------------ rules
    def safe(self, expr: ast.AST | None, mod: Module, scope: ast.AST | None) -> bool:
        if expr is None:
            return False
        key = id(expr)
        if key in self._busy:  # a cycle (x = x + "...") adds nothing unsafe by itself
            return True
        self._busy.add(key)
        try:
            return self._safe(expr, mod, scope)
        finally:
            self._busy.discard(key)

    def _safe(self, expr: ast.AST, mod: Module, scope: ast.AST | None) -> bool:
        s = lambda e: self.safe(e, mod, scope)  # noqa: E731
        if isinstance(expr, ast.Constant):
            return True
        if isinstance(expr, ast.Tuple | ast.List | ast.Set):
            return all(s(e) for e in expr.elts)
        if isinstance(expr, ast.Dict):
            return all(s(k) for k in expr.keys if k is not None) and all(
                s(v) for v in expr.values)
        if isinstance(expr, ast.JoinedStr):
            return all(s(v) for v in expr.values)
        if isinstance(expr, ast.FormattedValue):
            return s(expr.value)
        if isinstance(expr, ast.IfExp):
            return s(expr.body) and s(expr.orelse)
        if isinstance(expr, ast.BinOp):
            if isinstance(expr.op, ast.Mult):  # "?" * n: repetitions of a constant
                return any(isinstance(x, ast.Constant) and isinstance(x.value, str)
                           for x in (expr.left, expr.right)) or (s(expr.left) and s(expr.right))
            return s(expr.left) and s(expr.right)
        if isinstance(expr, ast.GeneratorExp | ast.ListComp | ast.SetComp):
            return all(s(g.iter) for g in expr.generators) and s(expr.elt)
        if isinstance(expr, ast.Starred):
            return s(expr.value)
        if isinstance(expr, ast.Subscript):
            return s(expr.value)
        if isinstance(expr, ast.Attribute):
            return bool(CAPS.fullmatch(expr.attr)) and self._constant_named(expr.attr, mod)
        if isinstance(expr, ast.Call):
            return self._safe_call(expr, mod, scope)
        if isinstance(expr, ast.Name):
            return self._safe_name(expr, mod, scope)
        return False

    def _safe_call(self, call: ast.Call, mod: Module, scope: ast.AST | None) -> bool:
        func = call.func
        args = [*call.args, *(k.value for k in call.keywords)]
        if isinstance(func, ast.Name) and func.id in NUMERIC:
            return True  # a number cannot carry SQL
        if isinstance(func, ast.Name) and func.id in PASSTHROUGH:
            return all(self.safe(a, mod, scope) for a in args)
        if isinstance(func, ast.Attribute) and func.attr in STR_METHODS | CONTAINER_METHODS:
            return self.safe(func.value, mod, scope) and all(
                self.safe(a, mod, scope) for a in args)
        name = _called_name(call)
        defs = self.functions.get(name or "", [])
        if not defs or not all(self.safe(a, mod, scope) for a in args):
            return False
        return all(self._returns_safe(dmod, d) for dmod, d in defs)

    def _returns_safe(self, mod: Module, func: ast.FunctionDef) -> bool:
        returns = [n.value for n in ast.walk(func) if isinstance(n, ast.Return)]
        return bool(returns) and all(self.safe(r, mod, func) for r in returns)

    def _safe_name(self, name: ast.Name, mod: Module, scope: ast.AST | None) -> bool:
        ident = name.id
        # Bound by a comprehension around the use?
        node: ast.AST = name
        while node in mod.parents:
            node = mod.parents[node]
            if isinstance(node, ast.GeneratorExp | ast.ListComp | ast.SetComp | ast.DictComp):
                for gen in node.generators:
                    if ident in _target_names(gen.target):
                        return self.safe(gen.iter, mod, scope)
            if node is scope:
                break
        if isinstance(scope, ast.FunctionDef | ast.AsyncFunctionDef):
            params = [*scope.args.posonlyargs, *scope.args.args, *scope.args.kwonlyargs]
            if any(p.arg == ident for p in params):
                return self._param_safe(scope, ident)
            bound = list(_assignments(scope, ident))
            if bound:
                return all(self._bound_safe(b, mod, scope) for b in bound)
        return self._constant_named(ident, mod)

    def _bound_safe(self, bound: tuple[ast.AST, ast.AST, int | None], mod: Module,
                    scope: ast.AST) -> bool:
        value, _target, index = bound
        if index is None:
            return self.safe(value, mod, scope)
        return self.safe(_element(value, index), mod, scope)

    def _imported_from(self, ident: str, mod: Module) -> Module | None:
        """The chatsave module ``from chatsave.x import ident`` (at module level) names."""
        for node in mod.tree.body:
            if isinstance(node, ast.ImportFrom) and node.module \
                    and node.module.startswith("chatsave") \
                    and any(a.name == ident and a.asname is None for a in node.names):
                tail = "/" + node.module.replace(".", "/") + ".py"
                return next((m for m in self.modules if m.path.as_posix().endswith(tail)),
                            None)
        return None

    def _param_safe(self, func: ast.FunctionDef | ast.AsyncFunctionDef, ident: str) -> bool:
        """A parameter is a constant when every call passes a constant (or the default)."""
        params = [*func.args.posonlyargs, *func.args.args]
        position = next((i for i, p in enumerate(params) if p.arg == ident), None)
        offset = 1 if params and params[0].arg in ("self", "cls") else 0
        calls = self.calls.get(func.name, [])
        if not calls:
            return False  # called from elsewhere: could be anything
        for call in calls:
            given: ast.AST | None = next((k.value for k in call.keywords if k.arg == ident),
                                         None)
            if given is None and position is not None:
                i = position - offset
                if 0 <= i < len(call.args):
                    given = call.args[i]
            if given is not None and not isinstance(given, ast.Constant):
                return False
        return True

    def _constant_named(self, ident: str, mod: Module) -> bool:
        """A module- or class-level name assigned only constants (in this module, or in the
        chatsave module it is imported from under its own name)."""
        source = self._imported_from(ident, mod)
        if source is not None:
            return source is not mod and self._constant_named(ident, source)
        found = False
        for node in ast.walk(mod.tree):
            if isinstance(node, ast.Assign | ast.AnnAssign):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                if any(isinstance(t, ast.Name) and t.id == ident for t in targets):
                    if mod.enclosing(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                        continue
                    found = True
                    if not self.safe(node.value, mod, None):
                        return False
        return found


def _called_name(call: ast.Call) -> str | None:
    if isinstance(call.func, ast.Name):
        return call.func.id
    if isinstance(call.func, ast.Attribute):
        return call.func.attr
    return None


def _target_names(target: ast.AST) -> set[str]:
    return {n.id for n in ast.walk(target) if isinstance(n, ast.Name)}


def _element(value: ast.AST, index: int) -> ast.AST | None:
    if isinstance(value, ast.Tuple | ast.List) and index < len(value.elts):
        return value.elts[index]
    if isinstance(value, ast.IfExp):
        body, orelse = _element(value.body, index), _element(value.orelse, index)
        if body is None or orelse is None:
            return None
        return ast.IfExp(test=value.test, body=body, orelse=orelse)
    return None


def _assignments(func: ast.AST, ident: str) -> Iterator[tuple[ast.AST, ast.AST, int | None]]:
    """(value, target, tuple index or None) of every binding of ``ident`` in ``func``."""
    for node in ast.walk(func):
        if isinstance(node, ast.Assign):
            for target in node.targets:
                yield from _bind(node.value, target, ident)
        elif isinstance(node, ast.AnnAssign | ast.AugAssign) and node.value is not None:
            yield from _bind(node.value, node.target, ident)
        elif isinstance(node, ast.For | ast.AsyncFor | ast.With | ast.NamedExpr):
            if isinstance(node, ast.For | ast.AsyncFor):
                if ident in _target_names(node.target):
                    yield (ast.Subscript(value=node.iter, slice=ast.Constant(0)),
                           node.target, None)
            elif isinstance(node, ast.NamedExpr) and node.target.id == ident:
                yield node.value, node.target, None
            elif isinstance(node, ast.With):
                for item in node.items:
                    if item.optional_vars is not None and \
                            ident in _target_names(item.optional_vars):
                        yield ast.Name(id="<with>"), item.optional_vars, None


def _bind(value: ast.AST, target: ast.AST, ident: str
          ) -> Iterator[tuple[ast.AST, ast.AST, int | None]]:
    if isinstance(target, ast.Name) and target.id == ident:
        yield value, target, None
    elif isinstance(target, ast.Tuple | ast.List):
        for i, elt in enumerate(target.elts):
            if isinstance(elt, ast.Name) and elt.id == ident:
                yield value, elt, i


def _load(paths: list[Path]) -> list[Module]:
    return [Module(p, ast.parse(p.read_text(encoding="utf-8"), str(p))) for p in paths]


def sql_sites(modules: list[Module]) -> Iterator[tuple[Module, ast.AST, str]]:
    """(module, expression, what) for every SQL text built from parts, and every execute."""
    for mod in modules:
        for node in ast.walk(mod.tree):
            if isinstance(node, ast.JoinedStr):
                text = "".join(v.value for v in node.values if isinstance(v, ast.Constant))
                if SQL.search(text) and any(isinstance(v, ast.FormattedValue)
                                            for v in node.values):
                    yield mod, node, "f-string"
            elif isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mod | ast.Add):
                if any(isinstance(x, ast.Constant) and isinstance(x.value, str)
                       and SQL.search(x.value) for x in (node.left, node.right)):
                    yield mod, node, "+ or %"
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                receiver = node.func.value
                if node.func.attr == "format" and isinstance(receiver, ast.Constant) and \
                        isinstance(receiver.value, str) and SQL.search(receiver.value):
                    yield mod, node, ".format"
                if node.func.attr in EXECUTE and node.args:
                    yield mod, node.args[0], f".{node.func.attr}()"


def unsafe_sites(paths: list[Path]) -> list[str]:
    modules = _load(paths)
    checker = Checker(modules)
    found = []
    for mod, expr, what in sql_sites(modules):
        scope = mod.enclosing(expr, (ast.FunctionDef, ast.AsyncFunctionDef))
        if not checker.safe(expr, mod, scope):
            where = mod.path.relative_to(ROOT) if mod.path.is_relative_to(ROOT) else mod.path
            found.append(f"{where}:{getattr(expr, 'lineno', '?')} {what}: "
                         f"{ast.unparse(expr)[:120]}")
    return found


def test_every_sql_text_in_chatsave_is_built_from_constants() -> None:
    paths = sorted(PACKAGE.rglob("*.py"))
    modules = _load(paths)
    sites = list(sql_sites(modules))
    # The check looks at the real thing: there are many execute calls and built SQL texts.
    assert sum(1 for _, _, w in sites if w.startswith(".execute")) > 100
    assert sum(1 for _, _, w in sites if w == "f-string") > 10
    assert unsafe_sites(paths) == []


BAD = {
    "fstring-id": """
def f(conn, chat_id):
    conn.execute(f"SELECT * FROM m WHERE id = '{chat_id}'")
""",
    "percent": """
def f(conn, i):
    conn.execute("DELETE FROM m WHERE id = %s" % i)
""",
    "concat": """
def f(conn, i):
    conn.execute("SELECT * FROM m WHERE id = " + i)
""",
    "format": """
def f(conn, i):
    conn.execute("SELECT {} FROM m".format(i))
""",
    "variable": """
def f(conn, i):
    sql = "SELECT 1 FROM m WHERE x = " + i
    conn.execute(sql)
""",
    "param-non-constant-caller": """
def g(conn, order):
    conn.execute(f"SELECT 1 FROM m ORDER BY {order}")
def h(conn, user_value):
    g(conn, user_value)
""",
    "join-of-values": """
def f(conn, ids):
    conn.execute(f"SELECT 1 FROM m WHERE id IN ({','.join(ids)})")
""",
    "helper-returning-value": """
def where(v):
    return f"WHERE id = {v}"
def f(conn, v):
    conn.execute("SELECT 1 FROM m " + where(v))
""",
    "attribute": """
def f(self, conn):
    conn.execute(f"SELECT 1 FROM m WHERE id = {self.chat_id}")
""",
    "executescript": """
def f(conn, script):
    conn.executescript(script)
""",
    "loop-over-values": """
def f(conn, names):
    for name in names:
        conn.execute(f"DROP TABLE {name}")
""",
}
GOOD = {
    "placeholders": """
def f(conn, ids):
    marks = ",".join("?" * len(ids))
    conn.execute(f"SELECT 1 FROM m WHERE id IN ({marks})", ids)
""",
    "columns": """
COLS = ("a", "b")
def f(conn, i):
    conn.execute(f"SELECT {', '.join(COLS)} FROM m WHERE id = ?", (i,))
""",
    "filter": """
def f(conn, c):
    where, args = ("WHERE c = ?", (c,)) if c else ("", ())
    conn.execute(f"SELECT 1 FROM m {where}", args)
""",
    "constant-caller": """
def g(conn, mode="IMMEDIATE"):
    conn.execute(f"BEGIN {mode}")
def h(conn):
    g(conn, "DEFERRED")
    g(conn)
""",
    "pragma-number": """
def f(conn, s):
    conn.execute(f"PRAGMA busy_timeout = {int(s * 1000)}")
""",
    "migrations": """
MIGRATIONS = [("initial", ["CREATE TABLE a (x)", "CREATE TABLE b (y)"])]
def f(conn):
    for number, (name, statements) in enumerate(MIGRATIONS, start=1):
        for statement in statements:
            conn.execute(statement)
""",
}


@pytest.mark.parametrize("name", list(BAD))
def test_the_check_catches_values_in_sql(tmp_path: Path, name: str) -> None:
    path = tmp_path / f"{name.replace('-', '_')}.py"
    path.write_text(BAD[name])
    assert unsafe_sites([path]), f"{name} was not flagged"


@pytest.mark.parametrize("value, flagged", [('"(SELECT k FROM b WHERE id = ?)"', False),
                                            ("input()", True)])
def test_a_constant_imported_from_another_module_is_checked_there(
        tmp_path: Path, value: str, flagged: bool) -> None:
    package = tmp_path / "chatsave"
    package.mkdir()
    (package / "keys.py").write_text(f"KEY = {value}\n")
    (package / "use.py").write_text(
        "from chatsave.keys import KEY\n"
        "def f(conn, i):\n"
        "    conn.execute(f'SELECT 1 FROM m WHERE k = {KEY} AND id = ?', (i, i))\n")
    found = unsafe_sites([package / "keys.py", package / "use.py"])
    assert bool(found) is flagged, found
    # Alone, the module using it cannot show the name is a constant.
    assert unsafe_sites([package / "use.py"])


@pytest.mark.parametrize("name", list(GOOD))
def test_the_check_accepts_parameterised_sql(tmp_path: Path, name: str) -> None:
    path = tmp_path / f"{name.replace('-', '_')}.py"
    path.write_text(GOOD[name])
    assert unsafe_sites([path]) == []
