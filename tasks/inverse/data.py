"""Measured images: each clean image x paired with its measurement y = A x + noise, the noise
drawn from (seed, split, index) alone, so a split's measurements are a fixed data set that a
resumed run sees again exactly. CIFAR-10 supplies the images (its DataModule's splits)."""

from __future__ import annotations

from typing import Any, NamedTuple

import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from deqlab.runner.data import mix_seed
from deqlab.tasks.cifar.data import CifarDataModule

from .operators import make_physics


class Target(NamedTuple):
    """What a reconstruction is scored against: the clean image, and the measurement's
    simplest reconstruction (the blurred image itself; the bicubic upsampling), whose PSNR is
    ``psnr_input``."""

    clean: Tensor
    baseline: Tensor


def simplest(kind: str, y: Tensor, factor: int) -> Tensor:
    """The reconstruction a reader compares with: y itself for a blur (same size), y
    upsampled bicubically for super-resolution."""
    if kind == "blur":
        return y
    return F.interpolate(y, scale_factor=factor, mode="bicubic", align_corners=False)


class MeasuredImages(Dataset):
    """(y, Target(x, baseline)) for the images (x, label) of ``images``."""

    def __init__(self, images: Dataset, operator: dict[str, Any], seed: int, split: int):
        self.images, self.operator, self.seed, self.split = images, dict(operator), seed, split
        self.physics = make_physics(image_size=tuple(images[0][0].shape), **self.operator)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[Tensor, Target]:
        x = self.images[i][0]
        y = self.physics(x[None], seed=mix_seed(self.seed, self.split, i))
        kind, factor = self.operator["kind"], self.operator.get("factor", 2)
        return y[0], Target(x, simplest(kind, y, factor)[0])


class MeasuredCifarDataModule(CifarDataModule):
    """CIFAR-10 images in [0, 1] with their measurements through ``operator``.

    Args:
        operator: ``make_physics``'s arguments (``task.operator``).
        **cifar: :class:`~deqlab.tasks.cifar.data.CifarDataModule`'s (its splits, subset,
            batch sizes, seed); no augmentation and no normalization.
    """

    def __init__(self, operator: dict[str, Any], **cifar: Any):
        super().__init__(mean=None, std=None, augment=False, **cifar)
        self.operator = dict(operator)

    def setup(self, stage: str | None = None) -> None:
        if isinstance(self.train_set, MeasuredImages):
            return
        super().setup(stage)
        same = self.val_set is self.test_set
        self.train_set = MeasuredImages(self.train_set, self.operator, self.seed, 0)
        self.test_set = MeasuredImages(self.test_set, self.operator, self.seed, 2)
        self.val_set = (
            self.test_set if same else MeasuredImages(self.val_set, self.operator, self.seed, 1)
        )
