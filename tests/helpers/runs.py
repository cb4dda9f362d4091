"""Helpers for runner tests: a tiny CIFAR-shaped image folder and in-process composition."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback

from deqlab.runner.config import compose as compose_cfg
from deqlab.tasks.cifar.data import CLASSES

ROOT = Path(__file__).resolve().parents[2]  # the repository

# Small enough to train in seconds: 8-channel cell, 4 solver steps, no progress bar.
TINY = [
    "trainer=cpu",
    "trainer.max_epochs=1",
    "trainer.log_every_n_steps=1",
    "trainer.num_sanity_val_steps=0",
    "task.datamodule.batch_size=8",
    "task.datamodule.eval_batch_size=16",
    "task.datamodule.val_size=16",
    "task.datamodule.num_workers=0",
    "task.module.net.channels=8",
    "task.module.net.inner=8",
    "task.module.net.groups=2",
    "solver.max_iter=4",
    "~callbacks.progress",
]


# A DEQ-Transformer small enough to train on a tiny corpus in seconds.
TINY_LM = [
    "task=ptb",
    "trainer=cpu",
    "trainer.max_epochs=1",
    "trainer.num_sanity_val_steps=0",
    "task.datamodule.batch_size=4",
    "task.datamodule.tgt_len=8",
    "task.module.mem_len=8",
    "task.module.net.d_model=16",
    "task.module.net.n_head=2",
    "task.module.net.d_head=8",
    "task.module.net.d_inner=32",
    "solver.max_iter=6",
    "grad.max_iter=6",
    "~callbacks.progress",
]


def write_ptb_folder(root: Path, lines: int = 300, learnable: bool = False) -> Path:
    """A Penn-Treebank-shaped corpus (ptb/ptb.{train,valid,test}.txt) of random sentences
    over 30 words (``learnable``: each sentence counts up from a random word, w_i w_i+1 ...,
    so that after its first word a model can predict it exactly)."""
    (root / "ptb").mkdir(parents=True, exist_ok=True)
    words = [f"w{i}" for i in range(30)]
    g = torch.Generator().manual_seed(0)

    def sentence() -> list[int]:
        if learnable:
            first = int(torch.randint(0, 30, (), generator=g))
            return [(first + k) % 30 for k in range(8)]
        return torch.randint(0, 30, (8,), generator=g).tolist()

    for split, n in (("train", lines), ("valid", 60), ("test", 60)):
        sentences = [" ".join(words[j] for j in sentence()) for _ in range(n)]
        (root / "ptb" / f"ptb.{split}.txt").write_text("\n".join(sentences) + "\n")
    return root


def write_cifar_folder(root: Path, train_per_class: int = 6, test_per_class: int = 2) -> Path:
    """An image-folder CIFAR-10 (cifar10/{train,test}/<class>/*.png) of random images whose
    mean colour depends on the class, so that a model can learn something."""
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for split, n in (("train", train_per_class), ("test", test_per_class)):
        for label, cls in enumerate(CLASSES):
            d = root / "cifar10" / split / cls
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                base = torch.full((3, 32, 32), 20.0 * label + 30)
                img = (
                    (base + 25 * torch.randn(3, 32, 32, generator=g)).clamp(0, 255).to(torch.uint8)
                )
                Image.fromarray(img.permute(1, 2, 0).numpy()).save(d / f"{i:04d}.png")
    return root


CLI_ENV = {"PYTHONPATH": str(ROOT), "WANDB_MODE": "offline"}


def run_cli(
    args: list[str], cwd: Path, timeout: int = 600, check: bool = True
) -> subprocess.CompletedProcess:
    """``python -m deqlab *args`` in ``cwd``; with ``check``, it must exit 0."""
    proc = subprocess.run(
        [sys.executable, "-m", "deqlab", *args],
        cwd=cwd,
        env={**os.environ, **CLI_ENV},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check:
        assert proc.returncode == 0, (
            f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
        )
    return proc


def wait_for(probe, timeout: float = 120, every: float = 0.1):
    """``probe()``'s first truthy value, polled until ``timeout`` seconds (then its last)."""
    deadline = time.monotonic() + timeout
    while not (value := probe()) and time.monotonic() < deadline:
        time.sleep(every)
    return value


class StopAfterEpoch(Callback):
    """Ends fit after ``epoch`` as if the process were killed right after that epoch's
    checkpoint was written (the run's config, LR schedule included, is unchanged)."""

    def __init__(self, epoch: int = 0):
        self.epoch = epoch

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.current_epoch >= self.epoch and not trainer.sanity_checking:
            trainer.should_stop = True


def short_real_cifar_run(
    experiment: str, data_dir: Path, output_dir: Path, epochs: int = 1
) -> float:
    """Best validation accuracy of ``epochs`` epochs of ``experiment`` on 3500 real training
    images."""
    from deqlab.runner.main import run

    overrides = [
        f"experiment={experiment}",
        f"paths.data_dir={data_dir}",
        "task.datamodule.subset=4000",
        "task.datamodule.val_size=500",
        f"trainer.max_epochs={epochs}",
        "~callbacks.progress",
    ]
    return run(compose_cfg(overrides, output_dir))


class SendSignal(Callback):
    """Sends ``signal`` (a name) to this very process once, at the start of training step
    ``step`` (``during="train"``) or of the first validation batch after it
    (``during="validation"``): a real signal, arriving at a known point of a real run."""

    def __init__(self, signal: str, step: int, during: str = "train"):
        self.signal, self.step, self.during, self.sent = signal, step, during, False

    def _send(self, trainer) -> None:
        import signal as signals

        if not self.sent and trainer.global_step >= self.step:
            self.sent = True
            os.kill(os.getpid(), getattr(signals, self.signal))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.during == "train":
            self._send(trainer)

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, *args) -> None:
        if self.during == "validation" and not trainer.sanity_checking:
            self._send(trainer)


def metrics(run_dir: Path) -> list[dict[str, str]]:
    """Rows of the run's latest CSV log (each launch in a folder writes a new version)."""
    files = sorted(
        (run_dir / "csv").glob("version_*/metrics.csv"),
        key=lambda p: int(p.parent.name.split("_")[1]),
    )
    with open(files[-1]) as fh:
        return list(csv.DictReader(fh))


def last_value(rows: list[dict[str, str]], key: str) -> float:
    return float([r[key] for r in rows if r.get(key)][-1])
