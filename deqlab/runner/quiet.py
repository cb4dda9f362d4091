"""Commands that print what the user acts on: Lightning's notes about its own machinery,
which a command that only evaluates a checkpoint cannot act on, are left out."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

# Notes Lightning gives when it restores a checkpoint into a Trainer built for evaluation:
# the training run's callbacks are not there (on purpose), its checkpoint folder is elsewhere,
# and a deprecation inside Lightning itself.
NOTES = (
    r"Be aware that when using `ckpt_path`, callbacks used to create the checkpoint",
    r"The dirpath has changed from",
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",
)
LOGGERS = ("lightning.pytorch", "lightning.fabric")


@contextmanager
def quiet_lightning() -> Iterator[None]:
    """Inside: Lightning's info lines (accelerators found, tips, checkpoint restored) and the
    notes in :data:`NOTES` are not shown; its warnings about anything else still are."""
    levels = {name: logging.getLogger(name).level for name in LOGGERS}
    with warnings.catch_warnings():
        for note in NOTES:
            warnings.filterwarnings("ignore", message=note)
        try:
            for name in LOGGERS:
                logging.getLogger(name).setLevel(logging.WARNING)
            yield
        finally:
            for name, level in levels.items():
                logging.getLogger(name).setLevel(level)
