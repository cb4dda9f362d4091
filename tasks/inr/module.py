"""Fitting an image: mean squared error on values in [-1, 1] for training; PSNR and SSIM of
the fitted image in [0, 1], the budget curve ``test/psnr@k``, and the fitted image beside the
original as a figure at each validation."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.functional import structural_similarity_index_measure

from deqlab.runner.loggers import log_figure
from deqlab.runner.module import DEQLitModule


def to_image(values: Tensor) -> Tensor:
    """(B, pixels, C) values in [-1, 1] to (B, C, H, W) images in [0, 1] (square images)."""
    side = round(values.shape[1] ** 0.5)
    return ((values.clamp(-1, 1) + 1) / 2).transpose(1, 2).reshape(values.shape[0], -1, side, side)


def psnr(values: Tensor, targets: Tensor) -> Tensor:
    """Per-image PSNR in dB of the fitted image against the original, both in [0, 1]."""
    mse = (to_image(values) - to_image(targets)).pow(2).flatten(1).mean(1)
    return -10 * torch.log10(mse.clamp(min=1e-12))


class ImageFitModule(DEQLitModule):
    """``split/psnr``, ``split/ssim`` and the budget curve ``test/psnr@k`` of the fitted image.

    Args:
        net: a coordinate network (:mod:`deqlab.tasks.inr.model`).
        **deq: DEQLitModule's settings.
    """

    curve_metric = "psnr"

    def __init__(self, net: nn.Module, **deq: Any):
        super().__init__(net, **deq)

    def criterion(self, output: Tensor, target: Tensor) -> Tensor:
        return F.mse_loss(output, target)

    def curve_values(self, output: Tensor, target: Tensor) -> Tensor:
        return psnr(output, target)

    def update_metrics(self, split: str, output: Tensor, target: Tensor) -> None:
        log = {"batch_size": output.shape[0], "sync_dist": split != "train"}
        self.log(f"{split}/psnr", psnr(output, target).mean(), prog_bar=True, **log)
        if split == "train":
            return
        ssim = structural_similarity_index_measure(
            to_image(output), to_image(target), data_range=1.0
        )
        self.log(f"{split}/ssim", ssim, **log)
        if split == "val" and self.trainer is not None and not self.trainer.sanity_checking:
            self._figure(output, target)

    def _figure(self, output: Tensor, target: Tensor) -> None:
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 2, figsize=(6, 3))
        for ax, values, title in zip(axes, (target, output), ("original", "fitted")):
            image = to_image(values[:1])[0].permute(1, 2, 0).float().cpu()
            ax.imshow(image.squeeze(-1), cmap="gray" if image.shape[-1] == 1 else None)
            ax.set_title(title, fontsize=8)
            ax.set_axis_off()
        fig.tight_layout()
        log_figure(self.loggers, "val/image", fig, self.global_step)
