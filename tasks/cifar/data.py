"""CIFAR-10 DataModule: torchvision's release or an image-folder copy, decoded once.

Two on-disk layouts under ``data_dir`` are recognised:

- torchvision's ``cifar-10-batches-py/`` (fetched with ``download=true`` when online);
- an image folder ``cifar10/{train,test}/<class>/*.jpg|png`` (e.g. a JPEG copy of the release).

Either way the images become one uint8 tensor per split, kept in memory (the image folder is
decoded once and cached beside the data as ``cifar10/<split>.decoded.pt``). Augmentation and
normalization run on tensors in the dataset, so no JPEG is decoded twice.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from deqlab.runner.data import (
    EpochShuffle,
    ResumableDataModule,
    ResumableLoader,
    collate,
    mix_seed,
    per_process,
    rank_and_world,
)
from deqlab.runner.files import load_cache, save_atomic
from deqlab.runner.refusal import InputNotFound

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


class CifarTensors(Dataset):
    """uint8 images (N, 3, 32, 32) and labels, served in [0, 1] and then normalized by
    ``mean`` / ``std`` per channel (no normalization when they are None; augmentation is
    batched: see :func:`random_crop_flip`). A DataLoader fetches a batch with one indexing
    (``__getitems__``; its ``collate_fn`` is :func:`~deqlab.runner.data.collate`), on the
    device the tensors are on (:meth:`to`)."""

    def __init__(
        self,
        images: Tensor,
        labels: Tensor,
        mean: tuple[float, ...] | None = MEAN,
        std: tuple[float, ...] | None = STD,
    ):
        self.images, self.labels = images, labels
        self.mean = torch.tensor(mean or (0.0, 0.0, 0.0)).view(3, 1, 1)
        self.std = torch.tensor(std or (1.0, 1.0, 1.0)).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        return (self.images[i].float().div_(255) - self.mean) / self.std, self.labels[i]

    def __getitems__(self, indices: list[int]) -> tuple[Tensor, Tensor]:
        i = torch.as_tensor(indices, device=self.images.device)
        return (self.images[i].float().div_(255) - self.mean) / self.std, self.labels[i]

    def to(self, device: torch.device | str) -> CifarTensors:
        """The images, labels and normalization moved to ``device``, in place: batches are
        then drawn and normalized there, with no copy from the host per step."""
        for name in ("images", "labels", "mean", "std"):
            setattr(self, name, getattr(self, name).to(device))
        return self


def random_crop_flip(
    x: Tensor,
    generator: torch.Generator,
    pad: int = 4,
    mean: tuple[float, ...] | None = MEAN,
    std: tuple[float, ...] | None = STD,
) -> Tensor:
    """The standard CIFAR augmentation on a normalized batch (B, C, H, W): a random crop of the
    image padded with ``pad`` black pixels, then a horizontal flip with probability 1/2, drawn
    per sample from ``generator``. Black is 0 before normalization, -mean/std after it."""
    b, c, h, w = x.shape
    m = torch.tensor(mean or (0.0, 0.0, 0.0), device=x.device)
    black = (-m / torch.tensor(std or (1.0, 1.0, 1.0), device=x.device)).to(x.dtype)
    padded = black.view(1, c, 1, 1).expand(b, c, h + 2 * pad, w + 2 * pad).clone()
    padded[:, :, pad : pad + h, pad : pad + w] = x
    dy, dx = torch.randint(0, 2 * pad + 1, (2, b, 1), generator=generator, device=x.device)
    flip = torch.rand(b, 1, generator=generator, device=x.device) < 0.5
    cols = torch.arange(w, device=x.device)
    rows = dy + torch.arange(h, device=x.device)
    cols = dx + torch.where(flip, w - 1 - cols, cols)
    batch = torch.arange(b, device=x.device).view(b, 1, 1, 1)
    channel = torch.arange(c, device=x.device).view(1, c, 1, 1)
    return padded[batch, channel, rows.view(b, 1, h, 1), cols.view(b, 1, 1, w)]


def stratified(labels: Tensor, n: int, generator: torch.Generator) -> Tensor:
    """Indices of a random sample of ``n`` items with every class in proportion to its share
    of ``labels`` (largest remainders round), ordered so that the classes are interleaved:
    any prefix of the result (a ``limit_*_batches``) is close to balanced too."""
    classes, counts = labels.unique(return_counts=True)
    exact = counts.double() * n / len(labels)
    quota = exact.floor().long()
    short = n - int(quota.sum())
    if short > 0:
        quota[torch.argsort(exact - quota, descending=True, stable=True)[:short]] += 1
    picks, keys = [], []
    for cls, q in zip(classes.tolist(), quota.tolist(), strict=True):
        members = (labels == cls).nonzero().flatten()
        picks.append(members[torch.randperm(len(members), generator=generator)[:q]])
        # the k-th pick of a class sits at (k + u) / q: spread evenly over the whole order
        keys.append((torch.arange(q) + torch.rand(q, generator=generator)) / max(q, 1))
    return torch.cat(picks)[torch.argsort(torch.cat(keys))]


def _decode_folder(root: Path) -> tuple[Tensor, Tensor]:
    import numpy as np
    from PIL import Image

    files, labels = [], []
    for label, cls in enumerate(CLASSES):
        found = sorted(p for p in (root / cls).glob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        files += found
        labels += [label] * len(found)
    if not files:
        raise InputNotFound(f"no images under {root}/<class>/ for classes {CLASSES}")
    images = torch.empty(len(files), 3, 32, 32, dtype=torch.uint8)
    for i, path in enumerate(files):
        try:
            with Image.open(path) as im:
                img = torch.from_numpy(np.asarray(im.convert("RGB"))).permute(2, 0, 1)
        except (OSError, SyntaxError, ValueError) as e:  # PIL's ways of saying "damaged"
            raise ValueError(
                f"{path}: cannot decode this image ({e}); the copy is damaged: unpack or "
                "download the dataset again, or delete the file"
            ) from e
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
        saved = load_cache(cache)
        if saved is not None and saved.get("key") == key:
            return saved["images"], saved["labels"]
        images, labels = _decode_folder(folder)
        save_atomic({"key": key, "images": images, "labels": labels}, cache)
        return images, labels
    if (data_dir / "cifar-10-batches-py").is_dir() or download:
        from torchvision.datasets import CIFAR10

        ds = CIFAR10(str(data_dir), train=train, download=download)
        return torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous(), torch.tensor(ds.targets)
    raise InputNotFound(
        f"CIFAR-10 not found under {data_dir.resolve()}: looked for {folder} (image folder) and "
        f"{data_dir / 'cifar-10-batches-py'} (torchvision). Get it with `data_dir=... "
        "task.datamodule.download=true` (online), or put an image-folder copy there "
        "(cifar10/{train,test}/<class>/*.png|jpg)."
    )


class CifarDataModule(ResumableDataModule):
    """Train/val split of the training set, test = the test set.

    The validation split, ``subset`` (a smaller training pool, and as many test images) and
    the test order are seeded, class-stratified samples, so a subset or a ``limit_*_batches``
    still sees every class. The training order is a function of (seed, epoch) and the
    augmentation of (seed, rank, step), so a run resumed mid-epoch repeats the original.

    ``on_device`` keeps every split on the training device (a GPU), where batches are drawn,
    normalized and augmented: nothing crosses from the host per step but the batch's indices.

    ``val_size=0`` trains on every training image, as the implicit-layers tutorial does, and
    runs the validation loop on the test split (the tutorial reports test accuracy each
    epoch); such a run must test its last checkpoint (``test_ckpt=last``), since choosing the
    best one by test accuracy would select on the test set.
    """

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
        mean: list[float] | None = MEAN,
        std: list[float] | None = STD,
        on_device: bool = False,
    ):
        super().__init__()
        if on_device and (num_workers or pin_memory):
            raise ValueError(
                "task.datamodule.on_device keeps the images on the device, where worker "
                "processes and pinned host memory have nothing to do: set num_workers=0 and "
                "pin_memory=false"
            )
        self.on_device = on_device
        if (mean is None) != (std is None):
            raise ValueError("task.datamodule.mean and std are both set or both null")
        self.mean = None if mean is None else tuple(mean)
        self.std = None if std is None else tuple(std)
        if batch_size < 1 or (eval_batch_size is not None and eval_batch_size < 1):
            raise ValueError("task.datamodule.batch_size and eval_batch_size must be >= 1")
        if subset is not None and subset < 2:
            raise ValueError(f"task.datamodule.subset must be >= 2 images or null, got {subset}")
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
        pool = torch.randperm(len(labels), generator=g)
        if self.subset:
            pool = stratified(labels, min(self.subset, len(labels)), g)
        n_val = (
            int(self.val_size * len(pool)) if isinstance(self.val_size, float) else self.val_size
        )
        if self.val_size == 0:
            n_val = 0
            rank_zero_warn(
                "task.datamodule.val_size=0: training on every training image; the validation "
                "loop (val/*) runs on the test split, as the implicit-layers tutorial does"
            )
        elif not 0 < n_val < len(pool):
            raise ValueError(
                f"val_size={self.val_size} leaves no train or no val data of {len(pool)} images"
            )
        in_val = torch.zeros(len(labels), dtype=torch.bool)
        if n_val > 0:
            in_val[pool[stratified(labels[pool], n_val, g)]] = True
        val, train = pool[in_val[pool]], pool[~in_val[pool]]
        if n_val > 0:
            val = val[stratified(labels[val], len(val), g)]  # interleaved classes
        per_process(self.batch_size, "task.datamodule.batch_size")  # splits evenly
        per_process(self.eval_batch_size, "task.datamodule.eval_batch_size")
        if len(train) < self.batch_size:
            raise ValueError(
                f"the training split has {len(train)} images, fewer than one batch of "
                f"{self.batch_size}: lower task.datamodule.batch_size or val_size"
            )
        norm = {"mean": self.mean, "std": self.std}
        self.train_set = CifarTensors(images[train], labels[train], **norm)
        test_images, test_labels = load_split(self.data_dir, False)
        n_test = min(self.subset or len(test_labels), len(test_labels))
        test = stratified(test_labels, n_test, torch.Generator().manual_seed(self.seed))
        self.test_set = CifarTensors(test_images[test], test_labels[test], **norm)
        self.val_set = (
            self.test_set if n_val == 0 else CifarTensors(images[val], labels[val], **norm)
        )
        if self.on_device and self.trainer is not None:
            for split in {id(s): s for s in (self.train_set, self.val_set, self.test_set)}.values():
                split.to(self.trainer.strategy.root_device)

    def make_train_loader(self) -> ResumableLoader:
        world = rank_and_world()[1]
        order = {"seed": self.seed, "images": len(self.train_set), "batch": self.batch_size}
        return ResumableLoader(
            self.training_set(self.train_set),
            per_process(self.batch_size, "task.datamodule.batch_size"),
            sampler=EpochShuffle(len(self.train_set), self.seed),
            drop_last=True,
            order={**order, "processes": world},
            collate_fn=collate,
            **self.loader_kw,
        )

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, self._eval_batch(), collate_fn=collate, **self.loader_kw)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.test_set, self._eval_batch(), collate_fn=collate, **self.loader_kw)

    def _eval_batch(self) -> int:
        return per_process(self.eval_batch_size, "task.datamodule.eval_batch_size")

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Augment training batches on their device, with randomness drawn from
        (seed, rank, step) alone: a resumed run augments its batches as the original did."""
        trainer = self.trainer
        if not (self.augment and trainer is not None and trainer.training):
            return batch
        x, y, *index = batch
        key = mix_seed(self.seed, trainer.global_rank, trainer.global_step)
        g = torch.Generator(device=x.device).manual_seed(key)
        return random_crop_flip(x, g, mean=self.mean, std=self.std), y, *index
