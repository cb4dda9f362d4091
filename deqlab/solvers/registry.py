"""Moved to :mod:`deqlab.solvers.catalog` (the solver names and options); this path keeps working, with a
DeprecationWarning, until the next release."""

import sys
import warnings

import deqlab.solvers.catalog as _moved

warnings.warn(
    "deqlab.solvers.registry moved to deqlab.solvers.catalog: import it from there",
    DeprecationWarning,
    stacklevel=2,
)
sys.modules[__name__] = _moved
