"""A run killed with SIGKILL, twice, and resumed each time from its run folder ends with the
same weights and metrics as the run that was never interrupted: mid-epoch, with augmentation,
budget jitter, Jacobian regularization and variational dropout (CIFAR), the same with warm starts carried across
training (init=cached: the cache travels in the checkpoint), and with segment memory (language
model)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from .helpers.runs import (
    CLI_ENV,
    TINY,
    TINY_LM,
    last_value,
    metrics,
    run_cli,
    write_cifar_folder,
    write_ptb_folder,
)

pytestmark = pytest.mark.slow

# 32 training images in batches of 8: 4 steps an epoch, validated (and checkpointed as
# last.ckpt) every 2 steps, so checkpoints alternate between the middle and the end of an epoch.
CIFAR = [
    *TINY,
    "task.datamodule.val_size=28",
    "trainer.max_epochs=3",
    "+trainer.val_check_interval=2",
    "task.datamodule.augment=true",
    "jac_reg=hutchinson",
    "task.module.fit.jitter=1",
    "trainer.log_every_n_steps=3",  # training metrics: means over 3 steps, which a kill splits
    "task.module.net.dropout=0.2",  # masks redrawn in place each batch, their kinds restored
]
# 300 lines of 9 tokens in 4 streams of 8-token segments: 85 steps, checkpoints every 20.
LM = [*TINY_LM, "+trainer.val_check_interval=20"]


def launch(args: list[str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "deqlab", *args],
        cwd=cwd,
        env={**os.environ, **CLI_ENV},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def kill_after_checkpoint(
    args: list[str], cwd: Path, ckpt: Path, at_step=lambda step: True, timeout: float = 300
) -> int:
    """Start a run, SIGKILL it as soon as it has written a new ``ckpt`` whose global step
    satisfies ``at_step``; return the global step of the checkpoint it left."""
    before = ckpt.stat().st_mtime_ns if ckpt.exists() else None

    def new_checkpoint() -> bool:
        if not ckpt.exists() or ckpt.stat().st_mtime_ns == before:
            return False
        return at_step(torch.load(ckpt, weights_only=True, mmap=True)["global_step"])

    proc = launch(args, cwd)
    deadline = time.monotonic() + timeout
    while not new_checkpoint():
        if proc.poll() is not None:
            raise AssertionError(
                f"the run ended (exit {proc.returncode}) before it could be killed:\n{proc.stderr.read()[-3000:]}"
            )
        assert time.monotonic() < deadline, "no new checkpoint in time"
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    return torch.load(ckpt, weights_only=True)["global_step"]


def weights(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]


@pytest.mark.parametrize("task", ["cifar", "cifar_warm", "lm"])
def test_run_killed_twice_resumes_to_the_uninterrupted_result(task, tmp_path):
    if task.startswith("cifar"):
        data, args, keys = write_cifar_folder(tmp_path / "data"), CIFAR, ("val/acc", "test/acc")
        args = [*args, "init=cached"] if task == "cifar_warm" else args
        steps_per_epoch = 4
    else:
        data, args, keys = write_ptb_folder(tmp_path / "data"), LM, ("val/ppl", "test/ppl")
        steps_per_epoch = 85
    args = [*args, f"paths.data_dir={data}"]
    full, killed = tmp_path / "full", tmp_path / "killed"
    run_cli([*args, f"hydra.run.dir={full}"], tmp_path)

    ckpt = killed / "checkpoints" / "last.ckpt"
    first = kill_after_checkpoint([*args, f"hydra.run.dir={killed}"], tmp_path, ckpt)
    assert first % steps_per_epoch != 0  # killed after a checkpoint in the middle of an epoch
    resume = [*args, f"hydra.run.dir={killed}", "ckpt_path=last"]
    if task.startswith("cifar"):  # then after one at the end of an epoch
        second = kill_after_checkpoint(resume, tmp_path, ckpt, lambda s: s % steps_per_epoch == 0)
        assert second % steps_per_epoch == 0
    else:
        second = kill_after_checkpoint(resume, tmp_path, ckpt)
    assert first < second  # the resumed launch made progress before its kill
    run_cli(resume, tmp_path)

    a, b = weights(full), weights(killed)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    rows_full, rows_killed = metrics(full), metrics(killed)
    for key in (*keys, "val/loss", "train/loss"):
        assert last_value(rows_killed, key) == last_value(rows_full, key), key
    logged = {r["step"]: r["train/loss"] for r in rows_full if r.get("train/loss")}
    resumed = {r["step"]: r["train/loss"] for r in rows_killed if r.get("train/loss")}
    assert resumed and all(logged[step] == loss for step, loss in resumed.items())
