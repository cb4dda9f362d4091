"""An image as a data set for a coordinate network: the input is the pixel grid in [-1, 1]^2,
the target the pixel values mapped to [-1, 1], both as (pixels, channels) rows, as the
(Implicit)^2 authors' ``scripts/train_2d_image.py`` lays them out. One sample is the whole
image (full-batch training, theirs too); an epoch is ``steps_per_epoch`` such steps, and each
carries the image's index, so ``init=cached`` keeps one equilibrium per image."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from deqlab.runner.data import EpochShuffle, ResumableDataModule, ResumableLoader


class ImageError(ValueError):
    """An image the task cannot fit, named with the fix."""


def load_image(name: str) -> np.ndarray:
    """One of scikit-image's bundled photographs by name (``astronaut``, ``camera``, ...) or
    an image file's path, as an (H, W) or (H, W, C) array."""
    if Path(name).suffix:
        from PIL import Image

        if not Path(name).is_file():
            raise ImageError(
                f"no image file {name!r}: task.datamodule.image is a path or a "
                "scikit-image photograph's name (astronaut, camera, ...)"
            )
        with Image.open(name) as image:
            return np.asarray(image)
    import skimage.data

    if not callable(getattr(skimage.data, name, None)):
        raise ImageError(
            f"scikit-image ships no image {name!r}: try astronaut, camera, chelsea, coffee, rocket"
        )
    return getattr(skimage.data, name)()


def image_tensor(array: np.ndarray, size: int | None) -> Tensor:
    """(C, H, W) float values in [0, 1] of an 8-bit image, center-cropped to a square and
    resized to ``size`` (None: kept); refused: empty, non-8-bit, or with an alpha channel."""
    if array.size == 0:
        raise ImageError("the image is empty")
    if array.dtype != np.uint8:
        raise ImageError(
            f"the image's dtype is {array.dtype}: an 8-bit image (uint8) is "
            "expected; convert it (e.g. skimage.util.img_as_ubyte)"
        )
    if array.ndim == 3 and array.shape[-1] == 4:
        raise ImageError("the image has an alpha channel: fit its colors alone (image[..., :3])")
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (1, 3)):
        raise ImageError(f"an image of shape {array.shape}: (H, W), (H, W, 1) or (H, W, 3)")
    image = torch.from_numpy(np.ascontiguousarray(array)).float() / 255
    image = image[..., None] if image.ndim == 2 else image
    image = image.permute(2, 0, 1)
    side = min(image.shape[1:])
    top, left = (image.shape[1] - side) // 2, (image.shape[2] - side) // 2
    image = image[:, top : top + side, left : left + side]
    if size is not None and size != side:
        image = torch.nn.functional.interpolate(
            image[None], size=(size, size), mode="bilinear", antialias=True, align_corners=False
        )[0].clamp(0, 1)
    return image


def coordinate_grid(height: int, width: int) -> Tensor:
    """(H * W, 2) pixel coordinates in [-1, 1], row-major, (x, y) per pixel."""
    ys, xs = torch.linspace(-1, 1, height), torch.linspace(-1, 1, width)
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([grid_x, grid_y], -1).reshape(-1, 2)


def check_grid(coords: Tensor, image: Tensor) -> None:
    """Refuse a coordinate grid that does not have one row per pixel of ``image``."""
    pixels = image.shape[-2] * image.shape[-1]
    if coords.ndim != 2 or coords.shape != (pixels, 2):
        raise ImageError(
            f"a coordinate grid of shape {tuple(coords.shape)} for a "
            f"{image.shape[-2]}x{image.shape[-1]} image: ({pixels}, 2) expected"
        )


class ImageSamples(Dataset):
    """``steps`` copies of (coordinates, targets) of one image; each copy's key is 0."""

    def __init__(self, image: Tensor, steps: int):
        self.image, self.steps = image, steps
        self.coords = coordinate_grid(*image.shape[1:])
        check_grid(self.coords, image)
        self.targets = image.flatten(1).t() * 2 - 1  # (pixels, C) in [-1, 1]

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        return self.coords, self.targets

    def sample_key(self, i: int) -> int:
        return 0  # one image: every step trains the same sample


class ImageDataModule(ResumableDataModule):
    """One image fitted by a coordinate network: train, validation and test on its full grid.

    Args:
        image: a scikit-image photograph's name or an image file's path.
        size: the side the center square is resized to (None: the image's own).
        steps_per_epoch: full-image steps in one training epoch.
        channels: the channels the network outputs: the image must have as many.
    """

    def __init__(
        self,
        image: str = "camera",
        size: int | None = 128,
        steps_per_epoch: int = 100,
        channels: int | None = None,
    ):
        super().__init__()
        if steps_per_epoch < 1:
            raise ImageError(f"task.datamodule.steps_per_epoch={steps_per_epoch} must be >= 1")
        self.image_name, self.size, self.steps = image, size, steps_per_epoch
        self.expected_channels = channels
        self.train_set: ImageSamples | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None:
            image = image_tensor(load_image(self.image_name), self.size)
            wanted = self.expected_channels
            if wanted is not None and image.shape[0] != wanted:
                raise ImageError(
                    f"{self.image_name!r} has {image.shape[0]} channel(s), the network outputs "
                    f"{wanted}: set task.channels={image.shape[0]}"
                )
            self.train_set = ImageSamples(image, self.steps)

    def make_train_loader(self) -> ResumableLoader:
        order = {"image": self.image_name, "size": self.size, "steps": self.steps}
        return ResumableLoader(
            self.training_set(self.train_set), 1, sampler=EpochShuffle(self.steps, 0), order=order
        )

    def _eval_loader(self) -> DataLoader:
        return DataLoader(ImageSamples(self.train_set.image, 1), batch_size=1)

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader()

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader()
