"""The documentation site builds with no broken link or reference (mkdocs --strict)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from .helpers.runs import ROOT

pytest.importorskip("mkdocs", reason="the docs extra: pip install -e '.[docs]'")


def test_docs_site_builds_strictly(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={"NO_MKDOCS_2_WARNING": "1", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    home = (tmp_path / "site" / "index.html").read_text()
    assert "The engine in ten lines" in home and 'href="engine/"' in home  # README, relinked
    api = (tmp_path / "site" / "api" / "index.html").read_text()
    assert "DEQLitModule" in api and "anderson" in api  # the reference, from the docstrings


@pytest.mark.parametrize(
    "module",
    [
        "deqlab.bound",
        "deqlab.core",
        "deqlab.norm",
        "deqlab.solvers.anderson",
        "deqlab.solvers.solver_config",
    ],
)
def test_the_examples_in_docstrings_run(module):
    """The API reference's examples are doctests: each runs and prints what it shows."""
    import doctest
    import importlib

    import torch

    result = doctest.testmod(importlib.import_module(module), extraglobs={"torch": torch})
    assert result.attempted > 0 and result.failed == 0
