"""Training-step metrics without host synchronization.

On a GPU a DEQ training step need read the device only at its solvers' convergence tests (one
read per test, or per ``check_every`` steps). ``LightningModule.log`` adds more: a Python
number is copied to the device (a blocking copy), and a progress-bar tensor is read back after
every step, each a synchronization that stalls the host until the GPU has drained its queue.

:class:`StepLogging` keeps a training step's metrics (``self.log`` in ``training_step`` and
the train-batch hooks, without ``on_epoch``) on the side, summed where they are (a device
tensor on the device, a number on the host), and logs at the steps the loggers write (every
``trainer.log_every_n_steps``, as Lightning decides) each metric's mean over the steps since
the last logging step, as the DEQ reference code reports its training loss over each log
interval. A metric that is a state rather than a per-step quantity (the learning rate, the
elapsed time) is logged with ``step_reduce="last"``: its latest value. Numbers reach
Lightning as CPU tensors (unless ``sync_dist`` needs them on the device), progress-bar values
as CPU copies read at the logging step, where the loggers read anyway. The progress bar and
``trainer.callback_metrics`` show a step metric as of the last logging step; with
``trainer.log_every_n_steps=1`` every step is logged with its own values. The sums travel in
the checkpoint, so a resumed run logs what the uninterrupted one logs.
"""

from __future__ import annotations

import inspect
import numbers
from dataclasses import dataclass, field
from typing import Any

import lightning as L
import torch
from torch import Tensor

# the hooks a training step runs, in which Lightning logs on_step by default
STEP_HOOKS = frozenset(
    {
        "training_step",
        "on_train_batch_start",
        "on_train_batch_end",
        "on_before_backward",
        "on_after_backward",
        "on_before_optimizer_step",
        "on_before_zero_grad",
        "optimizer_step",
    }
)
CHECKPOINT_KEY = "deqlab_step_logs"
# LightningModule.log's options after (name, value), for calls that give some by position
LOG_OPTIONS = tuple(inspect.signature(L.LightningModule.log).parameters)[3:]


def host_scalar(value: Tensor | float) -> Tensor:
    """``value`` in a CPU tensor (read back now, when it is a device tensor)."""
    return torch.tensor(float(value), dtype=torch.get_default_dtype())


@dataclass
class Pending:
    """One metric between logging steps: its sum (or latest value) and step count, and the
    ``self.log`` arguments it is logged with."""

    total: Tensor | float
    count: int
    reduce: str
    options: dict[str, Any] = field(default_factory=dict)

    def value(self) -> Tensor | float:
        return self.total / self.count if self.reduce == "mean" else self.total


class StepLogging(L.LightningModule):
    """``self.log`` as LightningModule's, without per-step device traffic (module docstring).

    A subclass that overrides ``on_train_batch_end`` calls ``super().on_train_batch_end`` at
    its end: that is where a logging step's means are logged.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.pending: dict[str, Pending] = {}

    def log(
        self, name: str, value: Any, *args: Any, step_reduce: str = "mean", **kwargs: Any
    ) -> None:
        """``LightningModule.log``; in a training step, ``step_reduce`` says what a logging
        step logs of the steps since the last: ``mean`` or ``last``."""
        kwargs = {**dict(zip(LOG_OPTIONS, args)), **kwargs}
        if self._current_fx_name in STEP_HOOKS and not kwargs.get("on_epoch"):
            if step_reduce not in ("mean", "last"):
                raise ValueError(f"step_reduce must be mean or last, got {step_reduce!r}")
            self._keep(name, value, step_reduce, kwargs)
            return
        number = isinstance(value, numbers.Number) and not isinstance(value, bool)
        if number and not kwargs.get("sync_dist"):  # a collective needs the device's tensor
            value = host_scalar(value)
        super().log(name, value, **kwargs)

    def _keep(self, name: str, value: Any, reduce: str, kwargs: dict) -> None:
        if isinstance(value, Tensor):  # summed in at least float32 (a bf16 loss would round)
            value = value.detach()
            value = value.float() if value.dtype in (torch.float16, torch.bfloat16) else value
        elif not isinstance(value, numbers.Number) or isinstance(value, bool):
            return super().log(name, value, **kwargs)  # a Metric object: Lightning's own way
        kept = self.pending.get(name)
        if kept is None or reduce == "last":
            self.pending[name] = Pending(value, 1, reduce, kwargs)
        else:
            kept.total, kept.count, kept.options = kept.total + value, kept.count + 1, kwargs

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.writes_step_logs():
            self.log_pending()

    def log_pending(self) -> None:
        """Log every kept metric's mean (or latest value), and start the next interval."""
        pending, self.pending = self.pending, {}
        for name, kept in pending.items():
            value = kept.value()
            if kept.options.get("prog_bar") or not isinstance(value, Tensor):
                value = host_scalar(value)  # the bar reads its values after every step
            super().log(name, value, **kept.options)

    def writes_step_logs(self) -> bool:
        """Whether the loggers write this training step's metrics (Lightning's own test, the
        same from the step's first hook to its last)."""
        trainer = self.trainer
        return bool(trainer.fast_dev_run) or trainer._logger_connector.should_update_logs

    def in_training_step(self) -> bool:
        """Whether a training batch has started and not yet ended (its hooks included)."""
        if self._trainer is None:  # a module saved outside a Trainer
            return False
        progress = self.trainer.fit_loop.epoch_loop.batch_progress.current
        return self.trainer.training and progress.ready > progress.completed

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        # Inside a logging step (a checkpoint written by a callback's on_train_batch_end), the
        # sums are logged and emptied before the step ends: a resumed run starts without them.
        logging_now = self.in_training_step() and self.writes_step_logs()
        checkpoint[CHECKPOINT_KEY] = {
            name: {
                "total": kept.total.cpu() if isinstance(kept.total, Tensor) else kept.total,
                "count": kept.count,
                "reduce": kept.reduce,
                "options": kept.options,
            }
            for name, kept in ({} if logging_now else self.pending).items()
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        self.pending = {
            name: Pending(**kept) for name, kept in checkpoint.get(CHECKPOINT_KEY, {}).items()
        }
