"""The layers and which way they import: the engine (``deqlab``) is pure PyTorch and knows
neither the runner (``deqlab.runner``) nor a task; the runner knows no task."""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "deqlab"
ENGINE = sorted(
    p for p in PACKAGE.rglob("*.py") if "runner" not in p.parts and "tasks" not in p.parts
)
RUNNER = sorted((PACKAGE / "runner").glob("*.py"))
# The task packages live in the repository's tasks/ and import as deqlab.tasks.*
TASKS = PACKAGE.parent / "tasks"


def module_name(path: Path, root: Path = PACKAGE.parent) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    if parts[0] == "tasks":
        parts = ("deqlab", *parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def runtime_nodes(tree: ast.AST) -> Iterator[ast.AST]:
    """Every node of ``tree`` that can run: all but the bodies of ``if TYPE_CHECKING:``."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and ast.unparse(node.test) in TYPE_CHECKING:
            yield from (n for child in node.orelse for n in [child, *runtime_nodes(child)])
            continue
        yield node
        yield from runtime_nodes(node)


TYPE_CHECKING = ("TYPE_CHECKING", "typing.TYPE_CHECKING")


def imported(path: Path, root: Path = PACKAGE.parent) -> set[str]:
    """The absolute names of the modules ``path`` imports (relative imports resolved), at
    module level or inside a function, leaving out type-only imports (``if TYPE_CHECKING``)."""
    package = module_name(path, root).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    names = set()
    for node in runtime_nodes(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            # module.name: the submodule when name is one (from .. import bound), else an
            # attribute of module, which import_graph reduces to module
            names |= {f"{module}.{a.name}" for a in node.names}
    return names


def test_importing_the_engine_loads_no_lightning_hydra_or_wandb():
    modules = [module_name(p) for p in ENGINE if p.name != "__main__.py"]
    code = (
        "import sys\n"
        + "".join(f"import {m}\n" for m in modules)
        + "print(sorted(m for m in ('lightning', 'pytorch_lightning', 'hydra', 'omegaconf', "
        "'wandb') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


@pytest.mark.parametrize("path", ENGINE, ids=lambda p: module_name(p))
def test_the_engine_imports_neither_the_runner_nor_a_task(path):
    if path.name == "__main__.py":  # `python -m deqlab`: the command's shim
        return
    bad = {m for m in imported(path) if m.startswith(("deqlab.runner", "deqlab.tasks"))}
    assert not bad, bad


@pytest.mark.parametrize("path", RUNNER, ids=lambda p: module_name(p))
def test_the_runner_imports_no_task(path):
    bad = {m for m in imported(path) if m.startswith("deqlab.tasks")}
    assert not bad, bad


def test_the_import_check_sees_a_violation(tmp_path):
    """The checks above can fail: relative and absolute imports of the runner or a task from
    an engine module are resolved to their absolute names."""
    probe = tmp_path / "deqlab" / "solvers" / "probe.py"
    probe.parent.mkdir(parents=True)
    probe.write_text(
        "from ..runner.module import DEQLitModule\nfrom .. import tasks\nimport deqlab.runner\n"
    )
    names = imported(probe, tmp_path)
    assert {"deqlab.runner.module.DEQLitModule", "deqlab.tasks", "deqlab.runner"} <= names


def import_graph(paths: list[Path], root: Path = PACKAGE.parent) -> dict[str, set[str]]:
    """Module -> the package's modules it imports (``from m import name`` counts as m)."""
    modules = {module_name(p, root): p for p in paths}
    graph = {}
    for module, path in modules.items():
        deps = set()
        for name in imported(path, root):
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name and name != module:
                deps.add(name)
        graph[module] = deps
    return graph


def loops(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import loops of ``graph``: its strongly connected components of more than one
    module (Tarjan's algorithm), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while not component or component[-1] != v:
                component.append(stack.pop())
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_module_imports_one_that_imports_it_back():
    """No import loop among deqlab's and the tasks' modules, including imports inside
    functions: each module can be read, and changed, after the ones it builds on."""
    paths = [*PACKAGE.rglob("*.py"), *TASKS.rglob("*.py")]
    assert loops(import_graph(paths)) == []


def test_the_loop_check_finds_a_loop_through_a_function_level_import(tmp_path):
    pkg = tmp_path / "deqlab"
    pkg.mkdir()
    (pkg / "a.py").write_text("from .b import g\n")
    (pkg / "b.py").write_text("def g():\n    from .c import h\n")
    (pkg / "c.py").write_text("import deqlab.a\n")
    (pkg / "d.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .a import g\n"
    )
    (pkg / "e.py").write_text("from .d import x\n")
    graph = import_graph(sorted(pkg.glob("*.py")), tmp_path)
    assert loops(graph) == [["deqlab.a", "deqlab.b", "deqlab.c"]]
    assert graph["deqlab.d"] == set()


@pytest.mark.parametrize(
    "old, new, name",
    [
        ("deqlab.torchdeq_core", "deqlab.compat.torchdeq", "TorchDEQCore"),
        ("deqlab.reversible", "deqlab.reversible_grad", "REVERSIBLE"),
        ("deqlab.solvers.registry", "deqlab.solvers.catalog", "register_solver"),
        ("deqlab.solvers.config", "deqlab.solvers.solver_config", "SolverConfig"),
    ],
)
def test_a_moved_module_still_imports_from_its_old_path_with_a_warning(old, new, name):
    import importlib

    sys.modules.pop(old, None)
    with pytest.warns(DeprecationWarning, match=f"{old} moved to {new}"):
        module = importlib.import_module(old)
    assert getattr(module, name) is getattr(importlib.import_module(new), name)


def test_bound_still_imports_from_the_capture_module_with_a_warning():
    import deqlab
    from deqlab.solvers import capture

    with pytest.warns(DeprecationWarning, match="use deqlab.Bound"):
        assert capture.Bound is deqlab.Bound
    with pytest.raises(AttributeError):
        capture.Unknown  # noqa: B018
