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
