"""Warm starts carried across training (``init=cached``): each training sample's solve starts
from that sample's equilibrium of the last time it was seen.

When the inputs recur (an implicit representation sees the same coordinates every step; a
classifier sees each image once an epoch) and the weights move little between visits, the old
equilibrium is close to the new one, and the solve needs few steps from it (Huang, Bai and
Kolter, NeurIPS 2021, "(Implicit)^2: Implicit Layers for Implicit Representations", Sec. 3).

:class:`WarmStarts` keeps one row per sample index, for each tensor of the state, in a tensor
that grows to the largest index seen (on the CPU or on the model's device), bounded by
``max_gb``. It is saved in checkpoints with what it depends on (the state's per-sample shapes
and dtype, the data set's size), and a stored cache that no longer matches is dropped with a
warning rather than read.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor

from .state import State, as_tuple, like


class WarmStartError(ValueError):
    """A cache the run cannot use, named with the fix."""


def _signature(z: State) -> list[tuple[tuple[int, ...], str]]:
    return [(tuple(p.shape[1:]), str(p.dtype)) for p in as_tuple(z)]


class WarmStarts:
    """Each sample's last equilibrium, by its index in the training set.

    Args:
        storage: ``cpu`` (host memory) or ``device`` (beside the model: no copies per step).
        max_gb: refuse to grow beyond this many gigabytes.
    """

    def __init__(self, storage: str = "cpu", max_gb: float = 2.0):
        if storage not in ("cpu", "device"):
            raise WarmStartError(f"init.storage={storage!r}: one of 'cpu', 'device'")
        self.storage, self.max_gb = storage, max_gb
        self.parts: list[Tensor] = []
        self.seen = torch.zeros(0, dtype=torch.bool)
        self.signature: list[tuple[tuple[int, ...], str]] | None = None
        self.data_size: int | None = None
        self.hits = self.misses = 0  # since the last read_counts()

    def bind(self, data_size: int) -> None:
        """The training set's size: a cache filled on another data set is dropped."""
        if self.data_size is not None and self.data_size != data_size and self.parts:
            warnings.warn(
                f"init=cached: the cache was filled on {self.data_size} training samples, the "
                f"data now has {data_size}; starting with an empty cache",
                stacklevel=2,
            )
            self.clear()
        self.data_size = data_size

    def clear(self) -> None:
        self.parts, self.seen, self.signature = [], torch.zeros(0, dtype=torch.bool), None

    def read(self, keys: Tensor, z0: State) -> State:
        """z0 with each sample seen before replaced by its stored equilibrium; a negative key
        marks a sample never cached (a language model's shorter last segment)."""
        if not bool((keys >= 0).any()):
            self.misses += len(keys)
            return z0
        if self.signature is not None and self.signature != _signature(z0):
            raise WarmStartError(
                f"init=cached: the cache holds states {self.signature}, the model now gives "
                f"{_signature(z0)}; a run whose state shape changed cannot use its old cache"
            )
        if not self.parts:
            self.misses += len(keys)
            return z0
        keys = keys.long().to(self.seen.device)
        inside = keys < len(self.seen)
        inside &= keys >= 0
        known = torch.zeros_like(inside)
        known[inside] = self.seen[keys[inside]]
        self.hits += int(known.sum())
        self.misses += len(keys) - int(known.sum())
        if not bool(known.any()):
            return z0
        rows = keys[known]
        out = []
        for part, start in zip(self.parts, as_tuple(z0)):
            start = start.clone()
            start[known.to(start.device)] = part[rows].to(start.device, start.dtype)
            out.append(start)
        return like(z0, out)

    def write(self, keys: Tensor, z: State) -> None:
        """Store the equilibria ``z`` (detached) of the samples ``keys`` (but negative ones)."""
        keep = keys >= 0
        if not bool(keep.any()):
            return
        if not bool(keep.all()):
            z = like(z, [p[keep.to(p.device)] for p in as_tuple(z)])
            keys = keys[keep]
        parts = [p.detach() for p in as_tuple(z)]
        if self.signature is None:
            self.signature = _signature(z)
        self._grow(int(keys.max()) + 1, parts)
        rows = keys.long().to(self.seen.device)
        for store, p in zip(self.parts, parts):
            store[rows] = p.to(store.device)
        self.seen[rows] = True

    def _grow(self, needed: int, parts: list[Tensor]) -> None:
        if needed <= len(self.seen):
            return
        capacity = max(needed, 2 * len(self.seen))
        if self.data_size is not None:
            capacity = max(needed, min(capacity, self.data_size))
        row_bytes = sum(p[0].numel() * p.element_size() for p in parts)
        if capacity * row_bytes > self.max_gb * 2**30:
            raise WarmStartError(
                f"init=cached: {capacity} samples of {row_bytes} bytes need "
                f"{capacity * row_bytes / 2**30:.2f} GB, above init.max_gb={self.max_gb}; raise "
                "it, or use init.storage=cpu for host memory"
            )
        device = parts[0].device if self.storage == "device" else torch.device("cpu")
        grown = []
        for i, p in enumerate(parts):
            new = torch.zeros(capacity, *p.shape[1:], dtype=p.dtype, device=device)
            if self.parts:
                new[: len(self.seen)] = self.parts[i]
            grown.append(new)
        seen = torch.zeros(capacity, dtype=torch.bool, device=device)
        seen[: len(self.seen)] = self.seen.to(device)
        self.parts, self.seen = grown, seen

    def read_counts(self) -> tuple[int, int]:
        """(samples started warm, samples started cold) since the last call."""
        counts, (self.hits, self.misses) = (self.hits, self.misses), (0, 0)
        return counts

    def state_dict(self) -> dict[str, Any]:
        return {
            "parts": [p.cpu() for p in self.parts],
            "seen": self.seen.cpu(),
            "signature": self.signature,
            "data_size": self.data_size,
        }

    def load_state_dict(self, state: dict[str, Any], device: torch.device) -> None:
        where = device if self.storage == "device" else torch.device("cpu")
        self.parts = [p.to(where) for p in state["parts"]]
        self.seen = state["seen"].to(where)
        self.signature = [(tuple(s), d) for s, d in state["signature"] or []] or None
        self.data_size = state["data_size"]
