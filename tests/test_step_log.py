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
        self.values: list[tuple[float, int, float]] = []  # each step's loss, nfe and rate

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        every = trainer.log_every_n_steps
        self.step = (trainer.global_step, (trainer.global_step + 1) % every == 0)
        self.rate = module.optimizers().param_groups[0]["lr"]  # this step's

    def on_train_epoch_end(self, trainer, module) -> None:
        self.step = None

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        step = self.step
        self.step = None  # the test's own reads
        self.values.append((float(outputs["task_loss"]), outputs["info"].nfe, self.rate))
        self.step = step

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
    return watch, handed, rows


def test_step_metrics_are_read_only_at_the_logging_steps(tmp_path, monkeypatch):
    watch, handed, rows = train(tmp_path, monkeypatch)
    reads = watch.reads
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
    # each logging step logs the mean of the steps since the last (the rate: its latest)
    for row, steps in zip(loss_rows, (range(0, 3), range(3, 6))):
        loss, nfe, lr = zip(*(watch.values[k] for k in steps))
        assert float(row["train/loss"]) == pytest.approx(sum(loss) / 3, rel=1e-6)
        assert float(row["deq/fwd_nfe"]) == pytest.approx(sum(nfe) / 3, rel=1e-6)
        assert float(row["train/lr"]) == pytest.approx(lr[-1], rel=1e-6)


def test_every_step_is_logged_when_the_loggers_write_every_step(tmp_path, monkeypatch):
    watch, _, rows = train(tmp_path, monkeypatch, steps=4, every=1)
    logged = [r for r in rows if r.get("train/loss")]
    assert [int(r["step"]) for r in logged] == [0, 1, 2, 3]
    for row, (loss, _, _) in zip(logged, watch.values):
        assert float(row["train/loss"]) == pytest.approx(loss, rel=1e-6)


def test_what_reaches_lightning_in_and_out_of_a_training_step():
    from torchmetrics import MeanMetric

    from deqlab.runner.step_log import StepLogging

    seen = []

    def base_log(self, name, value, **kwargs):
        seen.append((name, value, kwargs))

    probe = StepLogging()
    with pytest.MonkeyPatch.context() as m:
        m.setattr(L.LightningModule, "log", base_log)
        probe._current_fx_name = "validation_step"
        probe.log("a", 3, sync_dist=True)  # a collective's: left for Lightning to place
        probe.log("b", 3)
        probe.log("c", True)
        probe._current_fx_name = "training_step"
        probe.log("d", torch.tensor(1.0), True)  # prog_bar, by position
        probe.log("d", torch.tensor(2.0), True)
        probe.log("half", torch.tensor(1.0, dtype=torch.bfloat16))
        probe.log("half", torch.tensor(2.0**-9, dtype=torch.bfloat16))  # lost in a bf16 sum
        probe.log("rate", 0.5, step_reduce="last")
        probe.log("rate", 0.25, step_reduce="last")
        probe.log("acc", MeanMetric())  # a Metric object computes itself: Lightning's
        with pytest.raises(ValueError, match="step_reduce must be mean or last"):
            probe.log("e", 1.0, step_reduce="max")
        assert [name for name, _, _ in seen] == ["a", "b", "c", "acc"]
        probe.log_pending()
    (_, a, _), (_, b, _), (_, c, _) = seen[:3]
    assert a == 3 and isinstance(a, int)
    assert isinstance(b, torch.Tensor) and b.device.type == "cpu" and float(b) == 3
    assert c is True
    (_, d, d_options), (_, half, _), (_, rate, _) = seen[4:]
    assert float(d) == 1.5 and d_options == {"prog_bar": True}
    assert half.dtype == torch.float32 and float(half) == (1 + 2.0**-9) / 2
    assert float(rate) == 0.25 and probe.pending == {}


def fit_resumable(tmp_path: Path, data: Path, name: str, ckpt: Path | None = None):
    """The tiny CIFAR model trained for 8 steps (from ``ckpt`` if given), logging every 3
    and checkpointing after every step (inside the step's hooks); its logged losses."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    cfg = compose_cfg(
        [*TINY, f"paths.data_dir={data}", "trainer.log_every_n_steps=3"], tmp_path / name
    )
    datamodule = hydra.utils.instantiate(cfg.task.datamodule)
    module = hydra.utils.instantiate(cfg.task.module)
    every = ModelCheckpoint(tmp_path / name, "{step}", every_n_train_steps=1, save_top_k=-1)
    trainer = hydra.utils.instantiate(
        cfg.trainer,
        max_steps=8,
        limit_val_batches=0,
        logger=CSVLogger(tmp_path / name, name="", version=""),
        callbacks=[every],
        enable_model_summary=False,
    )
    trainer.fit(module, datamodule, ckpt_path=ckpt)
    with open(tmp_path / name / "metrics.csv") as f:
        return {r["step"]: r["train/loss"] for r in csv.DictReader(f) if r.get("train/loss")}


def test_a_resumed_run_logs_the_means_the_uninterrupted_run_logs(tmp_path):
    """The sums between logging steps travel in the checkpoint: resumed from the checkpoint
    written inside step 3 (its loss pending) or inside logging step 2 (whose means are logged
    before the step ends: nothing pending), the run logs at step 5 the mean of steps 3-5 that
    the uninterrupted run logs, to the last bit."""
    data = write_cifar_folder(tmp_path / "data", train_per_class=8)
    full = fit_resumable(tmp_path, data, "full")
    assert list(full) == ["2", "5"]
    for name, step in (("inside_3", 4), ("inside_2", 3)):  # the checkpoints' global steps
        resumed = fit_resumable(tmp_path, data, name, tmp_path / "full" / f"step={step}.ckpt")
        assert resumed == {"5": full["5"]}, name
