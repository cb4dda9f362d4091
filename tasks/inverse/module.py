"""Reconstruction: mean squared error for training, PSNR and SSIM for the report, and the
PSNR of the measurement's simplest reconstruction for reference, on top of DEQLitModule."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.functional import structural_similarity_index_measure

from deqlab.runner.module import DEQLitModule

from .data import Target


def psnr(image: Tensor, reference: Tensor) -> Tensor:
    """Per-image PSNR in dB of images in [0, 1] (``image`` clipped to it): 10 log10(1 / MSE)."""
    mse = (image.clamp(0, 1) - reference).pow(2).flatten(1).mean(1)
    return -10 * torch.log10(mse.clamp(min=1e-12))


class ReconstructionModule(DEQLitModule):
    """``split/psnr`` (the mean of per-image PSNRs), ``split/ssim``, ``split/psnr_input`` (the
    simplest reconstruction's PSNR: the gain is the difference), and the budget curve
    ``test/psnr@k``.

    Args:
        net: the reconstruction network (:class:`~deqlab.tasks.inverse.model.Reconstructor`).
        **deq: DEQLitModule's settings.
    """

    curve_metric = "psnr"

    def __init__(self, net: nn.Module, **deq: Any):
        super().__init__(net, **deq)

    def criterion(self, output: Tensor, target: Target) -> Tensor:
        return F.mse_loss(output, target.clean)

    def curve_values(self, output: Tensor, target: Target) -> Tensor:
        return psnr(output, target.clean)

    def update_metrics(self, split: str, output: Tensor, target: Target) -> None:
        n = output.shape[0]
        log = {"batch_size": n, "sync_dist": split != "train"}
        self.log(f"{split}/psnr", psnr(output, target.clean).mean(), prog_bar=True, **log)
        if split == "train":
            return
        ssim = structural_similarity_index_measure(
            output.clamp(0, 1), target.clean, data_range=1.0, reduction="none"
        )
        self.log(f"{split}/ssim", ssim.mean(), **log)
        self.log(f"{split}/psnr_input", psnr(target.baseline, target.clean).mean(), **log)
