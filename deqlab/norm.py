"""Weight and spectral normalization of a DEQ cell's weights, on ``torch.nn.utils.parametrize``.

Normalization keeps the cell's Lipschitz constant in check, which keeps the fixed point
well-posed and the solvers fast (Bai et al., 2019 use weight norm; Miyato et al., 2018 for
spectral norm). The normalized weight is a parametrization, so ``DEQ`` computes it once per
solve (``parametrize.cached``) rather than once per f evaluation, and nothing has to be reset
by hand between batches.

- ``weight_norm``: W = s * V / ||V||, the norm taken per output unit (Salimans & Kingma, 2016);
  s starts at ||V|| so the layer's function is unchanged at the moment of applying it.
- ``spectral_norm``: W = s * V / sigma(V), sigma by power iteration (one step per solve in
  training); s starts at 1.

The scale options have TorchDEQ's meaning (its ``norm_*`` arguments): ``no_scale`` fixes s at
``target_norm`` (so W has exactly that norm), ``clip`` caps the factor s / ||V|| (or
s / sigma) at ``clip_value``. deqlab adds ``learn_scale``: s a parameter (default) or a buffer
frozen at its initial value, which keeps the layer's function at the moment of applying it
(TorchDEQ has no such option: without a learned scale it renormalizes to ``target_norm``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.conv import _ConvNd, _ConvTransposeNd
from torch.nn.utils import parametrize

NORM_KINDS = ("none", "weight_norm", "spectral_norm")


@dataclass
class NormConfig:
    """Normalization settings (the ``norm`` config group)."""

    kind: str = "none"
    learn_scale: bool = True
    no_scale: bool = False
    target_norm: float = 1.0
    clip: bool = False
    clip_value: float = 1.0
    exclude: list[str] = field(default_factory=list)
    power_iters: int = 1

    def __post_init__(self) -> None:
        if self.kind not in NORM_KINDS:
            raise ValueError(f"unknown norm kind {self.kind!r}; choose one of {NORM_KINDS}")
        if not self.target_norm > 0 or not self.clip_value > 0:
            raise ValueError("norm.target_norm and norm.clip_value must be > 0")

    def scale_options(self) -> dict[str, object]:
        return {
            "learn_scale": self.learn_scale,
            "no_scale": self.no_scale,
            "target_norm": self.target_norm,
            "clip_value": self.clip_value if self.clip else None,
        }


def _out_dim(layer: nn.Module) -> int:
    # ConvTranspose stores weights as (in, out, ...): the output unit is dim 1.
    return 1 if isinstance(layer, _ConvTransposeNd) else 0


def _as_matrix(w: Tensor, out_dim: int) -> Tensor:
    return w.movedim(out_dim, 0).reshape(w.shape[out_dim], -1)


class _Scale(nn.Module):
    """The scale s of W = s V / n(V): learned, frozen, or fixed at ``target_norm``."""

    def __init__(
        self,
        init: Tensor,
        learn_scale: bool = True,
        no_scale: bool = False,
        target_norm: float = 1.0,
        clip_value: float | None = None,
    ):
        super().__init__()
        self.clip_value = clip_value
        if no_scale:
            self.register_buffer("scale", torch.full_like(init, target_norm))
        elif learn_scale:
            self.scale = nn.Parameter(init)
        else:
            self.register_buffer("scale", init)

    def factor(self, norm: Tensor) -> Tensor:
        """s / n(V), capped at ``clip_value`` when clipping."""
        factor = self.scale / norm
        return factor if self.clip_value is None else factor.clamp(max=self.clip_value)


class WeightNorm(_Scale):
    """W = s * V / ||V||, per output unit."""

    def __init__(self, weight: Tensor, out_dim: int, **scale: Any):
        self.out_dim = out_dim
        norm = self._norm(weight.detach())
        super().__init__(norm.clone(), **scale)

    def _norm(self, v: Tensor) -> Tensor:
        dims = [d for d in range(v.dim()) if d != self.out_dim]
        return torch.linalg.vector_norm(v, dim=dims, keepdim=True)

    def forward(self, v: Tensor) -> Tensor:
        return v * self.factor(self._norm(v))


class SpectralNorm(_Scale):
    """W = s * V / sigma(V), sigma estimated by power iteration on V as a matrix."""

    def __init__(
        self,
        weight: Tensor,
        out_dim: int,
        power_iters: int = 1,
        **scale: Any,
    ):
        super().__init__(weight.new_ones(()), **scale)
        self.out_dim, self.power_iters = out_dim, power_iters
        mat = _as_matrix(weight.detach(), out_dim)
        self.register_buffer("u", F.normalize(torch.randn(mat.shape[0], dtype=mat.dtype), dim=0))
        self.register_buffer("v", F.normalize(torch.randn(mat.shape[1], dtype=mat.dtype), dim=0))
        self._power(mat, 15)  # a good starting estimate

    def _power(self, mat: Tensor, iters: int) -> None:
        for _ in range(iters):
            self.v.copy_(F.normalize(mat.t() @ self.u, dim=0, eps=1e-12))
            self.u.copy_(F.normalize(mat @ self.v, dim=0, eps=1e-12))

    _power = torch.no_grad()(_power)  # the decorator, written out: see solvers/fixed_point.py

    def forward(self, w: Tensor) -> Tensor:
        mat = _as_matrix(w, self.out_dim)
        if self.training:
            self._power(mat, self.power_iters)
        # Clones: the next solve updates u and v in place while this graph may still need them.
        sigma = torch.dot(self.u.clone(), mat @ self.v.clone())
        return w * self.factor(sigma)


def _normalizable(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, _ConvNd))


def apply_norm(
    module: nn.Module,
    kind: str = "weight_norm",
    *,
    exclude: Iterable[str] = (),
    learn_scale: bool = True,
    no_scale: bool = False,
    target_norm: float = 1.0,
    clip: bool = False,
    clip_value: float = 1.0,
    power_iters: int = 1,
) -> nn.Module:
    """Normalize the weight of every Linear/Conv layer (subclasses included) in ``module``.

    ``exclude`` lists submodule names (qualified, as in ``named_modules``) whose layers,
    and their children, are left alone. ``kind="none"`` does nothing. The scale options are
    :class:`NormConfig`'s. Returns ``module``.
    """
    cfg = NormConfig(kind, learn_scale, no_scale, target_norm, clip, clip_value)  # validates
    scale = cfg.scale_options()
    if kind == "none":
        return module
    excluded = tuple(exclude)
    found = 0
    for name, layer in module.named_modules():
        if not _normalizable(layer) or any(name == e or name.startswith(e + ".") for e in excluded):
            continue
        if parametrize.is_parametrized(layer, "weight"):
            raise ValueError(f"layer {name!r} already has a weight parametrization")
        out_dim = _out_dim(layer)
        if kind == "weight_norm":
            p: nn.Module = WeightNorm(layer.weight, out_dim, **scale)
        else:
            p = SpectralNorm(layer.weight, out_dim, power_iters, **scale)
        parametrize.register_parametrization(layer, "weight", p)
        found += 1
    if found == 0:
        raise ValueError(
            f"apply_norm({kind!r}) found no Linear/Conv layer to normalize in "
            f"{type(module).__name__} (after exclude={list(excluded)})"
        )
    return module


def remove_norm(module: nn.Module) -> nn.Module:
    """Bake normalized weights back into plain parameters. Returns ``module``."""
    for layer in module.modules():
        if parametrize.is_parametrized(layer, "weight") and any(
            isinstance(p, (WeightNorm, SpectralNorm)) for p in layer.parametrizations["weight"]
        ):
            parametrize.remove_parametrizations(layer, "weight", leave_parametrized=True)
    return module


def weight_norm_entries(
    prefix: str, g: Tensor, v: Tensor, target: dict[str, Tensor]
) -> dict[str, Tensor]:
    """State-dict entries for the layer ``prefix`` from a weight-normalized pair w = g v / ||v||
    (per output unit: PyTorch's and the DEQ reference code's ``weight_norm``, dim 0).

    ``target`` is the receiving model's state dict: if it weight-normalizes the layer, v and g
    become its V and scale (the same parametrization, so gradients and optimizer steps match);
    otherwise the plain weight. Shapes follow ``target``.
    """
    original = f"{prefix}.parametrizations.weight.original"
    if original in target:
        scale = f"{prefix}.parametrizations.weight.0.scale"
        if scale not in target:
            raise ValueError(f"{prefix}: a weight-normalized weight cannot load into {original}")
        return {
            original: v.reshape(target[original].shape),
            scale: g.reshape(target[scale].shape),
        }
    norm = torch.linalg.vector_norm(v, dim=tuple(range(1, v.dim())), keepdim=True)
    weight = g.reshape(norm.shape) * v / norm
    return {f"{prefix}.weight": weight.reshape(target[f"{prefix}.weight"].shape)}


def weight_entries(prefix: str, w: Tensor, target: dict[str, Tensor]) -> dict[str, Tensor]:
    """State-dict entries for the layer ``prefix`` from a plain weight ``w``: the weight, or,
    if ``target`` weight-normalizes the layer, V = w with scale ||w|| (the same function)."""
    if f"{prefix}.parametrizations.weight.original" in target:
        norm = torch.linalg.vector_norm(w, dim=tuple(range(1, w.dim())), keepdim=True)
        return weight_norm_entries(prefix, norm, w, target)
    return {f"{prefix}.weight": w.reshape(target[f"{prefix}.weight"].shape)}
