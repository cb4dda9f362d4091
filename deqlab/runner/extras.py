"""What a run does around its work (the ``extras`` config node): silence library warnings,
pin the CPU thread count, require tags on a sweep (lightning-hydra-template's extras)."""

from __future__ import annotations

import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, open_dict, read_write

from ..grad import DivergenceWarning


@dataclass
class ExtrasConfig:
    """ignore_warnings: silence Python warnings for the run, but DivergenceWarning (a diverging
    solve is never hidden). enforce_tags: a sweep without ``tags`` asks for them at the
    terminal, or fails before its first job when no one can answer (a batch job)."""

    ignore_warnings: bool = False
    enforce_tags: bool = False
    num_threads: int | None = None  # torch's CPU threads (debug=default: 1); None: torch's

    def __post_init__(self) -> None:
        if self.num_threads is not None and self.num_threads < 1:
            raise ValueError(f"extras.num_threads must be >= 1 or null, got {self.num_threads}")


@contextmanager
def run_extras(extras: ExtrasConfig | DictConfig) -> Iterator[None]:
    """Within the block, warnings are shown as usual or, with ``ignore_warnings``, dropped
    (all but :class:`~deqlab.grad.DivergenceWarning`), and torch computes on ``num_threads``
    CPU threads; the caller's filters and thread count come back after."""
    threads = torch.get_num_threads()
    with warnings.catch_warnings():
        if extras.ignore_warnings:
            warnings.simplefilter("ignore")
            warnings.simplefilter("default", DivergenceWarning)
        if extras.num_threads:
            torch.set_num_threads(extras.num_threads)
        try:
            yield
        finally:
            torch.set_num_threads(threads)


class EnforceTags(Callback):
    """Hydra callback (``hydra.callbacks.tags``): before a sweep's first job, make sure the
    sweep has ``tags`` when ``extras.enforce_tags`` is set. Tags typed at the prompt are added
    to the sweep's overrides (``tags=[a,b]``), so every job records them; without a terminal
    the command exits with status 1 before any job starts."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        if not config.extras.enforce_tags or config.tags:
            return
        if not sys.stdin.isatty():
            # SystemExit: Hydra turns a callback's exceptions into warnings and sweeps on
            raise SystemExit(
                "deqlab: extras.enforce_tags: this sweep has no tags and nobody to ask for "
                "them: pass tags=[what,it,is,for] (or extras.enforce_tags=false)"
            )
        tags: list[str] = []
        while not tags:
            answer = input("deqlab: tags for this sweep (comma-separated): ")
            tags = [t.strip() for t in answer.split(",") if t.strip()]
        quoted = ",".join("'" + t.replace("\\", "\\\\").replace("'", "\\'") + "'" for t in tags)
        overrides = config.hydra.overrides.task
        with read_write(overrides), open_dict(overrides):
            overrides.append(f"tags=[{quoted}]")
