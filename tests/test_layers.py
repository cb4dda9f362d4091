"""The layers and which way they import: the engine (``deqlab``) is pure PyTorch and knows
neither the runner (``deqlab.runner``) nor a task; the runner knows no task."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "deqlab"
ENGINE = sorted(
    p for p in PACKAGE.rglob("*.py") if "runner" not in p.parts and "tasks" not in p.parts
)
RUNNER = sorted((PACKAGE / "runner").glob("*.py"))


def module_name(path: Path, root: Path = PACKAGE.parent) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(path: Path, root: Path = PACKAGE.parent) -> set[str]:
    """The absolute names of the modules ``path`` imports (relative imports resolved)."""
    package = module_name(path, root).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            names |= {module} | {f"{module}.{a.name}" for a in node.names}
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
    assert {"deqlab.runner.module", "deqlab.tasks", "deqlab.runner"} <= names
