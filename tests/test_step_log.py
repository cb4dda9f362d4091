"""Training-step metrics without host synchronization (:mod:`deqlab.runner.step_log`): they
reach the loggers at the logging steps, with each step's own values, and between those no code
of Lightning, torchmetrics, the runner or a task reads a tensor back or is handed a number to
copy to the device. Only the solve itself reads (its convergence tests)."""

from __future__ import annotations

import csv
import numbers
import sys
from pathlib import Path

import hydra
import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger

from deqlab.runner import step_log

from .helpers.runs import TINY, compose_cfg, write_cifar_folder

# What makes the host wait for the device: a value read back, or an op whose output size
# depends on the values (unique, nonzero).
READS = {
    torch.Tensor: ("item", "tolist", "numpy", "cpu", "__bool__", "__float__", "__int__", "__index__", "unique", "nonzero"),
    torch: ("unique", "nonzero"),
}  # fmt: skip
# Code that must not read between logging steps (the solve's own reads are deqlab/solvers,
# deqlab/core.py and deqlab/grad.py; torch's optimizers read their CPU step counters).
LOGGING_CODE = ("/lightning/", "/torchmetrics/", "/deqlab/runner/", "/tasks/")


class HostScalar(torch.Tensor):
    """The CPU tensors StepLogging hands Lightning (``host_scalar``), told apart from device
    tensors on a machine where every tensor is on the CPU."""


class ReadWatch(L.Callback):
    """Notes every read during a training step: (step, whether the loggers write that step,
    the file of the code that asked). A step's window opens at its first hook and closes at
    the next step's (so Lightning's own work after the step's hooks is inside it)."""

    def __init__(self) -> None:
        self.step: tuple[int, bool] | None = None
        self.reads: list[tuple[int, bool, str]] = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        every = trainer.log_every_n_steps
        self.step = (trainer.global_step, (trainer.global_step + 1) % every == 0)

    def on_train_epoch_end(self, trainer, module) -> None:
        self.step = None

    on_validation_start = on_train_end = on_train_epoch_end

    def note(self, fn):
        def watched(*args, **kwargs):
            on_host = args and isinstance(args[0], HostScalar)
            if self.step is not None and not on_host:
                self.reads.append((*self.step, sys._getframe(1).f_code.co_filename))
            return fn(*args, **kwargs)

        return watched


def train(tmp_path: Path, monkeypatch, steps: int = 8, every: int = 3):
    data = write_cifar_folder(tmp_path / "data", train_per_class=8)
    cfg = compose_cfg(
        [*TINY, f"paths.data_dir={data}", f"trainer.log_every_n_steps={every}"],
        tmp_path / "run",
    )
    datamodule = hydra.utils.instantiate(cfg.task.datamodule)
    module = hydra.utils.instantiate(cfg.task.module)
    watch = ReadWatch()
    handed: list[tuple[str, object]] = []
    log = L.LightningModule.log

    def recorded_log(self, name, value, *args, **kwargs):
        if not kwargs.get("sync_dist"):
            handed.append((name, value))
        return log(self, name, value, *args, **kwargs)

    make_host_scalar = step_log.host_scalar

    def host_scalar(value):  # marked: what Lightning makes of it (clones) stays marked
        return make_host_scalar(value).as_subclass(HostScalar)

    monkeypatch.setattr(L.LightningModule, "log", recorded_log)
    for owner, names in READS.items():
        for name in names:
            monkeypatch.setattr(owner, name, watch.note(getattr(owner, name)))
    monkeypatch.setattr(step_log, "host_scalar", host_scalar)
    trainer = hydra.utils.instantiate(
        cfg.trainer,
        max_steps=steps,
        limit_val_batches=0,
        logger=CSVLogger(tmp_path / "logs", name="", version=""),
        callbacks=[watch],
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    trainer.fit(module, datamodule)
    monkeypatch.undo()
    with open(tmp_path / "logs" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    return watch.reads, handed, rows


def test_step_metrics_are_read_only_at_the_logging_steps(tmp_path, monkeypatch):
    reads, handed, rows = train(tmp_path, monkeypatch)
    logging = [r for r in reads if any(part in r[2] for part in LOGGING_CODE)]
    between = [r for r in logging if not r[1]]
    assert between == [], f"reads between logging steps: {between[:10]}"
    # the watch sees the loggers' reads where they belong (so the test can fail)
    assert {step for step, writes, _ in logging if writes} == {2, 5}
    # the solves read at their convergence tests, at every step
    assert {step for step, _, path in reads if "/deqlab/solvers/" in path} == set(range(8))
    assert [n for n, v in handed if isinstance(v, numbers.Number)] == []
    loss_rows = [r for r in rows if r.get("train/loss")]
    assert [int(r["step"]) for r in loss_rows] == [2, 5]
    for key in ("train/lr", "train/acc", "deq/fwd_nfe", "deq/bwd_nfe", "train/elapsed_s"):
        assert all(r[key] for r in loss_rows), key


def test_every_step_is_logged_when_the_loggers_write_every_step(tmp_path, monkeypatch):
    _, _, rows = train(tmp_path, monkeypatch, steps=4, every=1)
    assert [int(r["step"]) for r in rows if r.get("train/loss")] == [0, 1, 2, 3]


def test_a_number_logged_with_sync_dist_is_left_for_lightning_to_place():
    from deqlab.runner.step_log import StepLogging

    seen = []

    class Probe(StepLogging):
        _current_fx_name = "validation_step"

    def base_log(self, name, value, *args, **kwargs):
        seen.append((value, kwargs))

    probe = Probe()
    with pytest.MonkeyPatch.context() as m:
        m.setattr(L.LightningModule, "log", base_log)
        probe.log("a", 3, sync_dist=True)
        probe.log("b", 3)
        probe.log("c", True)
    assert seen[0][0] == 3 and isinstance(seen[0][0], int)
    assert isinstance(seen[1][0], torch.Tensor) and seen[1][0].device.type == "cpu"
    assert seen[2][0] is True
