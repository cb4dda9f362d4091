"""Moved to :mod:`deqlab.solvers.solver_config` (SolverConfig); this path keeps working, with a
DeprecationWarning, until the next release."""

import sys
import warnings

import deqlab.solvers.solver_config as _moved

warnings.warn(
    "deqlab.solvers.config moved to deqlab.solvers.solver_config: import it from there",
    DeprecationWarning,
    stacklevel=2,
)
sys.modules[__name__] = _moved
