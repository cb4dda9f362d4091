"""Test-wide fixtures."""

import os

import pytest
import torch


def pytest_runtest_setup(item: pytest.Item) -> None:
    """``@pytest.mark.requires_cuda``: a GPU variant, beside its CPU test, skipped without one."""
    if item.get_closest_marker("requires_cuda") and not torch.cuda.is_available():
        pytest.skip("needs CUDA")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _environment():
    """Undo what a test's in-process run sets in os.environ. W&B leaves WANDB_SERVICE
    there, the address of the service it started inside pytest: every later subprocess
    would inherit it and share that one service, which outlives a SIGKILLed run and keeps
    its run id in use."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture
def restore_registries():
    """Undo what a test registers (solvers, gradient modes, cores): the registries are
    global, and an entry left behind changes what later tests see (and what mutmut's
    workers, forked from a process that ran every test, see)."""
    from deqlab.core import CORES
    from deqlab.grad import GRAD_MODES
    from deqlab.solvers import SOLVERS

    saved = [
        (r, dict(r.entries), dict(r.lazy), dict(r.imported)) for r in (SOLVERS, GRAD_MODES, CORES)
    ]
    yield
    for registry, entries, lazy, imported in saved:
        for table, before in (
            (registry.entries, entries),
            (registry.lazy, lazy),
            (registry.imported, imported),
        ):
            table.clear()
            table.update(before)
