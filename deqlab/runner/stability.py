"""The stability monitor: how the equilibrium behaves over a whole validation split, every
validation, and a warning when it drifts towards instability.

Per sample it keeps the relative residual the solve ended at, the solver steps it took (to
its convergence, or the whole budget), and, with ``fit.sradius_iters`` > 0, the spectral
radius of J_f at z* (power method). Logged under ``deq/`` (``deq/val_unstable_share``: the share
of samples ending above ``fit.unstable_above``; ``deq/val_steps_p50`` / ``_p90`` / ``_max``;
``deq/val_sradius_p50`` / ``_p90`` / ``_max``), with the figure ``deq/stability``
(their histograms). A share that rises at ``fit.unstable_patience`` validations in a row
raises a :class:`deqlab.grad.DivergenceWarning` naming the figure and the usual cures.
"""

from __future__ import annotations

import itertools
import warnings
from typing import TYPE_CHECKING, Any

import matplotlib

matplotlib.use("Agg")  # headless, as deqlab.runner.loggers
import matplotlib.pyplot as plt
import numpy as np
import torch
from torch import Tensor

from ..core import DEQInfo
from ..grad import DivergenceWarning
from .loggers import log_figure

if TYPE_CHECKING:  # the module owns a StabilityMonitor and hands itself in
    from .module import DEQLitModule


def sample_steps(info: DEQInfo) -> Tensor:
    """Solver steps each sample took: to the step it converged at, else the whole solve."""
    whole = torch.full_like(info.best_step, info.trace.shape[0])
    return torch.where(info.converged, info.best_step + 1, whole)


class SplitStability:
    """Per-sample figures gathered over one evaluation pass."""

    def __init__(self) -> None:
        self.rel: list[Tensor] = []
        self.steps: list[Tensor] = []
        self.sradius: list[Tensor] = []

    def update(self, info: DEQInfo) -> None:
        self.rel.append(info.rel_residual.detach().float())
        self.steps.append(sample_steps(info).float())
        if info.sradius is not None:
            self.sradius.append(info.sradius.detach().float())

    def tensors(self) -> dict[str, Tensor]:
        out = {"rel_residual": torch.cat(self.rel), "steps": torch.cat(self.steps)}
        if self.sradius:
            out["sradius"] = torch.cat(self.sradius)
        return out


def summarize(values: dict[str, Tensor], unstable_above: float) -> dict[str, float]:
    """The logged figures of one split's per-sample values."""
    out = {"unstable_share": float((values["rel_residual"] > unstable_above).float().mean())}
    for name in ("steps", "sradius"):
        if name in values:
            v = values[name].double()
            out[f"{name}_p50"] = float(v.quantile(0.5))
            out[f"{name}_p90"] = float(v.quantile(0.9))
            out[f"{name}_max"] = float(v.max())
    return out


def rising(history: list[float], patience: int) -> bool:
    """Whether the last ``patience`` values each rose above the one before."""
    if patience < 1 or len(history) <= patience:
        return False
    recent = history[-patience - 1 :]
    return all(b > a for a, b in itertools.pairwise(recent))


def warn_rising(history: list[float], patience: int, unstable_above: float) -> None:
    shares = " -> ".join(f"{s:.1%}" for s in history[-patience - 1 :])
    warnings.warn(
        f"deq/val_unstable_share rose at {patience} validations in a row ({shares} of the "
        f"samples end above relative residual {unstable_above:g}; see the deq/stability figure): "
        "the equilibrium is drifting towards instability. Usual cures: Jacobian "
        "regularization (jac_reg=hutchinson), weight normalization (norm=weight_norm), a "
        "smaller learning rate, a larger solver budget, or solver.fallback=[broyden].",
        DivergenceWarning,
        stacklevel=2,
    )


def stability_figure(values: dict[str, Tensor], unstable_above: float, epoch: int) -> plt.Figure:
    """Histograms of the per-sample relative residual, steps and spectral radius."""
    names = [n for n in ("rel_residual", "steps", "sradius") if n in values]
    fig, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 3.2), dpi=100)
    for ax, name in zip(np.atleast_1d(axes), names):
        v = values[name].double().numpy()
        if name == "rel_residual":
            ax.hist(np.log10(np.maximum(v, 1e-12)), bins=30)
            ax.axvline(np.log10(unstable_above), color="red", lw=1)
            ax.set_xlabel("log10 relative residual at the end")
        else:
            ax.hist(v, bins=30)
            ax.set_xlabel("solver steps" if name == "steps" else "spectral radius of J_f at z*")
        ax.set_ylabel("samples")
    fig.suptitle(f"equilibrium over the validation split, epoch {epoch}", fontsize=9)
    fig.tight_layout()
    return fig


class StabilityMonitor:
    """The monitor over validations; owned by the module. ``jac_reg.adaptive``'s multiplier of
    the scheduled Jacobian weight lives here, as it follows the unstable share. Its history and
    the multiplier travel in the checkpoint."""

    def __init__(self) -> None:
        self.split: SplitStability | None = None  # this validation's per-sample figures
        self.history: list[float] = []  # deq/val_unstable_share, validation by validation
        self.jac_multiplier = 1.0

    def update(self, info: DEQInfo) -> None:
        if self.split is None:
            self.split = SplitStability()
        self.split.update(info)

    def end_validation(self, module: DEQLitModule) -> None:
        """Log the figures over the whole validation split (all processes' samples), adapt
        the Jacobian weight, warn on a rising share, draw ``deq/stability``; start afresh."""
        split, self.split = self.split, None
        if split is None:
            return
        fit, jac = module.fit_cfg, module.jac_cfg
        values = {k: module.all_gather(v).flatten().cpu() for k, v in split.tensors().items()}
        figures = summarize(values, fit.unstable_above)
        for name, value in figures.items():
            module.log(f"deq/val_{name}", value)
        self.history.append(figures["unstable_share"])
        if jac.adaptive:
            self.jac_multiplier = jac.adapt(self.jac_multiplier, figures["unstable_share"])
        zero = module.trainer.is_global_zero
        if rising(self.history, fit.unstable_patience) and zero:
            warn_rising(self.history, fit.unstable_patience, fit.unstable_above)
        # figures from rank 0 alone: another would open a logger folder of its own
        if zero and fit.figures_due(len(self.history) - 1):
            fig = stability_figure(values, fit.unstable_above, module.current_epoch)
            data = torch.stack([values["rel_residual"], values["steps"]], dim=1)
            log_figure(module.loggers, "deq/stability", fig, module.global_step, data)

    def save(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["deqlab_unstable_history"] = list(self.history)
        checkpoint["deqlab_jac_multiplier"] = self.jac_multiplier

    def load(self, checkpoint: dict[str, Any]) -> None:
        self.history = list(checkpoint.get("deqlab_unstable_history", []))
        self.jac_multiplier = float(checkpoint.get("deqlab_jac_multiplier", 1.0))
