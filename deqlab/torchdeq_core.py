"""Moved to :mod:`deqlab.compat.torchdeq` (a compatibility layer); this path keeps working, with a
DeprecationWarning, until the next release."""

import sys
import warnings

import deqlab.compat.torchdeq as _moved

warnings.warn(
    "deqlab.torchdeq_core moved to deqlab.compat.torchdeq: import it from there",
    DeprecationWarning,
    stacklevel=2,
)
sys.modules[__name__] = _moved
