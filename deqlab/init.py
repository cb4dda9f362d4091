"""Initial states z0 for the solve."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def zeros_init(shape: Sequence[int], *, device=None, dtype=None) -> Tensor:
    return torch.zeros(*shape, device=device, dtype=dtype)


def mixed_init(shape: Sequence[int], *, device=None, dtype=None) -> Tensor:
    """Each entry N(0, 1) with probability 1/2, else 0 (TorchDEQ's ``mixed_init``): a random
    start that exercises the solver on states it will not see from zeros."""
    z = torch.randn(*shape, device=device, dtype=dtype)
    return z * torch.empty_like(z).bernoulli_(0.5)
