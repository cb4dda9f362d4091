"""CIFAR-10 DataModule: torchvision's release or an image-folder copy, decoded once.

Two on-disk layouts under ``data_dir`` are recognised:

- torchvision's ``cifar-10-batches-py/`` (fetched with ``download=true`` when online);
- an image folder ``cifar10/{train,test}/<class>/*.jpg|png`` (e.g. ``../shared/data/prepare.py``).

Either way the images become one uint8 tensor per split, kept in memory (the image folder is
decoded once and cached beside the data as ``cifar10/<split>.decoded.pt``). Augmentation and
normalization run on tensors in the dataset, so no JPEG is decoded twice.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


class CifarTensors(Dataset):
    """uint8 images (N, 3, 32, 32) and labels; normalizes, and augments if asked."""

    def __init__(self, images: Tensor, labels: Tensor, augment: bool = False):
        self.images, self.labels, self.augment = images, labels, augment
        self.mean = torch.tensor(MEAN).view(3, 1, 1)
        self.std = torch.tensor(STD).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        x = self.images[i].float().div_(255)
        if self.augment:  # random crop with 4-pixel zero padding, horizontal flip
            dx, dy = torch.randint(0, 9, (2,)).tolist()
            x = torch.nn.functional.pad(x, (4, 4, 4, 4))[:, dy : dy + 32, dx : dx + 32]
            if torch.rand(()) < 0.5:
                x = x.flip(2)
        return (x - self.mean) / self.std, self.labels[i]


class EpochShuffle(Sampler[int]):
    """A shuffle that depends only on (seed, epoch), so a resumed run sees the same order.
    Lightning calls ``set_epoch`` on it each epoch."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 10_007 + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self) -> int:
        return self.n


def _decode_folder(root: Path) -> tuple[Tensor, Tensor]:
    import numpy as np
    from PIL import Image

    files, labels = [], []
    for label, cls in enumerate(CLASSES):
        found = sorted(p for p in (root / cls).glob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        files += found
        labels += [label] * len(found)
    if not files:
        raise FileNotFoundError(f"no images under {root}/<class>/ for classes {CLASSES}")
    images = torch.empty(len(files), 3, 32, 32, dtype=torch.uint8)
    for i, path in enumerate(files):
        with Image.open(path) as im:
            img = torch.from_numpy(np.asarray(im.convert("RGB"))).permute(2, 0, 1)
        if img.shape != (3, 32, 32):
            raise ValueError(f"{path}: expected a 32x32 RGB image, got shape {tuple(img.shape)}")
        images[i] = img
    return images, torch.tensor(labels)


def _folder_key(root: Path) -> str:
    """Changes whenever an image is added, removed or rewritten."""
    h = hashlib.sha1()
    for p in sorted(root.rglob("*")):
        if p.suffix.lower() in IMAGE_SUFFIXES:
            st = p.stat()
            h.update(f"{p.relative_to(root)}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()


def load_split(data_dir: str | Path, train: bool, download: bool = False) -> tuple[Tensor, Tensor]:
    """(images uint8 (N, 3, 32, 32), labels (N,)) of the CIFAR-10 train or test split."""
    data_dir = Path(data_dir)
    split = "train" if train else "test"
    folder = data_dir / "cifar10" / split
    if folder.is_dir():
        cache = data_dir / "cifar10" / f"{split}.decoded.pt"
        key = _folder_key(folder)
        if cache.exists():
            saved = torch.load(cache, weights_only=True)
            if saved.get("key") == key:
                return saved["images"], saved["labels"]
        images, labels = _decode_folder(folder)
        torch.save({"key": key, "images": images, "labels": labels}, cache)
        return images, labels
    if (data_dir / "cifar-10-batches-py").is_dir() or download:
        from torchvision.datasets import CIFAR10

        ds = CIFAR10(str(data_dir), train=train, download=download)
        return torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous(), torch.tensor(ds.targets)
    raise FileNotFoundError(
        f"CIFAR-10 not found under {data_dir.resolve()}: looked for {folder} (image folder) and "
        f"{data_dir / 'cifar-10-batches-py'} (torchvision). Get it with `data_dir=... "
        "task.datamodule.download=true` (online), or unpack an image-folder copy there "
        "(`python ../shared/data/prepare.py data`)."
    )


class CifarDataModule(L.LightningDataModule):
    """Train/val split of the training set (seeded), test = the test set."""

    def __init__(
        self,
        data_dir: str = "data",
        batch_size: int = 128,
        eval_batch_size: int | None = None,
        val_size: int | float = 5000,
        augment: bool = False,
        download: bool = False,
        num_workers: int = 0,
        pin_memory: bool = False,
        seed: int = 0,
        subset: int | None = None,
    ):
        super().__init__()
        self.data_dir, self.download = data_dir, download
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size or batch_size
        self.val_size, self.augment, self.seed, self.subset = val_size, augment, seed, subset
        self.loader_kw = {
            "num_workers": num_workers,
            "pin_memory": pin_memory,
            "persistent_workers": num_workers > 0,
        }
        self.train_set = self.val_set = self.test_set = None

    def prepare_data(self) -> None:
        if self.download:  # runs on one process only
            load_split(self.data_dir, True, True)
            load_split(self.data_dir, False, True)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        images, labels = load_split(self.data_dir, True)
        g = torch.Generator().manual_seed(self.seed)
        order = torch.randperm(len(labels), generator=g)
        if self.subset:
            order = order[: self.subset]
        n_val = (
            int(self.val_size * len(order)) if isinstance(self.val_size, float) else self.val_size
        )
        if not 0 < n_val < len(order):
            raise ValueError(
                f"val_size={self.val_size} leaves no train or no val data of {len(order)} images"
            )
        val, train = order[:n_val], order[n_val:]
        self.train_set = CifarTensors(images[train], labels[train], self.augment)
        self.val_set = CifarTensors(images[val], labels[val])
        test_images, test_labels = load_split(self.data_dir, False)
        if self.subset:
            test_images, test_labels = test_images[: self.subset], test_labels[: self.subset]
        self.test_set = CifarTensors(test_images, test_labels)

    def train_dataloader(self) -> DataLoader:
        sampler = EpochShuffle(len(self.train_set), self.seed)
        return DataLoader(
            self.train_set, self.batch_size, sampler=sampler, drop_last=True, **self.loader_kw
        )

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, self.eval_batch_size, **self.loader_kw)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.test_set, self.eval_batch_size, **self.loader_kw)
