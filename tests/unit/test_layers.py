"""The package's layers: no import cycle between modules or between subpackages, and the pure
decision core loads no I/O library. Cycles make the next change hard to reason about (a module half
initialised when another reads it); a core that pulls in asyncio or yaml is no longer testable and
reusable on its own."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path

import orchestrator

ROOT = Path(orchestrator.__file__).parent
IO_MODULES = ("asyncio", "socket", "subprocess", "yaml")

Graph = Mapping[str, Iterable[str]]


def module_names(root: Path = ROOT) -> dict[str, Path]:
    """Every module under orchestrator/ by dotted name (a package by its __init__.py)."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def imported(name: str, path: Path, known: Mapping[str, Path]) -> set[str]:
    """The modules of `known` that `name` imports, wherever the import statement is (functions and
    TYPE_CHECKING blocks included): `import a.b`, `from a import b` (b a submodule or a name of
    a), relative imports, and the parent packages each import initialises on the way."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            targets.add(module)
            targets.update(f"{module}.{alias.name}" for alias in node.names)
    own = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 2)}
    out: set[str] = set()
    for target in targets:
        parts = target.split(".")
        for i in range(1, len(parts) + 1):
            prefix = ".".join(parts[:i])
            if prefix in known and prefix not in own:
                out.add(prefix)
    return out


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    known = module_names(root)
    return {name: imported(name, path, known) for name, path in known.items()}


def package_graph(graph: Graph) -> dict[str, set[str]]:
    """The same graph between orchestrator's subpackages (orchestrator.core, .health, ...)."""

    def top(name: str) -> str:
        return ".".join(name.split(".")[:2])

    out: dict[str, set[str]] = {}
    for name, deps in graph.items():
        out.setdefault(top(name), set()).update(top(d) for d in deps if top(d) != top(name))
    return out


def find_cycle(graph: Graph) -> list[str] | None:
    """One cycle as a path that ends where it starts, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)) is not None:
                return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start)) is not None:
            return found
    return None


def test_the_cycle_finder_names_a_cycle_and_accepts_a_tree() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_the_graph_sees_submodules_imported_by_from_and_relative_imports(tmp_path: Path) -> None:
    pkg = tmp_path / "orchestrator"
    (pkg / "a").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a" / "__init__.py").write_text("from . import x\n")
    (pkg / "a" / "x.py").write_text("def f():\n    from orchestrator import b\n")
    (pkg / "b.py").write_text("from orchestrator.a.x import f\n")
    graph = import_graph(pkg)
    assert graph["orchestrator.a"] == {"orchestrator.a.x"}
    assert graph["orchestrator.a.x"] == {"orchestrator.b"}
    assert graph["orchestrator.b"] == {"orchestrator.a", "orchestrator.a.x"}
    assert find_cycle(graph) == ["orchestrator.a", "orchestrator.a.x", "orchestrator.b", "orchestrator.a"]


def test_no_module_imports_itself_back() -> None:
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or ())


def test_no_subpackage_imports_itself_back() -> None:
    """E.g. core -> health -> core: the core would depend on the checkers' asyncio."""
    cycle = find_cycle(package_graph(import_graph()))
    assert cycle is None, "import cycle between packages: " + " -> ".join(cycle or ())


def test_the_core_loads_no_io_library() -> None:
    """In a fresh interpreter: pytest and the other tests have long loaded all of them here."""
    code = (
        "import importlib, json, pkgutil, sys\n"
        "import orchestrator.core as core\n"
        "for m in pkgutil.walk_packages(core.__path__, 'orchestrator.core.'):\n"
        "    importlib.import_module(m.name)\n"
        f"print(json.dumps([[m for m in {IO_MODULES!r} if m in sys.modules],\n"
        "                  sorted(m for m in sys.modules if m.startswith('orchestrator.core'))]))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT.parent)
    loaded_io, core_modules = json.loads(done.stdout)
    assert core_modules == sorted(m for m in module_names() if m.startswith("orchestrator.core"))
    assert loaded_io == []


def test_no_test_module_imports_another() -> None:
    """Shared helpers live in conftest.py; a test module importing another runs its tests twice
    over and ties unrelated tests to each other's details."""
    here = Path(__file__).parent
    modules = {p.stem for p in here.glob("test_*.py")}
    offenders = []
    for path in sorted(here.glob("test_*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""] + [f"{node.module}.{a.name}" for a in node.names]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            offenders += [f"{path.name} imports {n}" for n in names if n.rpartition(".")[2] in modules]
    assert offenders == []


def test_protocol_numbers_are_defined_once() -> None:
    """Netlink and netfilter numbers live in dataplane/netlink/constants.py, IP protocol numbers
    in ipproto.py: a second definition drifts (or hides a typo) without anyone noticing."""
    owners = {"IPPROTO_": "orchestrator.ipproto"}
    netlink = (
        "NETLINK_",
        "NLM_",
        "NLMSG_",
        "NLA_",
        "RTM_",
        "RTA_",
        "TCA_",
        "NFQA_",
        "NFQNL_",
        "NFNL_",
        "CTA_",
        "IPCTNL_",
        "NF_",
        "IFLA_",
        "IFA_",
        "FRA_",
    )
    owners.update({prefix: "orchestrator.dataplane.netlink.constants" for prefix in netlink})
    found = []
    for name, path in module_names().items():
        for node in ast.parse(path.read_text(), str(path)).body:
            targets = node.targets if isinstance(node, ast.Assign) else []
            names = [
                e.id for t in targets for e in (t.elts if isinstance(t, ast.Tuple) else [t]) if isinstance(e, ast.Name)
            ]
            found += [
                f"{name}.{n}"
                for n in names
                for prefix, owner in owners.items()
                if n.startswith(prefix) and name != owner
            ]
    assert found == []
