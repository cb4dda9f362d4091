"""Refusals: a run or a command that cannot start, with a message that says why and what to do.

Every error of this kind derives from :class:`Refusal` (besides its usual base: a
``ConfigError`` is still a ``ValueError``). The commands print its message alone, as
``deqlab: <message>``, and exit with status 1: no traceback around it. Inside a sweep it is
raised as any error, so the sweep records the job as failed and goes on.
"""

from __future__ import annotations

import sys
from typing import NoReturn


class Refusal(Exception):
    """Raised before any work is done (or on a missing input), with the fix in its message."""


class InputNotFound(Refusal, FileNotFoundError):
    """An input (a task's data, a run's config, a sweep folder) is not where the command
    looks; the message names the place and the fix."""


def refusal_in(error: BaseException) -> Refusal | None:
    """``error`` if it is a refusal, else the refusal it was raised from (Hydra's instantiate
    wraps what a constructor raises), else None."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, Refusal):
            return seen
        seen = seen.__cause__
    return None


def refuse(error: Refusal) -> NoReturn:
    """Print ``deqlab: <message>`` on stderr and exit with status 1."""
    print(f"deqlab: {error}", file=sys.stderr)
    sys.exit(1)
