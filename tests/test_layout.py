"""The package's layout rules, checked on the source: no import cycle (function-level imports
included), kernels import nothing of the package, generic modules name no op, the registry holds
every op, and no work-item names in the tree."""
import ast
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG = os.path.join(ROOT, "sorsa_kernels")


def _modules():
    """module name -> path, for every .py file of the package."""
    out = {}
    for d, _, files in os.walk(PKG):
        for f in files:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(d, f), ROOT)[:-3].split(os.sep)
                if rel[-1] == "__init__":
                    rel = rel[:-1]
                out[".".join(rel)] = os.path.join(d, f)
    return out


def _imports(name, path, mods):
    """Package modules ``name`` imports anywhere in its source (top level and inside functions)."""
    is_pkg = path.endswith("__init__.py")
    base = name.split(".") if is_pkg else name.split(".")[:-1]
    out = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name in mods}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = base[:len(base) - node.level + 1] + (node.module.split(".") if node.module else [])
            else:
                parts = node.module.split(".")
            target = ".".join(parts)
            for a in node.names:
                sub = f"{target}.{a.name}"
                if sub in mods:
                    out.add(sub)
                elif target in mods:
                    out.add(target)
    out.discard(name)
    return out


def import_graph():
    mods = _modules()
    return {m: _imports(m, p, mods) for m, p in mods.items()}


def _cycle(graph):
    """One import cycle as a list of modules, or None (iterative DFS, three colours)."""
    colour, parent = {m: 0 for m in graph}, {}
    for start in sorted(graph):
        if colour[start]:
            continue
        stack = [(start, iter(sorted(graph[start])))]
        colour[start] = 1
        while stack:
            node, it = stack[-1]
            nxt = next(it, None)
            if nxt is None:
                colour[node] = 2
                stack.pop()
            elif colour[nxt] == 1:
                cyc = [nxt] + [n for n, _ in stack[[n for n, _ in stack].index(nxt) + 1:]]
                return cyc + [nxt]
            elif colour[nxt] == 0:
                colour[nxt] = 1
                stack.append((nxt, iter(sorted(graph[nxt]))))
    return None


def test_no_import_cycle():
    assert _cycle(import_graph()) is None, " -> ".join(_cycle(import_graph()))


def test_the_cycle_check_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


# modules that import nothing of the package but each other: what kernels' launchers may use
LEAVES = ("sorsa_kernels._env", "sorsa_kernels._device", "sorsa_kernels._build_info")


def test_leaves_are_leaves():
    g = import_graph()
    for leaf in LEAVES:
        assert g[leaf] <= set(LEAVES), (leaf, g[leaf])


def test_kernels_import_nothing_of_the_package_and_launchers_only_leaves():
    g = import_graph()
    ops = [m for m in g if re.fullmatch(r"sorsa_kernels\.ops\.\w+", m)]
    for op in ops:
        if f"{op}.kernels" in g:
            assert g[f"{op}.kernels"] == set(), op
        if f"{op}.launch" in g:
            assert all(t.startswith(op + ".") or t in LEAVES for t in g[f"{op}.launch"]), g[f"{op}.launch"]


GENERIC = ("sorsa_kernels._backend", "sorsa_kernels._autotune", "sorsa_kernels._env", "sorsa_kernels.cli",
           "sorsa_kernels.check", "sorsa_kernels.aot_check", "sorsa_kernels.bench", "sorsa_kernels.bench.cases",
           "sorsa_kernels.bench.report", "sorsa_kernels.bench.timing", "sorsa_kernels.bench.runners")


@pytest.mark.parametrize("module", GENERIC)
def test_generic_modules_name_no_op(module):
    """They reach ops through the registry (hooks), never by importing an op's package."""
    g = import_graph()
    assert not [t for t in g[module] if t.startswith("sorsa_kernels.ops.")], g[module]


def test_every_op_package_registers_itself():
    import sorsa_kernels  # noqa: F401
    from sorsa_kernels import _backend
    names = {s.name for s in _backend.specs()}
    packages = {m.split(".")[2] for m in _modules() if re.fullmatch(r"sorsa_kernels\.ops\.\w+", m)}
    assert len(names) == len(packages) and packages >= {"linear", "ortho", "rsvd"}, (names, packages)
    for s in _backend.specs():
        for ref in (s.check, s.aot, s.bench):
            assert ref is None or ref.startswith("sorsa_kernels.ops."), ref


WORK_ITEM = re.compile(r"\b[Ii]ssue[- ]?#?\d+|\breview (item|blocker)|\b(GPU|the) review\b|\bH[0-9]\b|\bstop \d+\b")


def test_no_work_item_names_in_the_tree():
    """Code, tests and docs say what and why, not which work item asked for it."""
    hits = []
    for top in ("sorsa_kernels", "tests", "benchmarks", "examples", "scripts", "docs", "csrc", ".ci"):
        for d, _, files in os.walk(os.path.join(ROOT, top)):
            for f in files:
                if f.endswith((".py", ".md", ".sh", ".h", ".cpp", ".cu")) and f != "test_layout.py":
                    path = os.path.join(d, f)
                    for i, line in enumerate(open(path, encoding="utf-8"), 1):
                        if WORK_ITEM.search(line):
                            hits.append(f"{os.path.relpath(path, ROOT)}:{i}: {line.strip()[:100]}")
    for f in ("README.md", "BENCHMARKS.md", "CONTRIBUTING.md", "setup.py", "pyproject.toml"):
        for i, line in enumerate(open(os.path.join(ROOT, f), encoding="utf-8"), 1):
            if WORK_ITEM.search(line):
                hits.append(f"{f}:{i}: {line.strip()[:100]}")
    assert not hits, "\n".join(hits)
