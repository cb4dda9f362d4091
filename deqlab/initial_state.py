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


# ``net``: the start the network's ``inject`` returns, as it is (an inverse problem's A^T y);
# ``cached``: in training, each sample's last equilibrium (deqlab/warm_start.py);
# ``learned``: the network's prediction of z* from its input injection (``predict_start``)
NAMES = (*INITIAL_STATES, "net", "cached", "learned")


@dataclass
class InitConfig:
    """Where each solve starts (the ``init`` config group): ``zeros``, ``mixed``, ``net``
    (the state the network's ``inject`` returns, values included), or ``cached``: in
    training, each sample's equilibrium from the last time it was trained on, ``base`` for a
    sample not seen yet and in evaluation; kept in ``storage`` (``cpu`` or ``device``) up to
    ``max_gb`` (:class:`~deqlab.warm_start.WarmStarts`); or ``learned``: the network's own
    prediction of z* from its input injection (its ``predict_start(u)``), trained jointly by
    an auxiliary loss ``weight`` * mean (z0 - z*)^2 toward the equilibrium it reached (as the
    learned or skip initializations of Pal et al., 2022)."""

    name: str = "zeros"
    base: str = "zeros"
    storage: str = "cpu"
    max_gb: float = 2.0
    weight: float = 1.0

    def __post_init__(self) -> None:
        if self.name not in NAMES:
            raise ValueError(f"init.name must be one of {sorted(NAMES)}, got {self.name!r}")
        if self.base not in NAMES or self.base in ("cached", "learned"):
            bases = sorted(set(NAMES) - {"cached", "learned"})
            raise ValueError(f"init.base must be one of {bases}, got {self.base!r}")
        if not self.weight >= 0:
            raise ValueError(f"init.weight must be >= 0, got {self.weight}")

    def like(self, z0: State) -> State:
        """A start with the structure, shapes, dtype and device of ``z0`` (``net``: z0;
        ``cached``: its ``base``, which the cache then overwrites for the samples it has)."""
        name = self.base if self.name == "cached" else self.name
        if name in ("net", "learned"):  # learned: z0 is already the prediction
            return z0
        make = INITIAL_STATES[name]
        return like(z0, [make(p.shape, device=p.device, dtype=p.dtype) for p in as_tuple(z0)])
