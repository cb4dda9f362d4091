"""Variational dropout for DEQ cells (Gal & Ghahramani, 2016; as used by Bai et al., 2019).

A fixed point only exists if f is the same function at every iteration, so the dropout mask
is drawn once per batch and held through the whole solve and the backward pass. A layer keeps
one mask per input shape, dtype and device, each at a fixed address: the first call with an
input of a new kind draws its mask, and ``reset_dropout`` (once per batch) draws every kept
mask anew, in place. A solve replayed from CUDA graphs (``solver.capture``, ``grad.capture``)
reads the masks at those addresses, so it sees each batch's masks as an eager solve does. The
masks follow the layer's ``.to()``; :func:`mask_kinds` and :func:`restore_mask_kinds` carry
which kinds exist through a checkpoint, so a resumed run redraws the same masks in the same
order as the run it continues.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

# what a kept mask is for: the input's mask shape, dtype and device
Kind = tuple[tuple[int, ...], torch.dtype, torch.device]


class VariationalDropout(nn.Module):
    """Dropout with a mask held fixed until ``reset()``.

    ``shared_dims`` are the input dimensions along which one mask value is shared (e.g.
    ``(2, 3)`` drops whole channels of an image). Identity in eval mode or when p == 0.
    """

    shared_dims: tuple[int, ...] = ()

    def __init__(self, p: float = 0.0, shared_dims: tuple[int, ...] | None = None):
        super().__init__()
        if not 0 <= p < 1:
            raise ValueError(f"dropout probability must lie in [0, 1), got {p}")
        self.p = p
        if shared_dims is not None:
            self.shared_dims = tuple(shared_dims)
        self.masks: dict[Kind, Tensor] = {}  # one per kind of input, at a fixed address
        self.mask: Tensor | None = None  # the latest call's

    def reset(self) -> None:
        """Draw every kept mask anew, in place (the next batch's masks)."""
        for m in self.masks.values():
            self._draw(m)

    def _draw(self, m: Tensor) -> Tensor:
        keep = 1.0 - self.p
        return m.bernoulli_(keep).div_(keep)

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> nn.Module:
        # .to(), .cuda(), .double() move and cast the kept masks too (plain attributes,
        # not buffers, so that state dicts stay as they were)
        moved = [fn(m) for m in self.masks.values()]
        self.masks = {(tuple(m.shape), m.dtype, m.device): m for m in moved}
        self.mask = None
        return super()._apply(fn, recurse)

    def _mask_shape(self, x: Tensor) -> list[int]:
        shape = list(x.shape)
        for d in self.shared_dims:
            if d >= x.dim():
                raise ValueError(
                    f"{type(self).__name__} shares its mask over dim {d}, but the input has "
                    f"shape {tuple(x.shape)}"
                )
            shape[d] = 1
        return shape

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0:
            return x
        kind = (tuple(self._mask_shape(x)), x.dtype, x.device)
        m = self.masks.get(kind)
        if m is None:
            m = self.masks[kind] = self._draw(torch.empty(kind[0], dtype=x.dtype, device=x.device))
        self.mask = m
        return x * m

    def extra_repr(self) -> str:
        return f"p={self.p}, shared_dims={self.shared_dims}"


class VariationalDropout1d(VariationalDropout):
    """Drops whole channels of (B, C, L) inputs."""

    shared_dims = (2,)


class VariationalDropout2d(VariationalDropout):
    """Drops whole channels of (B, C, H, W) inputs."""

    shared_dims = (2, 3)


class VariationalDropout3d(VariationalDropout):
    """Drops whole channels of (B, C, D, H, W) inputs."""

    shared_dims = (2, 3, 4)


class VariationalTokenDropout(VariationalDropout):
    """Drops whole tokens of (B, T, D) inputs (one mask value per token, shared over D)."""

    shared_dims = (2,)


def reset_dropout(module: nn.Module) -> None:
    """Draw every variational dropout mask in ``module`` anew (call once per batch)."""
    for m in module.modules():
        if isinstance(m, VariationalDropout):
            m.reset()


def mask_kinds(module: nn.Module) -> dict[str, list[tuple[list[int], str]]]:
    """Which masks each variational dropout layer of ``module`` keeps (shape and dtype, in the
    order they are redrawn), for a checkpoint."""
    return {
        name: [(list(shape), str(dtype).removeprefix("torch.")) for shape, dtype, _ in m.masks]
        for name, m in module.named_modules()
        if isinstance(m, VariationalDropout) and m.masks
    }


def restore_mask_kinds(
    module: nn.Module, kinds: dict[str, Any], device: torch.device | str = "cpu"
) -> None:
    """Allocate the masks :func:`mask_kinds` listed, on ``device`` (the next ``reset_dropout``
    draws them), so that a resumed run redraws what the run it continues redraws."""
    layers = dict(module.named_modules())
    for name, listed in kinds.items():
        layer = layers.get(name)
        if not isinstance(layer, VariationalDropout):
            continue  # a checkpoint of another network is refused elsewhere, by name
        for shape, dtype in listed:
            mask = torch.empty(shape, dtype=getattr(torch, dtype), device=device)
            layer.masks[(tuple(shape), mask.dtype, mask.device)] = mask
