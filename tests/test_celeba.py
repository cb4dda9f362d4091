"""CelebA for the reconstruction tasks: fetched through torchvision's own client (its Google
Drive ids and checksums) from a fake Drive serving this repository's fixture in CelebA's
exact format, read from torchvision's layout with the official partition, refused by name
when absent, and the authors' experiment (deq_deblur_celeba) run end to end at toy size."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

pytest.importorskip("deepinv")

from deqlab.runner.refusal import InputNotFound
from deqlab.tasks.inverse.celeba import MeasuredCelebADataModule

DRIVE = Path(__file__).parent / "fixtures" / "celeba_drive"
OPERATOR = {"kind": "blur", "blur_sigma": 1.0, "kernel_size": 5, "padding": "constant"}


@pytest.fixture
def fake_drive(monkeypatch):
    """torchvision's ``download_file_from_google_drive`` served from the fixture folder: the
    file its id names is copied where torchvision asks (the checksum cannot match a fixture)."""
    from torchvision.datasets import CelebA
    from torchvision.datasets import celeba as tv_celeba

    names = {file_id: filename for file_id, _, filename in CelebA.file_list}
    calls = []

    def download(file_id, root, filename=None, md5=None):
        calls.append((file_id, filename, md5))
        Path(root).mkdir(parents=True, exist_ok=True)
        shutil.copy(DRIVE / names[file_id], Path(root) / filename)

    monkeypatch.setattr(tv_celeba, "download_file_from_google_drive", download)
    return calls


def _module(root: Path, **kwargs) -> MeasuredCelebADataModule:
    sizes = {"image_size": 32, "train_size": 4, "val_size": 2, "test_size": None}
    return MeasuredCelebADataModule(OPERATOR, root, **{**sizes, "batch_size": 2, **kwargs})


def test_download_goes_through_torchvision_and_reads_its_layout(tmp_path, fake_drive):
    module = _module(tmp_path, download=True)
    module.prepare_data()
    from torchvision.datasets import CelebA

    assert [(i, n, m) for i, m, n in CelebA.file_list] == fake_drive  # its ids and checksums
    assert (tmp_path / "celeba" / "img_align_celeba" / "000012.jpg").is_file()
    module.setup("fit")
    train, val, test = (module.sets[s] for s in ("train", "val", "test"))
    assert (len(train), len(val), len(test)) == (4, 2, 3)  # 4 of 6, the first 2 of 3, all 3
    assert val.images.names == ["000007.jpg", "000008.jpg"]
    assert test.images.names == ["000010.jpg", "000011.jpg", "000012.jpg"]
    assert set(train.images.names) < {f"{i:06d}.jpg" for i in range(1, 7)}
    assert _module(tmp_path, seed=1).sets == {}  # nothing read before setup
    y, target = test[0]
    assert target.clean.shape == (3, 32, 32) and y.shape == (3, 32, 32)
    assert float(target.clean.min()) >= 0 and float(target.clean.max()) <= 1
    assert float(target.clean.std()) > 0.05  # a photograph, not a blank
    batch = next(iter(module.train_dataloader()))
    assert batch[0].shape == (2, 3, 32, 32)
    module.prepare_data()  # present: nothing fetched again
    assert len(fake_drive) == 2 * len(CelebA.file_list)  # torchvision's own md5 check skips


def test_missing_celeba_is_refused_with_the_download_command(tmp_path):
    with pytest.raises(InputNotFound, match=r"CelebA not found.*download=true"):
        _module(tmp_path).setup("fit")


def test_a_split_larger_than_the_data_is_refused(tmp_path, fake_drive):
    module = _module(tmp_path, download=True, val_size=5)
    module.prepare_data()
    with pytest.raises(ValueError, match=r"val_size=5: the val split has 3 images"):
        module.setup("fit")


def test_the_authors_experiment_runs_end_to_end_at_toy_size(tmp_path, fake_drive):
    """experiment=deq_deblur_celeba with only its sizes shrunk (images, denoiser, solver
    budget): the zero-padded 5x5 blur, the ridge start, DnCNN with batch normalization under
    spectral normalization, clamping, and the step-decay schedule train and test."""
    from deqlab.runner.main import run

    from .helpers.runs import compose_cfg, metrics

    overrides = [
        "experiment=deq_deblur_celeba",
        f"paths.data_dir={tmp_path / 'data'}",
        "task.datamodule.download=true",
        "task.image_size=16",
        "task.datamodule.train_size=4",
        "task.datamodule.val_size=2",
        "task.datamodule.batch_size=2",
        "task.module.net.width=4",
        "task.module.net.depth=3",
        "solver.max_iter=4",
        "solver.eval_max_iter=4",
        "grad.max_iter=4",
        "optim.optimizer.lr=1e-3",
        "optim.milestones=[2]",
        "trainer=cpu",
        "trainer.max_epochs=2",
        "trainer.num_sanity_val_steps=0",
        "trainer.log_every_n_steps=1",
        "logger=csv",
        "~callbacks.progress",
    ]
    run(compose_cfg(overrides, tmp_path / "run"))
    rows = metrics(tmp_path / "run")
    tested = next(r for r in rows if r.get("test/psnr"))
    assert float(tested["test/psnr"]) > 5 and tested.get("test/psnr_input")
    lrs = [float(r["train/lr"]) for r in rows if r.get("train/lr")]
    assert lrs and lrs[0] == pytest.approx(1e-3) and lrs[-1] == pytest.approx(1e-4)
    assert torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False)
