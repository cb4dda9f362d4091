"""CIFAR-10 task: data layouts, the tutorial model, and a short run on real data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from deqlab.tasks.cifar.data import CifarDataModule, load_split
from deqlab.tasks.cifar.model import TutorialDEQ

from .helpers.runs import short_real_cifar_run, write_cifar_folder

REAL_DATA = Path(os.environ.get("DEQLAB_DATA", "/nonexistent"))
HAS_CIFAR = (REAL_DATA / "cifar10" / "test").is_dir()


def test_image_folder_is_decoded_once_and_cached(tmp_path):
    write_cifar_folder(tmp_path, train_per_class=3, test_per_class=1)
    images, labels = load_split(tmp_path, train=True)
    assert images.shape == (30, 3, 32, 32) and images.dtype == torch.uint8
    assert labels.bincount().tolist() == [3] * 10
    cache = tmp_path / "cifar10" / "train.decoded.pt"
    assert cache.is_file()
    stamp = cache.stat().st_mtime_ns
    again, _ = load_split(tmp_path, train=True)
    assert torch.equal(again, images) and cache.stat().st_mtime_ns == stamp
    # Adding an image invalidates the cache.
    (tmp_path / "cifar10" / "train" / "cat" / "0000.png").rename(
        tmp_path / "cifar10" / "train" / "cat" / "0099.png"
    )
    write_cifar_folder(tmp_path, train_per_class=4, test_per_class=1)
    assert load_split(tmp_path, train=True)[0].shape[0] == 41


def test_missing_data_says_where_it_looked_and_how_to_get_it(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"(?s)cifar10.*cifar-10-batches-py.*download=true"):
        load_split(tmp_path, train=True)


def test_torchvision_layout_is_read(tmp_path, monkeypatch):
    import pickle

    import numpy as np

    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {"data": rng.integers(0, 255, (4, 3072), dtype=np.uint8), "labels": list(range(4))}
        with open(root / name, "wb") as fh:
            pickle.dump(batch, fh)
    with open(root / "batches.meta", "wb") as fh:
        pickle.dump({"label_names": ["x"] * 10}, fh)
    import torchvision.datasets.cifar as tv_cifar

    # The fake files lack the release's checksums.
    monkeypatch.setattr(tv_cifar.CIFAR10, "_check_integrity", lambda self: True)
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda *a, **k: True)
    images, labels = load_split(tmp_path, train=True)
    assert images.shape == (20, 3, 32, 32) and labels[:4].tolist() == [0, 1, 2, 3]


def test_split_is_seeded_and_disjoint(tmp_path):
    write_cifar_folder(tmp_path, train_per_class=5, test_per_class=1)
    a = CifarDataModule(str(tmp_path), batch_size=4, val_size=10, seed=3)
    a.setup()
    b = CifarDataModule(str(tmp_path), batch_size=4, val_size=10, seed=3)
    b.setup()
    assert torch.equal(a.val_set.images, b.val_set.images)
    assert len(a.train_set) == 40 and len(a.val_set) == 10 and len(a.test_set) == 10
    x, _y = next(iter(a.train_dataloader()))
    assert x.shape == (4, 3, 32, 32) and x.dtype == torch.float32
    aug = CifarDataModule(str(tmp_path), batch_size=4, val_size=10, augment=True)
    aug.setup()
    assert aug.train_set[0][0].shape == (3, 32, 32)


def test_tutorial_model_size_and_shapes():
    net = TutorialDEQ()  # 48 hidden, 64 inner channels: the tutorial's < 100k parameters
    n = sum(p.numel() for p in net.parameters())
    assert 60_000 < n < 100_000
    u, z0 = net.inject(torch.randn(2, 3, 32, 32))
    assert u.shape == z0.shape == (2, 48, 32, 32)
    assert net.cell(z0, u).shape == u.shape and net.head(u).shape == (2, 10)


@pytest.mark.slow
@pytest.mark.skipif(
    not HAS_CIFAR, reason="set DEQLAB_DATA to a folder holding cifar10/ (../shared/data/prepare.py)"
)
def test_real_cifar_short_run_beats_chance(tmp_path):
    best = short_real_cifar_run("cifar_cpu", REAL_DATA, tmp_path)
    assert best > 0.25, best  # chance is 0.10


def _coordinate_image() -> torch.Tensor:
    """A uint8 image whose pixel (r, c) reads (8 r, 8 c, 255): where any output pixel came
    from is visible in it, and padding (black in every channel) is told apart."""
    rows = torch.arange(32).view(32, 1).expand(32, 32)
    cols = torch.arange(32).view(1, 32).expand(32, 32)
    return torch.stack([8 * rows, 8 * cols, torch.full((32, 32), 255)]).to(torch.uint8)


def _crops(out: torch.Tensor) -> torch.Tensor:
    """Each augmented image's (dy, dx, flip), read back from the coordinates at the centre:
    output pixel (16, 16) is padded pixel (16 + dy, 16 + dx), or (16 + dy, 15 + dx) flipped."""
    pixels = (out[:, :2, 16, 16:18] * 255 / 8).round().long()  # (N, 2 channels, 2 columns)
    flip = pixels[:, 1, 1] < pixels[:, 1, 0]  # the column index runs backwards
    dy = pixels[:, 0, 0] + 4 - 16
    dx = pixels[:, 1, 0] + 4 - torch.where(flip, 15, 16)
    return torch.stack([dy, dx, flip.long()], dim=1)


def test_batched_augmentation_draws_what_torchvision_draws():
    """random_crop_flip (on the device, batched) against torchvision's RandomCrop(32,
    padding=4) + RandomHorizontalFlip + Normalize, the MDEQ reference's transform, 3,000 draws
    each: the same 9 x 9 crop offsets and flips (a two-sample chi-square over the 162 cells,
    far below its 1e-6 quantile), and the same per-pixel mean and standard deviation."""
    from PIL import Image
    from torchvision import transforms as T

    from deqlab.tasks.cifar.data import MEAN, STD, random_crop_flip

    n, image = 3000, _coordinate_image()
    pil = Image.fromarray(image.permute(1, 2, 0).numpy())
    reference = T.Compose(
        [
            T.RandomCrop(32, padding=4),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            T.Normalize(MEAN, STD),
        ]
    )
    torch.manual_seed(0)
    theirs = torch.stack([reference(pil) for _ in range(n)])
    mean, std = torch.tensor(MEAN).view(3, 1, 1), torch.tensor(STD).view(3, 1, 1)
    normalized = ((image.float() / 255 - mean) / std).expand(n, 3, 32, 32)
    ours = random_crop_flip(normalized, torch.Generator().manual_seed(1))

    def table(out: torch.Tensor) -> torch.Tensor:
        crops = _crops(out * std + mean)
        assert crops[:, :2].min() >= 0 and crops[:, :2].max() <= 8
        # each offset 1/9, a flip 1/2: every count within 4.5 standard deviations
        for column, k in ((0, 9), (1, 9), (2, 2)):
            counts = torch.bincount(crops[:, column], minlength=k).double()
            assert float((counts - n / k).abs().max()) < 4.5 * (n * (k - 1)) ** 0.5 / k, counts
        return torch.bincount((crops[:, 0] * 9 + crops[:, 1]) * 2 + crops[:, 2], minlength=162)

    a, b = table(ours).double(), table(theirs).double()
    assert (a > 0).all() and (b > 0).all()  # every offset and flip is drawn
    chi2 = float(((a - b) ** 2 / (a + b)).sum())
    assert chi2 < 161 + 6 * (2 * 161) ** 0.5, chi2  # chi2(161): mean 161, sd 18
    for stat in (torch.mean, torch.std):
        diff = (stat(ours, 0) - stat(theirs, 0)).abs()
        spread = theirs.std(0) / n**0.5  # a mean's standard error; a std's is smaller
        assert float((diff / (spread + 1e-3)).max()) < 6
    # the padding is black before normalization, as torchvision's fill=0
    corner = ours[(_crops(ours * std + mean)[:, :2] == 8).all(1)][:, :, 31, 31]
    torch.testing.assert_close(corner, (-mean / std).view(1, 3).expand_as(corner))


def test_a_batch_is_drawn_whole_and_on_the_data_device(tmp_path):
    """The loaders fetch a batch with one indexing (__getitems__), equal to stacking the
    samples, with the warm-start keys when indexed; on_device moves every split to the
    trainer's device and refuses worker processes."""
    from torch.utils.data.dataloader import default_collate

    from deqlab.runner.data import Indexed

    write_cifar_folder(tmp_path, train_per_class=3, test_per_class=1)
    dm = CifarDataModule(str(tmp_path), batch_size=6, val_size=5, num_workers=0)
    dm.setup()
    picks = [7, 0, 12, 3]
    x, y = dm.train_set.__getitems__(picks)
    want = default_collate([dm.train_set[i] for i in picks])
    assert torch.equal(x, want[0]) and torch.equal(y, want[1])
    *_, keys = Indexed(dm.train_set).__getitems__(picks)
    assert keys.tolist() == picks
    dm.indexed = True
    x, y, keys = next(iter(dm.train_dataloader()))
    assert x.shape == (6, 3, 32, 32) and keys.shape == (6,)
    assert torch.equal(x[0], dm.train_set[int(keys[0])][0])
    moved = dm.train_set.to("meta")
    assert moved.images.device.type == "meta" and moved.mean.device.type == "meta"
    with pytest.raises(
        ValueError, match=r"on_device keeps the images on the device.*num_workers=0"
    ):
        CifarDataModule(str(tmp_path), on_device=True, num_workers=2)
