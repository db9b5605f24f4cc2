"""The package's layers, read from the source: no import cycle, arrows only downward, imports at
the top of modules (function-local only for optional dependencies, with a comment saying so),
and every module importable in a fresh interpreter in dependency order."""

import ast
import os
import subprocess
import sys

import pytest

from tests import REPO

PACKAGE = REPO / "patch_forcing"

# module prefix -> the package modules it may import (besides itself and its own folder)
ALLOWED = {
    "patch_forcing.presets": set(),
    "patch_forcing.paths": set(),
    "patch_forcing.sharding": set(),
    "patch_forcing.cluster": {"patch_forcing.sharding"},
    "patch_forcing.pictures": set(),
    "patch_forcing.metric_writer": {"patch_forcing.paths"},
    "patch_forcing.flow": {"patch_forcing.presets", "patch_forcing.sharding"},
    "patch_forcing.models": {"patch_forcing.presets", "patch_forcing.sharding", "patch_forcing.flow.interpolant",
                             "patch_forcing.paths"},
    "patch_forcing.data": {"patch_forcing.paths"},
    "patch_forcing.checkpoint": {"patch_forcing.models", "patch_forcing.paths"},
    "patch_forcing.conditioning": {"patch_forcing.models"},
    "patch_forcing.config_lib": {"patch_forcing.conditioning", "patch_forcing.data", "patch_forcing.flow",
                                 "patch_forcing.models", "patch_forcing.paths"},
    "patch_forcing.evaluation": {"patch_forcing.checkpoint", "patch_forcing.conditioning",
                                 "patch_forcing.config_lib", "patch_forcing.data", "patch_forcing.flow",
                                 "patch_forcing.models", "patch_forcing.pictures", "patch_forcing.sharding",
                                 "patch_forcing.paths"},
    "patch_forcing.studies": {"patch_forcing.checkpoint", "patch_forcing.config_lib", "patch_forcing.data",
                              "patch_forcing.evaluation", "patch_forcing.flow", "patch_forcing.models",
                              "patch_forcing.pictures", "patch_forcing.presets", "patch_forcing.sharding",
                              "patch_forcing.train"},
}
NEVER_IMPORTED = ("patch_forcing.main", "patch_forcing.tools", "patch_forcing.study")  # entry points
# Orchestration above the modes: only its entry point (and itself) imports it.
ONLY_FROM = {"patch_forcing.studies": ("patch_forcing.study", "patch_forcing.studies")}


def module_name(path) -> str:
    rel = path.relative_to(REPO).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def top_level_imports(path) -> set[str]:
    """patch_forcing modules imported at module level (not inside functions or classes)."""
    tree = ast.parse(path.read_text())
    found = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for a in node.names:  # `from patch_forcing.flow import samplers` imports a module
                sub = f"{node.module}.{a.name}"
                is_module = (REPO / (sub.replace(".", "/") + ".py")).exists() or (REPO / sub.replace(".", "/")).is_dir()
                found.add(sub if is_module else node.module)
    return {m for m in found if m == "patch_forcing" or m.startswith("patch_forcing.")}


def import_graph() -> dict[str, set[str]]:
    files = sorted(PACKAGE.rglob("*.py"))
    return {module_name(f): top_level_imports(f) - {module_name(f)} for f in files}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle as a list of modules (first == last), or None; depth-first search."""
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for d in sorted(graph.get(m, ())):
            if state.get(d) == "open":
                return stack[stack.index(d):] + [d]
            if d not in state and (c := visit(d)):
                return c
        state[m] = "done"
        stack.pop()
        return None

    for m in sorted(graph):
        if m not in state and (c := visit(m)):
            return c
    return None


def dependency_order(graph: dict[str, set[str]]) -> list[str]:
    order, seen = [], set()

    def visit(m):
        if m in seen:
            return
        seen.add(m)
        for d in sorted(graph.get(m, ())):
            visit(d)
        order.append(m)

    for m in sorted(graph):
        visit(m)
    return order


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_no_import_cycle():
    assert find_cycle(import_graph()) is None


def _allowed(module: str) -> set[str] | None:
    for prefix in sorted(ALLOWED, key=len, reverse=True):
        if module == prefix or module.startswith(prefix + "."):
            folder = prefix if (PACKAGE / prefix.split(".", 1)[1].replace(".", "/")).is_dir() else None
            return ALLOWED[prefix] | ({folder} if folder else set())
    return None


def _under(module: str, prefixes) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def _within(dep: str, allowed: set[str]) -> bool:
    return dep == "patch_forcing" or any(dep == a or dep.startswith(a + ".") for a in allowed)


def test_arrows_point_down():
    bad = []
    for module, deps in import_graph().items():
        allowed = _allowed(module)
        for dep in deps:
            entry = module == "patch_forcing.study" or _under(module, ("patch_forcing.tools",))  # may use tools.cli
            if _under(dep, NEVER_IMPORTED) and not entry:
                bad.append(f"{module} -> {dep} (an entry point)")
            elif any(_under(dep, (p,)) and not _under(module, ok) for p, ok in ONLY_FROM.items()):
                bad.append(f"{module} -> {dep} (only its entry point imports it)")
            elif allowed is not None and not _within(dep, allowed):
                bad.append(f"{module} -> {dep}")
    assert not bad, bad


def test_configs_import_only_presets():
    for f in sorted((REPO / "configs").glob("*.py")):
        deps = top_level_imports(f)
        assert deps <= {"patch_forcing.presets"}, (f.name, deps)


def test_function_local_imports_are_optional_dependencies():
    bad = []
    for f in sorted(PACKAGE.rglob("*.py")):
        lines = f.read_text().splitlines()
        for node in ast.walk(ast.parse("\n".join(lines))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for inner in ast.walk(node):
                    if isinstance(inner, (ast.Import, ast.ImportFrom)):
                        line = lines[inner.lineno - 1]
                        if "optional" not in line:
                            bad.append(f"{f.relative_to(REPO)}:{inner.lineno}: {line.strip()}")
    assert not bad, bad


@pytest.mark.slow
def test_every_module_imports_in_dependency_order_in_a_fresh_interpreter():
    order = [m for m in dependency_order(import_graph()) if m != "patch_forcing.main"] + ["patch_forcing.main"]
    code = "import importlib\nfor m in %r:\n    importlib.import_module(m)\n" % order
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
