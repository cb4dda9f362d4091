"""Node classification: cross-entropy and accuracy on the nodes of a split, on top of
DEQLitModule."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deqlab.runner.module import DEQLitModule

from .graph import NodeTargets


class NodeClassificationModule(DEQLitModule):
    """Cross-entropy and accuracy over the nodes a split's mask selects (``train/acc``,
    ``val/acc``, ``test/acc``); one batch is the whole graph.

    Args:
        net: the graph network (:class:`~deqlab.tasks.graph.model.IGNN`, or an explicit
            baseline such as :class:`~deqlab.tasks.graph.model.GCN`).
        clip_per_parameter: clip each parameter's gradient to this norm on its own (the IGNN
            code's ``clip_gradient``), instead of ``trainer.gradient_clip_val``'s global norm.
        **deq: DEQLitModule's settings.
    """

    curve_metric = "acc"

    def __init__(self, net: nn.Module, clip_per_parameter: float | None = None, **deq: Any):
        super().__init__(net, **deq)
        self.clip_per_parameter = clip_per_parameter
        self.correct: dict[str, list[Tensor]] = {}

    def criterion(self, output: Tensor, target: NodeTargets) -> Tensor:
        return F.cross_entropy(output[target.mask], target.labels[target.mask])

    def curve_values(self, output: Tensor, target: NodeTargets) -> Tensor:
        return (output[target.mask].argmax(1) == target.labels[target.mask]).float()

    def update_metrics(self, split: str, output: Tensor, target: NodeTargets) -> None:
        # one batch is the whole graph: the split's accuracy is this batch's
        self.log(
            f"{split}/acc", self.curve_values(output, target).mean(), prog_bar=split != "train"
        )

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        if self.clip_per_parameter is None:
            return super().configure_gradient_clipping(
                optimizer, gradient_clip_val, gradient_clip_algorithm
            )
        for p in self.parameters():
            if p.grad is not None:
                torch.nn.utils.clip_grad_norm_(p, self.clip_per_parameter)
