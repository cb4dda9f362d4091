"""Classification on top of DEQLitModule: cross-entropy and top-1 accuracy, for any task whose
head gives class scores (B, C) and whose targets are class indices (B,): images, graphs."""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from .module import DEQLitModule


class ClassificationModule(DEQLitModule):
    """Cross-entropy and top-1 accuracy (``train/acc``, ``val/acc``, ``test/acc``).

    Args:
        net: the network (its head gives the class scores).
        num_classes: the class count.
        **deq: DEQLitModule's settings.
    """

    def __init__(self, net: nn.Module, num_classes: int = 10, **deq: Any):
        super().__init__(net, **deq)
        # ModuleDict keys may not shadow nn.Module attributes such as `train`.
        self.acc = nn.ModuleDict(
            {
                f"{s}_acc": MulticlassAccuracy(num_classes, average="micro")
                for s in ("train", "val", "test")
            }
        )

    def criterion(self, output: Tensor, target: Tensor) -> Tensor:
        return F.cross_entropy(output, target)

    curve_metric = "acc"

    def curve_values(self, output: Tensor, target: Tensor) -> Tensor:
        return (output.argmax(1) == target).float()

    def update_metrics(self, split: str, output: Tensor, target: Tensor) -> None:
        metric = self.acc[f"{split}_acc"]
        if split == "train":  # the batch's accuracy, every step
            self.log("train/acc", metric(output, target))
        else:  # accumulated over the whole split
            metric.update(output, target)
            self.log(f"{split}/acc", metric, on_epoch=True, prog_bar=True)
