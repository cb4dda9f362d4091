"""Moved to :mod:`deqlab.reversible_grad` (the gradient of the reversible solver); this path keeps working, with a
DeprecationWarning, until the next release."""

import sys
import warnings

import deqlab.reversible_grad as _moved

warnings.warn(
    "deqlab.reversible moved to deqlab.reversible_grad: import it from there",
    DeprecationWarning,
    stacklevel=2,
)
sys.modules[__name__] = _moved
