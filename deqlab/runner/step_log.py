"""Training-step metrics without host synchronization.

On a GPU a DEQ training step need read the device only at its solvers' convergence tests (one
read per test, or per ``check_every`` steps). ``LightningModule.log`` adds more: a Python
number is copied to the device (a blocking copy), and a progress-bar tensor is read back after
every step, each a synchronization that stalls the host until the GPU has drained its queue.

:class:`StepLogging` logs a training step's metrics (``self.log`` in ``training_step`` and the
train-batch hooks, without ``on_epoch``) only at the steps the loggers write, every
``trainer.log_every_n_steps`` as Lightning decides. It passes numbers as CPU tensors (unless
``sync_dist`` needs them on the device), and a step's progress-bar values as CPU copies, read
at the logging step where the loggers read anyway: Lightning reads the bar's values after
every step, logged or not. What the loggers receive is unchanged: each logged step's own
values. The progress bar and ``trainer.callback_metrics`` show a step metric as of the last
logging step.
"""

from __future__ import annotations

import numbers
from typing import Any

import lightning as L
import torch

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


def host_scalar(value: torch.Tensor | float) -> torch.Tensor:
    """``value`` in a CPU tensor (read back now, when it is a device tensor)."""
    return torch.tensor(float(value), dtype=torch.get_default_dtype())


class StepLogging(L.LightningModule):
    """``self.log`` as LightningModule's, without per-step device traffic (module docstring)."""

    def log(self, name: str, value: Any, *args: Any, **kwargs: Any) -> None:
        in_step = self._current_fx_name in STEP_HOOKS and not kwargs.get("on_epoch")
        if in_step and not self.writes_step_logs():
            return
        number = isinstance(value, numbers.Number) and not isinstance(value, bool)
        if in_step and kwargs.get("prog_bar") and isinstance(value, torch.Tensor):
            # the bar reads its values after every step until they are logged again
            value = host_scalar(value)
        elif number and not kwargs.get("sync_dist"):  # a collective needs the device's tensor
            value = host_scalar(value)
        super().log(name, value, *args, **kwargs)

    def writes_step_logs(self) -> bool:
        """Whether the loggers write this training step's metrics (Lightning's own test, the
        same from the step's first hook to its last)."""
        trainer = self.trainer
        return bool(trainer.fast_dev_run) or trainer._logger_connector.should_update_logs
