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

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.conv import _ConvNd, _ConvTransposeNd
from torch.nn.utils import parametrize

from .registry import Registry


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
        if self.kind != "none":
            NORMS.get(self.kind)  # raises for an unknown kind, naming the registered ones
        if not self.target_norm > 0 or not self.clip_value > 0:
            raise ValueError("norm.target_norm and norm.clip_value must be > 0")

    def scale_options(self) -> dict[str, object]:
        return {
            "learn_scale": self.learn_scale,
            "no_scale": self.no_scale,
            "target_norm": self.target_norm,
            "clip_value": self.clip_value if self.clip else None,
        }


# Which parameters of a layer are normalized, and the dimension of each that indexes output
# units: a class's own entry or its nearest base class's (register_norm_module adds more).
NORM_MODULES: dict[type, tuple[tuple[str, ...], tuple[int, ...]]] = {
    nn.Linear: (("weight",), (0,)),
    _ConvNd: (("weight",), (0,)),
    _ConvTransposeNd: (("weight",), (1,)),  # stored as (in, out, ...)
}


def register_norm_module(
    cls: type, names: str | Sequence[str] = "weight", dims: int | Sequence[int] = 0
) -> None:
    """Normalize other layers' parameters too (TorchDEQ's ``register_norm_module``, for every
    norm kind at once), e.g. ``register_norm_module(nn.MultiheadAttention, "in_proj_weight")``.

    Args:
        cls: the layer class; :func:`apply_norm` normalizes its subclasses too.
        names: the parameters to normalize.
        dims: the dimension of each parameter's output units (one for all, or one each).
    """
    names = (names,) if isinstance(names, str) else tuple(names)
    dims = (dims,) * len(names) if isinstance(dims, int) else tuple(dims)
    if not isinstance(cls, type) or not issubclass(cls, nn.Module):
        raise TypeError(f"register_norm_module: {cls!r} is not an nn.Module class")
    if not names or len(dims) != len(names):
        raise ValueError(
            f"register_norm_module: one dim per parameter name, got names={list(names)} "
            f"and dims={list(dims)}"
        )
    NORM_MODULES[cls] = (names, dims)


def _norm_targets(layer: nn.Module) -> list[tuple[str, int]]:
    """The (parameter, output dim) pairs of ``layer`` to normalize (none if unregistered)."""
    for cls in type(layer).__mro__:
        if cls in NORM_MODULES:
            names, dims = NORM_MODULES[cls]
            return [
                (n, d) for n, d in zip(names, dims) if isinstance(getattr(layer, n, None), Tensor)
            ]
    return []


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


def project_rows_l1(w: Tensor, radius: float | Tensor) -> Tensor:
    """Each row of the matrix ``w`` projected (Euclidean) onto the L1 ball of ``radius``: the
    projection of ``w`` onto {||W||_inf <= radius}, whose rows are independent (Duchi et al.,
    2008, the sort-based algorithm; the IGNN code's ``projection_norm_inf``). Rows inside the
    ball are kept exactly."""
    a = w.abs()
    inside = a.sum(1, keepdim=True) <= radius
    sorted_abs = a.sort(dim=1, descending=True).values
    cumulative = sorted_abs.cumsum(1) - radius
    k = torch.arange(1, w.shape[1] + 1, device=w.device, dtype=w.dtype)
    # the largest k with sorted_abs[k-1] > (cumsum_k - radius) / k sets the threshold
    support = (sorted_abs * k > cumulative).sum(1, keepdim=True).clamp(min=1)
    theta = cumulative.gather(1, support - 1) / support.to(w.dtype)
    projected = w.sign() * (a - theta).clamp(min=0)
    return torch.where(inside, w, projected)


class InfNormBall(nn.Module):
    """Keeps W in {||W||_inf <= radius}, radius = ``target_norm / bound``: IGNN's well-posedness
    condition (Gu et al., 2020), with ``bound`` the Perron-Frobenius eigenvalue of the graph's
    |A| (:func:`set_norm_bound`), so that f(Z) = relu(A^T Z W^T + B) is a contraction.

    As the IGNN code does, the weight itself is projected (in place, without a gradient) when it
    has left the ball, before it is used: projected gradient descent, not a reparametrization.
    The weight's rows are its output units."""

    def __init__(self, weight: Tensor, out_dim: int, target_norm: float = 1.0):
        super().__init__()
        if weight.dim() != 2 or out_dim != 0:
            raise ValueError(
                f"inf_ball projects a matrix by its rows (output units first), got a weight of "
                f"shape {tuple(weight.shape)} with output dim {out_dim}"
            )
        self.target_norm = target_norm
        self.register_buffer("bound", torch.ones((), dtype=weight.dtype))

    def radius(self) -> Tensor:
        return self.target_norm / self.bound

    def forward(self, w: Tensor) -> Tensor:
        radius = self.radius()
        # a projected row sums to the radius up to rounding: only a row beyond that is outside
        # (else each use would project again, and bump the version autograd saved)
        slack = 1 + 16 * torch.finfo(w.dtype).eps
        if bool((w.detach().abs().sum(1) > radius * slack).any()):
            with torch.no_grad():
                w.copy_(project_rows_l1(w, radius))
        return w


def set_norm_bound(module: nn.Module, bound: float | Tensor) -> int:
    """Set the ``bound`` of every :class:`InfNormBall` in ``module`` (a graph's
    Perron-Frobenius eigenvalue); returns how many were set."""
    found = 0
    for m in module.modules():
        if isinstance(m, InfNormBall):
            m.bound.fill_(float(bound))
            found += 1
    return found


# A norm kind builds the parametrization of one weight: (weight, out_dim, NormConfig) -> module.
NormFactory = Callable[[Tensor, int, NormConfig], nn.Module]


def _check_factory(name: str, make: Any) -> None:
    if not callable(make):
        raise TypeError(f"norm {name!r} must be callable (weight, out_dim, NormConfig) -> module")


NORMS: Registry[NormFactory] = Registry(
    "norm kind", "add your own with deqlab.register_norm", _check_factory
)


def register_norm(name: str, make: NormFactory) -> NormFactory:
    """Make ``make`` available as ``norm.kind=<name>`` / ``apply_norm(m, name)`` (TorchDEQ's
    ``register_norm``).

    Args:
        name: the kind's name.
        make: builds the parametrization of one weight from (weight, output dim,
            :class:`NormConfig`), as :class:`WeightNorm` and :class:`SpectralNorm` are built.

    Returns:
        ``make``.
    """
    return NORMS.register(name, make)


register_norm("weight_norm", lambda w, out_dim, cfg: WeightNorm(w, out_dim, **cfg.scale_options()))
register_norm(
    "spectral_norm",
    lambda w, out_dim, cfg: SpectralNorm(w, out_dim, cfg.power_iters, **cfg.scale_options()),
)
register_norm("inf_ball", lambda w, out_dim, cfg: InfNormBall(w, out_dim, cfg.target_norm))


def _excluded(name: str, patterns: Sequence[str]) -> bool:
    """``name`` is, or lies inside, a module that a pattern names (fnmatch: ``*``, ``?``)."""
    return any(fnmatchcase(name, p) or fnmatchcase(name, p + ".*") for p in patterns)


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
    """Normalize the weight of every Linear/Conv layer (subclasses included) in ``module``, and
    the parameters :func:`register_norm_module` names for other layers, as parametrizations
    (``torch.nn.utils.parametrize``; :func:`remove_norm` bakes them back).

    Args:
        module: the cell (or any module) to normalize, in place.
        kind: ``weight_norm`` (w = g v / ||v||, per output unit), ``spectral_norm``
            (w / sigma_max(w), by power iteration), ``none``, or a kind added with
            :func:`register_norm`.
        exclude: submodule names (qualified, as in ``named_modules``) or fnmatch patterns
            (``"*.attn"``, ``"head*"``) whose layers, and their children, are left alone.
        learn_scale: the scale s of w = s v / n(v) is a parameter, starting at n(v) (the
            weight unchanged); else a frozen buffer at that value.
        no_scale: s is fixed at ``target_norm`` instead.
        target_norm: the fixed scale under ``no_scale``.
        clip: cap the factor s / n(v) at ``clip_value``.
        clip_value: the cap of ``clip``.
        power_iters: power-method iterations per training forward (``spectral_norm``).

    Returns:
        ``module``.

    Example:
        >>> cell = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Tanh())
        >>> _ = apply_norm(cell, "spectral_norm")
        >>> bool(torch.linalg.matrix_norm(cell[0].weight, 2) <= 1.0 + 1e-3)
        True
    """
    cfg = NormConfig(
        kind, learn_scale, no_scale, target_norm, clip, clip_value, list(exclude), power_iters
    )  # validates
    if kind == "none":
        return module
    make = NORMS.get(kind)
    found = 0
    for name, layer in module.named_modules():
        if _excluded(name, cfg.exclude):
            continue
        for param, out_dim in _norm_targets(layer):
            if parametrize.is_parametrized(layer, param):
                raise ValueError(f"layer {name!r} already has a {param} parametrization")
            p = make(getattr(layer, param), out_dim, cfg)
            p._deqlab_norm = True  # what remove_norm takes off again
            parametrize.register_parametrization(layer, param, p)
            found += 1
    if found == 0:
        raise ValueError(
            f"apply_norm({kind!r}) found no Linear/Conv layer to normalize in "
            f"{type(module).__name__} (after exclude={cfg.exclude}; other layers: "
            "deqlab.register_norm_module)"
        )
    return module


def remove_norm(module: nn.Module) -> nn.Module:
    """Bake normalized weights back into plain parameters. Returns ``module``."""
    for layer in module.modules():
        if not parametrize.is_parametrized(layer):
            continue
        for param, chain in list(layer.parametrizations.items()):
            if any(getattr(p, "_deqlab_norm", False) for p in chain):
                parametrize.remove_parametrizations(layer, param, leave_parametrized=True)
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
