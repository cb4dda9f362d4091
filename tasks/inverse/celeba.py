"""CelebA, the faces Gilton, Ongie and Willett reconstruct, read from torchvision's on-disk
layout and measured like every image of this task (:class:`~.data.MeasuredImages`).

The layout, what ``torchvision.datasets.CelebA(root, download=True)`` leaves::

    root/celeba/img_align_celeba/000001.jpg ... 202599.jpg   (178 x 218 aligned faces)
    root/celeba/list_eval_partition.txt                        ("000001.jpg 0" per line)

The splits are the official partition (0 train, 1 validation, 2 test), the one the authors'
loader takes by position in the sorted file list. torchvision's own class is not used to read:
it loads all five annotation files and checks their MD5 sums on every construction; only the
images and the partition are needed here. Downloading does go through torchvision (its file
list, Google Drive ids and checksums, and ``gdown``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from deqlab.runner.data import (
    EpochShuffle,
    ResumableDataModule,
    ResumableLoader,
    per_process,
    rank_and_world,
)
from deqlab.runner.refusal import InputNotFound

from .data import MeasuredImages

SPLITS = {"train": 0, "val": 1, "test": 2}


def read_partition(folder: Path) -> dict[int, list[str]]:
    """The file names of each split (0, 1, 2) from ``list_eval_partition.txt``, in order."""
    path = folder / "list_eval_partition.txt"
    splits: dict[int, list[str]] = {0: [], 1: [], 2: []}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        name, _, split = line.partition(" ")
        if split.strip() not in ("0", "1", "2"):
            raise ValueError(f"{path}:{number}: {line!r} is not '<image> <0|1|2>'")
        splits[int(split)].append(name)
    return splits


class CelebAImages(Dataset):
    """(image, 0) for the files ``names`` of ``folder/img_align_celeba``, each resized to
    ``size`` x ``size`` (bilinear with antialiasing, aspect not kept: the authors' ``Resize``)
    and scaled to [0, 1]."""

    def __init__(self, folder: Path, names: list[str], size: int):
        self.folder, self.names, self.size = folder / "img_align_celeba", names, size

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        with Image.open(self.folder / self.names[i]) as image:
            image = image.convert("RGB").resize((self.size, self.size), Image.BILINEAR)
            array = np.asarray(image, dtype=np.float32) / 255
        return torch.from_numpy(array).permute(2, 0, 1).contiguous(), 0


def download_celeba(root: Path) -> None:
    """Fetch CelebA into ``root/celeba`` with torchvision's file list (Google Drive ids and
    MD5 sums, checked by ``download_file_from_google_drive``), then unpack the images."""
    from torchvision.datasets import CelebA
    from torchvision.datasets import celeba as tv_celeba

    folder = Path(root) / CelebA.base_folder
    for file_id, md5, filename in CelebA.file_list:
        tv_celeba.download_file_from_google_drive(file_id, str(folder), filename, md5)
    if not (folder / "img_align_celeba").is_dir():
        tv_celeba.extract_archive(str(folder / "img_align_celeba.zip"))


class MeasuredCelebADataModule(ResumableDataModule):
    """CelebA faces in [0, 1] at ``image_size`` with their measurements through ``operator``.
    The training order is a function of (seed, epoch), resumable mid-epoch.

    Args:
        operator: ``make_physics``'s arguments (``task.operator``).
        data_dir: the folder holding ``celeba/`` (torchvision's ``root``).
        image_size: the side images are resized to (the authors': 128).
        train_size: training images drawn (seeded) from the train split; None: all 162,770.
        val_size: the first images of the validation split used; None: all.
        test_size: the first images of the test split used; None: all 19,962.
        batch_size: training batch size.
        eval_batch_size: validation and test batch size.
        num_workers: DataLoader workers.
        seed: the training subset's and the measurement noise's seed.
        download: fetch the data set first (torchvision's client, needs ``gdown``).
    """

    def __init__(
        self,
        operator: dict[str, Any],
        data_dir: str | Path,
        image_size: int = 128,
        train_size: int | None = None,
        val_size: int | None = None,
        test_size: int | None = None,
        batch_size: int = 16,
        eval_batch_size: int = 64,
        num_workers: int = 0,
        seed: int = 0,
        download: bool = False,
    ):
        super().__init__()
        self.operator, self.root = dict(operator), Path(data_dir)
        self.image_size, self.seed, self.download = image_size, seed, download
        self.sizes = {"train": train_size, "val": val_size, "test": test_size}
        self.batch_size, self.eval_batch_size, self.num_workers = (
            batch_size,
            eval_batch_size,
            num_workers,
        )
        self.sets: dict[str, MeasuredImages] = {}

    @property
    def folder(self) -> Path:
        return self.root / "celeba"

    def prepare_data(self) -> None:
        if self.download:
            download_celeba(self.root)

    def setup(self, stage: str | None = None) -> None:
        if self.sets:
            return
        partition = self.folder / "list_eval_partition.txt"
        if not (self.folder / "img_align_celeba").is_dir() or not partition.is_file():
            raise InputNotFound(
                f"CelebA not found: {self.folder} needs img_align_celeba/ and "
                f"list_eval_partition.txt (torchvision's layout). Download it with "
                f"task.datamodule.download=true, or point paths.data_dir at the folder above it"
            )
        names = read_partition(self.folder)
        for split, number in SPLITS.items():
            chosen = self._choose(split, names[number])
            images = CelebAImages(self.folder, chosen, self.image_size)
            self.sets[split] = MeasuredImages(images, self.operator, self.seed, number)

    def _choose(self, split: str, names: list[str]) -> list[str]:
        size = self.sizes[split]
        if size is None:
            return names
        if not 0 < size <= len(names):
            raise ValueError(
                f"task.datamodule.{split}_size={size}: the {split} split has {len(names)} images"
            )
        if split != "train":
            return names[:size]
        order = torch.randperm(len(names), generator=torch.Generator().manual_seed(self.seed))
        return [names[i] for i in sorted(order[:size].tolist())]

    def make_train_loader(self) -> ResumableLoader:
        train = self.sets["train"]
        order = {"seed": self.seed, "images": len(train), "batch": self.batch_size}
        return ResumableLoader(
            self.training_set(train),
            per_process(self.batch_size, "task.datamodule.batch_size"),
            sampler=EpochShuffle(len(train), self.seed),
            drop_last=True,  # as the authors' loader
            order={**order, "processes": rank_and_world()[1]},
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def _eval_loader(self, split: str) -> DataLoader:
        batch = per_process(self.eval_batch_size, "task.datamodule.eval_batch_size")
        return DataLoader(self.sets[split], batch, num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")
