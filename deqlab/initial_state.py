"""Initial states z0 for the solve (the ``init`` config group)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .state import State, as_tuple, like


def zeros_init(shape: Sequence[int], *, device=None, dtype=None) -> Tensor:
    return torch.zeros(*shape, device=device, dtype=dtype)


def mixed_init(shape: Sequence[int], *, device=None, dtype=None) -> Tensor:
    """Each entry N(0, 1) with probability 1/2, else 0 (TorchDEQ's ``mixed_init``): a random
    start that exercises the solver on states it will not see from zeros."""
    z = torch.randn(*shape, device=device, dtype=dtype)
    return z * torch.empty_like(z).bernoulli_(0.5)


INITIAL_STATES = {"zeros": zeros_init, "mixed": mixed_init}


# ``net``: the start the network's ``inject`` returns, as it is (an inverse problem's A^T y)
NAMES = (*INITIAL_STATES, "net")


@dataclass
class InitConfig:
    """Where each solve starts (the ``init`` config group): ``zeros``, ``mixed``, or ``net``
    (the state the network's ``inject`` returns, values included)."""

    name: str = "zeros"

    def __post_init__(self) -> None:
        if self.name not in NAMES:
            raise ValueError(f"init.name must be one of {sorted(NAMES)}, got {self.name!r}")

    def like(self, z0: State) -> State:
        """A start with the structure, shapes, dtype and device of ``z0`` (``net``: z0)."""
        if self.name == "net":
            return z0
        make = INITIAL_STATES[self.name]
        return like(z0, [make(p.shape, device=p.device, dtype=p.dtype) for p in as_tuple(z0)])
