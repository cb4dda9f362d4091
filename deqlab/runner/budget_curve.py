"""The budget curve: a task's metric against the solver budget, from one evaluation pass.

With ``fit.budget_splits`` (the test split by default), every evaluation solve also keeps what
a solve stopped after k steps would have returned, for each k of the grid (``fit.budget_grid``,
else powers of two below the eval budget). The curve logs ``<split>/<metric>@k`` and
``<split>/nfe@k`` over the whole split: one pass draws what separate runs at each budget would.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torchmetrics import MeanMetric

from ..core import DEQInfo
from .fit import FitConfig


class BudgetCurve:
    """Running means of the metric and of nfe, per split and budget; owned by the module."""

    def __init__(self) -> None:
        # split -> step count k -> (running mean of the metric's values, of nfe)
        self.means: dict[str, dict[int, tuple[MeanMetric, MeanMetric]]] = {}

    @staticmethod
    def grid(split: str, deq: Any, fit: FitConfig, global_step: int) -> list[int]:
        """The step counts of ``split``'s curve, empty when the split draws none.

        Args:
            split: ``val`` or ``test``.
            deq: the module's core; one that keeps per-budget states says so
                (``keeps_budgets()``).
            fit: the ``fit`` settings (``budget_splits``, ``budget_grid``).
            global_step: the training step; none during unrolled pre-training.
        """
        splits = fit.budget_splits
        keeps = getattr(deq, "keeps_budgets", lambda: False)()
        if splits is None:  # the default: the test split, where the core can
            splits = ["test"] if keeps else []
        elif splits and not keeps:
            raise ValueError(
                f"fit.budget_splits={splits}: this core ({type(deq).__name__}, solver "
                "capture or a solver without a `budgets` option) keeps no per-budget states; "
                "set task.module.fit.budget_splits=[]"
            )
        if split not in splits or global_step < fit.pretrain_steps:
            return []
        return fit.budgets(deq.solver_cfg.eval_budget())

    def update(
        self,
        split: str,
        info: DEQInfo,
        output: Tensor,
        target: Any,
        head: Callable[[Any], Tensor],
        values: Callable[[Tensor, Any], Tensor],
    ) -> dict[int, Tensor]:
        """Add each budget's per-element metric values to the split's running means.

        Args:
            split: the split being evaluated.
            info: the solve's statistics, with ``at_budget`` filled in.
            output: the head at the full solve's z; a budget the solve stopped before shares
                that z (the same tensor), so its head is not evaluated again.
            target: the batch's targets.
            head: the network's head, for the other budgets' states.
            values: the task's ``curve_values(output, target)``.

        Returns:
            Budget k -> the metric's per-element values at k (detached).
        """
        curve = self.means.setdefault(split, {})
        kept = {}
        for k, res in info.at_budget.items():
            if k not in curve:
                curve[k] = (MeanMetric().to(output.device), MeanMetric().to(output.device))
            at_k = output if res.z is info.z else head(res.z)
            kept[k] = values(at_k, target).detach()
            curve[k][0].update(kept[k].flatten().float())
            # weighted by the solve's samples (a batch of images, or one graph)
            curve[k][1].update(
                torch.tensor(float(res.nfe), device=output.device), res.converged.numel()
            )
        return kept

    def log(
        self,
        split: str,
        log: Callable[[str, Tensor], None],
        metric: str,
        finish: Callable[[Tensor], Tensor],
    ) -> None:
        """Log ``split/<metric>@k`` (``finish`` of the mean) and ``split/nfe@k`` over the
        whole split (synced across processes by the metrics), then start afresh."""
        for k, (values, nfe) in sorted(self.means.pop(split, {}).items()):
            log(f"{split}/{metric}@{k}", finish(values.compute()))
            log(f"{split}/nfe@{k}", nfe.compute())

    def reset(self, split: str) -> None:
        self.means.pop(split, None)
