"""DEQLitModule: the training logic every DEQ task shares.

A task module subclasses it and supplies a network with three parts,

    net.inject(x) -> (u, z0)     input injection, computed once per batch, and the initial state
    net.cell(z, u) -> z          the equilibrium cell f(z; u)
    net.head(z) -> output        what the loss and metrics read

plus ``criterion(output, target)`` and ``update_metrics(split, output, target)``. Everything
else lives here: the solve (with unrolled pre-training, budget jitter and sampled states),
Jacobian regularization on its schedule, fixed-point correction, solver statistics under
``deq/``, the residual-trace figure, optimizer and learning-rate schedule.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn

from .checkpoint import check_compatible
from .core import DEQ, DEQInfo, GradConfig, SolverConfig, to_config
from .dropout import reset_dropout
from .loggers import log_figure, residual_trace_figure
from .norm import NormConfig, apply_norm
from .regularize import fp_correction, spectral_radius
from .solvers import State


@dataclass
class JacRegConfig:
    """Jacobian regularization schedule (the ``jac_reg`` config group; Bai et al., 2021).

    The penalty weight * ||J_f(z*)||_F^2 / dim joins the loss on a random ``freq`` share of
    training steps, estimated with ``vecs`` Hutchinson probes. With ``incremental > 0`` the
    weight grows by ``increment`` every ``incremental`` steps; from ``stop_epoch`` on it is off.
    """

    name: str = "none"  # none | hutchinson
    weight: float = 0.0
    freq: float = 1.0
    vecs: int = 1
    incremental: int = 0
    increment: float = 0.1
    stop_epoch: int | None = None

    def __post_init__(self) -> None:
        if self.name not in ("none", "hutchinson"):
            raise ValueError(f"jac_reg.name must be 'none' or 'hutchinson', got {self.name!r}")
        if not 0 <= self.freq <= 1:
            raise ValueError(f"jac_reg.freq is a probability in [0, 1], got {self.freq}")

    def weight_at(self, step: int, epoch: int) -> float:
        if self.name == "none" or (self.stop_epoch is not None and epoch >= self.stop_epoch):
            return 0.0
        if self.incremental > 0:
            return self.weight + self.increment * (step // self.incremental)
        return self.weight


@dataclass
class OptimConfig:
    name: str = "adam"  # adam | adamw | sgd
    lr: float = 1e-3
    weight_decay: float = 0.0
    momentum: float = 0.9  # sgd only
    # learning-rate schedule, stepped every optimizer step
    schedule: str = "cosine"  # cosine | constant
    warmup_steps: int = 0
    min_lr: float = 0.0

    def __post_init__(self) -> None:
        if self.name not in ("adam", "adamw", "sgd"):
            raise ValueError(f"optim.name must be adam, adamw or sgd, got {self.name!r}")
        if self.schedule not in ("cosine", "constant"):
            raise ValueError(f"optim.schedule must be cosine or constant, got {self.schedule!r}")


@dataclass
class FitConfig:
    """How the equilibrium is trained.

    pretrain_steps / pretrain_unroll: for the first steps, run the cell as a weight-tied
    network of ``pretrain_unroll`` layers with ordinary backprop (Bai et al., 2019, 2020).
    jitter: the forward budget of each step is drawn uniformly from max_iter +- jitter.
    fp_states, fp_weight, fp_gamma: fixed-point correction over that many trajectory states.
    sradius_iters: power-method steps for ``deq/sradius`` at validation (0: off).
    trace_samples: samples drawn in the validation residual-trace figure (0: off).
    """

    pretrain_steps: int = 0
    pretrain_unroll: int = 0
    jitter: int = 0
    fp_states: int = 1
    fp_weight: str = "exp"
    fp_gamma: float = 0.8
    sradius_iters: int = 0
    trace_samples: int = 4

    def __post_init__(self) -> None:
        if self.pretrain_steps > 0 and self.pretrain_unroll < 1:
            raise ValueError("fit.pretrain_steps > 0 needs fit.pretrain_unroll >= 1")
        if self.fp_states < 1:
            raise ValueError("fit.fp_states must be >= 1 (1 = no fixed-point correction)")


class DEQLitModule(L.LightningModule):
    """Shared DEQ training logic; see the module docstring for what a task adds."""

    net: nn.Module

    def __init__(
        self,
        net: nn.Module | None,
        solver: Mapping[str, Any] | SolverConfig | None = None,
        grad: Mapping[str, Any] | GradConfig | None = None,
        norm: Mapping[str, Any] | NormConfig | None = None,
        jac_reg: Mapping[str, Any] | JacRegConfig | None = None,
        optim: Mapping[str, Any] | OptimConfig | None = None,
        fit: Mapping[str, Any] | FitConfig | None = None,
        seed: int = 0,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["net"])
        self.deq = DEQ(solver, grad)
        self.norm_cfg = to_config(NormConfig, norm, "norm")
        self.jac_cfg = to_config(JacRegConfig, jac_reg, "jac_reg")
        self.optim_cfg = to_config(OptimConfig, optim, "optim")
        self.fit_cfg = to_config(FitConfig, fit, "fit")
        self.seed = seed
        self.net = None
        if net is not None:
            self.attach_net(net)
        self._infos: list[DEQInfo] = []
        self._jac_this_step = False
        self._first_val_batch = False
        self._val_trace: Tensor | None = None
        self._epoch_t0: float | None = None  # perf_counter() at the epoch's start
        self._fit_t0: float | None = None  # perf_counter() at the start of training

    def attach_net(self, net: nn.Module) -> None:
        """Install the network and normalize its cell. Tasks whose network depends on the data
        (e.g. a vocabulary size) pass ``net=None`` and call this from ``setup``."""
        self.net = net
        n = self.norm_cfg
        apply_norm(
            net.cell,
            n.kind,
            exclude=n.exclude,
            learn_scale=n.learn_scale,
            target_norm=n.target_norm,
            power_iters=n.power_iters,
        )

    # -- the solve ---------------------------------------------------------------------------

    def equilibrium(self, f: Callable[[State], State], z0: State) -> list[State]:
        """Solve z = f(z) and return the states the loss should read (last = the equilibrium).

        Records the solve's statistics for logging; in unrolled pre-training it runs
        ``pretrain_unroll`` plain steps with ordinary backprop instead.
        """
        t = self.fit_cfg
        if self.training and self.global_step < t.pretrain_steps:
            z = z0
            for _ in range(t.pretrain_unroll):
                z = f(z)
            return [z]
        kwargs: dict[str, Any] = {}
        if self.training and torch.is_grad_enabled():
            budget = self.deq.solver_cfg.max_iter
            if t.jitter > 0:
                low = max(1, budget - t.jitter)
                budget = int(torch.randint(low, budget + t.jitter + 1, ()).item())
            kwargs = {"max_iter": budget, "n_states": t.fp_states}
            if self._jac_this_step:
                kwargs["jac_vecs"] = self.jac_cfg.vecs
        z, info = self.deq(f, z0, **kwargs)
        self._infos.append(info)
        if not self.training and self._first_val_batch and t.sradius_iters > 0:
            self.log("deq/sradius", spectral_radius(f, z, t.sradius_iters).mean(), sync_dist=True)
        return info.states

    def forward(self, x: Tensor) -> list[Tensor]:
        """Outputs of ``net.head`` for each returned state (the last is the equilibrium's)."""
        u, z0 = self.net.inject(x)
        states = self.equilibrium(lambda z: self.net.cell(z, u), z0)
        return [self.net.head(s) for s in states]

    # -- what a task supplies ---------------------------------------------------------------

    def criterion(self, output: Tensor, target: Tensor) -> Tensor:
        raise NotImplementedError

    def update_metrics(self, split: str, output: Tensor, target: Tensor) -> None:
        raise NotImplementedError

    # -- steps ------------------------------------------------------------------------------

    def on_train_epoch_start(self) -> None:
        self._epoch_t0 = time.perf_counter()

    def on_train_epoch_end(self) -> None:
        if self._epoch_t0 is not None:
            self.log("train/epoch_time_s", time.perf_counter() - self._epoch_t0)
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device) / 2**20
            self.log("train/peak_cuda_mem_mb", peak)
            torch.cuda.reset_peak_memory_stats(self.device)

    def on_fit_start(self) -> None:
        if self._fit_t0 is None:  # else restored from a checkpoint
            self._fit_t0 = time.perf_counter()

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        # wall-clock time of training so far, across resumes: for metric-against-time plots
        if self._fit_t0 is not None:
            self.log("train/elapsed_s", time.perf_counter() - self._fit_t0)

    # A run resumed mid-epoch does not call on_train_epoch_start again: whatever an epoch
    # accumulates travels in the checkpoint (here the elapsed times; tasks add their own).
    # The writer's class is stored so that a checkpoint of another task is refused by name.
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        now = time.perf_counter()
        checkpoint["deqlab_epoch_elapsed_s"] = (
            0.0 if self._epoch_t0 is None else now - self._epoch_t0
        )
        checkpoint["deqlab_fit_elapsed_s"] = 0.0 if self._fit_t0 is None else now - self._fit_t0
        checkpoint["deqlab_module"] = self.qualified_name()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        reader = self.qualified_name()
        check_compatible(checkpoint, self, checkpoint.get("deqlab_module", reader), reader)
        now = time.perf_counter()
        self._epoch_t0 = now - checkpoint.get("deqlab_epoch_elapsed_s", 0.0)
        self._fit_t0 = now - checkpoint.get("deqlab_fit_elapsed_s", 0.0)

    @classmethod
    def qualified_name(cls) -> str:
        return f"{cls.__module__}.{cls.__qualname__}"

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # Each step's randomness (dropout masks, budget jitter, whether to regularize) is a
        # function of (seed, rank, step) alone, so a resumed run repeats it exactly.
        torch.manual_seed(self.seed * 1_000_003 + self.global_rank * 7_919 + self.global_step)
        reset_dropout(self)
        self._infos = []
        jac_w = self.jac_cfg.weight_at(self.global_step, self.current_epoch)
        self._jac_this_step = jac_w > 0 and bool(torch.rand(()) < self.jac_cfg.freq)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        outputs = self(x)
        t = self.fit_cfg
        if len(outputs) > 1:
            loss = fp_correction(self.criterion, outputs, y, t.fp_weight, t.fp_gamma)
        else:
            loss = self.criterion(outputs[-1], y)
        self.log("train/loss", loss, prog_bar=True)
        self.update_metrics("train", outputs[-1].detach(), y)
        self.log_solver_stats("fwd", self._infos)
        return loss + self.jacobian_penalty()

    def jacobian_penalty(self) -> Tensor | float:
        """Weighted Jacobian loss of this step's solves (0 when not scheduled)."""
        losses = [i.jac_loss for i in self._infos if i.jac_loss is not None]
        if not losses:
            return 0.0
        jac = torch.stack(losses).mean()
        self.log("deq/jac_loss", jac.detach())
        return self.jac_cfg.weight_at(self.global_step, self.current_epoch) * jac

    def on_after_backward(self) -> None:
        done = [i.backward for i in self._infos if i.backward is not None]
        if done:
            self.log("deq/bwd_nfe", sum(r.nfe for r in done) / len(done))
            self.log("deq/bwd_rel_residual", torch.cat([r.rel_residual for r in done]).mean())

    def log_solver_stats(self, prefix: str, infos: list[DEQInfo], **kw: Any) -> None:
        if not infos:
            return
        self.log(f"deq/{prefix}_nfe", sum(i.nfe for i in infos) / len(infos), **kw)
        self.log(
            f"deq/{prefix}_rel_residual", torch.cat([i.rel_residual for i in infos]).mean(), **kw
        )
        self.log(
            f"deq/{prefix}_abs_residual", torch.cat([i.abs_residual for i in infos]).mean(), **kw
        )

    def _eval_step(self, batch: Any, batch_idx: int, split: str) -> Tensor:
        x, y = batch
        self._infos = []
        self._first_val_batch = split == "val" and batch_idx == 0
        output = self(x)[-1]
        loss = self.criterion(output, y)
        self.log(f"{split}/loss", loss, sync_dist=True, prog_bar=split == "val")
        self.update_metrics(split, output, y)
        self.log_solver_stats(f"{split}_fwd", self._infos, sync_dist=True)
        if self._first_val_batch and self._infos and self.fit_cfg.trace_samples > 0:
            self._val_trace = self._infos[0].trace[:, : self.fit_cfg.trace_samples].float().cpu()
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._eval_step(batch, batch_idx, "val")

    def test_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._eval_step(batch, batch_idx, "test")

    def on_validation_epoch_end(self) -> None:
        # figures come from rank 0 alone: another rank would open a logger folder of its own
        if (
            self._val_trace is not None
            and not self.trainer.sanity_checking
            and self.trainer.is_global_zero
        ):
            fig = residual_trace_figure(self._val_trace, self.current_epoch)
            log_figure(self.loggers, "deq/residual_trace", fig, self.global_step, self._val_trace)
        self._val_trace = None

    # -- optimization -------------------------------------------------------------------------

    def configure_optimizers(self) -> dict[str, Any]:
        o = self.optim_cfg
        params = [p for p in self.parameters() if p.requires_grad]
        if o.name == "adam":
            opt: torch.optim.Optimizer = torch.optim.Adam(
                params, lr=o.lr, weight_decay=o.weight_decay
            )
        elif o.name == "adamw":
            opt = torch.optim.AdamW(params, lr=o.lr, weight_decay=o.weight_decay)
        else:
            opt = torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        floor = o.min_lr / o.lr if o.lr > 0 else 0.0

        def factor(step: int) -> float:
            if step < o.warmup_steps:
                return (step + 1) / o.warmup_steps
            if o.schedule == "constant":
                return 1.0
            progress = min(1.0, (step - o.warmup_steps) / max(1, total - o.warmup_steps))
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {
            "optimizer": opt,
            "lr_scheduler": {"scheduler": sched, "interval": "step", "name": "train/lr"},
        }
