"""DEQLitModule: the training logic every DEQ task shares.

A task module subclasses it and supplies a network (the :class:`DEQNet` protocol: inject,
cell, head) plus ``criterion(output, target)`` and ``update_metrics(split, output, target)``.
Everything else lives here: the solve through a pluggable core (with unrolled pre-training,
budget jitter and sampled states), Jacobian regularization on its schedule, fixed-point
correction, solver statistics under ``deq/``, the residual-trace figure, optimizer and
learning-rate schedule.

Data flows through return values: ``forward`` returns the outputs and the solve's
:class:`DEQInfo`; the steps log from them, and the backward statistics (filled in during
``backward()``) are logged from the training step's output in ``on_train_batch_end``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import hydra.utils
import lightning as L
import torch
from torch import Tensor, nn

from .checkpoint import check_compatible, load_initial_weights
from .core import CoreConfig, DEQInfo, GradConfig, SolverConfig, build_core, to_config
from .data import mix_seed
from .dropout import reset_dropout
from .initial_state import InitConfig
from .loggers import log_figure, residual_trace_figure
from .norm import NormConfig, apply_norm
from .regularize import fp_correction, spectral_radius
from .state import State


class DEQNet(Protocol):
    """The network a task gives :class:`DEQLitModule`: three parts around the equilibrium.

    ``inject(x) -> (u, z0)``: input injection, computed once per batch, and a template of the
    state (its structure, shapes and dtype; the ``init`` group decides its values).
    ``cell(z, u) -> z``: the equilibrium cell f(z; u). ``head(z) -> output``: what the loss
    and the metrics read. ``cell`` must be an ``nn.Module`` (normalization applies to it).
    """

    cell: nn.Module

    def inject(self, x: Any) -> tuple[Any, State]: ...

    def head(self, z: State) -> Tensor: ...


@dataclass
class JacRegConfig:
    """Jacobian regularization schedule (the ``jac_reg`` config group; Bai et al., 2021).

    The penalty weight * ||J_f(z*)||_F^2 / dim joins the loss on a random ``freq`` share of
    the equilibrium-training steps (none during unrolled pre-training), estimated with ``vecs``
    Hutchinson probes. With ``incremental > 0`` the weight grows by ``increment`` every
    ``incremental`` steps, counted as the references count them: ``incremental_from: start``
    at every multiple of ``incremental`` global steps past pre-training (locuslab/deq's
    DEQ-Sequence), ``deq`` every ``incremental`` steps from the end of pre-training
    (MDEQ-Vision). From ``stop_epoch`` on it is off.
    """

    name: str = "none"  # none | hutchinson
    weight: float = 0.5
    freq: float = 0.5
    vecs: int = 1
    incremental: int = 0
    increment: float = 0.1
    incremental_from: str = "start"  # start | deq
    stop_epoch: int | None = None

    def __post_init__(self) -> None:
        if self.name not in ("none", "hutchinson"):
            raise ValueError(f"jac_reg.name must be 'none' or 'hutchinson', got {self.name!r}")
        if not 0 <= self.freq <= 1:
            raise ValueError(f"jac_reg.freq is a probability in [0, 1], got {self.freq}")
        if self.incremental_from not in ("start", "deq"):
            raise ValueError(
                f"jac_reg.incremental_from must be start or deq, got {self.incremental_from!r}"
            )
        if self.vecs < 1:
            raise ValueError(f"jac_reg.vecs must be >= 1, got {self.vecs}")

    def weight_at(self, step: int, epoch: int, pretrain_steps: int = 0) -> float:
        """The weight at global step ``step`` (steps done so far) of epoch ``epoch``."""
        off = self.stop_epoch is not None and epoch >= self.stop_epoch
        if self.name == "none" or off or step < pretrain_steps:
            return 0.0
        if self.incremental <= 0:
            return self.weight
        if self.incremental_from == "deq":
            grown = (step - pretrain_steps) // self.incremental
        else:  # the multiples of `incremental` in (pretrain_steps, step]
            grown = step // self.incremental - pretrain_steps // self.incremental
        return self.weight + self.increment * grown


@dataclass
class OptimConfig:
    """Optimizer and learning-rate schedule (the ``optim`` config group).

    ``optimizer``: a ``torch.optim`` class (or yours) as a Hydra ``_partial_`` node, called
    with the parameter groups. The schedule, stepped every optimizer step, is torch's own:
    ``warmup_steps`` of linear warmup (``LinearLR``), then ``cosine`` decay to ``min_lr`` over
    the remaining steps (``CosineAnnealingLR``) or ``constant``. ``anneal_over: all`` runs the
    cosine over all steps instead, the warmup replacing its start (step t >= warmup at
    min_lr + (lr - min_lr)(1 + cos(pi t / T)) / 2, as locuslab/deq's train_transformer.py
    anneals). ``decay_norms_and_biases``:
    false puts biases, normalization layers' parameters and weight/spectral-norm scales in a
    group without weight decay (the common practice); true decays every parameter, as the
    published DEQ/MDEQ recipes do.
    """

    optimizer: Any = field(
        default_factory=lambda: {"_target_": "torch.optim.Adam", "_partial_": True, "lr": 1e-3}
    )
    schedule: str = "cosine"  # cosine | constant
    warmup_steps: int = 0
    min_lr: float = 0.0
    anneal_over: str = "rest"  # rest | all
    decay_norms_and_biases: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.optimizer, Mapping) and "_target_" not in self.optimizer:
            raise ValueError("optim.optimizer needs a _target_ (e.g. torch.optim.AdamW)")
        if not (isinstance(self.optimizer, Mapping) or callable(self.optimizer)):
            raise ValueError(
                f"optim.optimizer must be a config or a callable, got {self.optimizer!r}"
            )
        if self.schedule not in ("cosine", "constant"):
            raise ValueError(f"optim.schedule must be cosine or constant, got {self.schedule!r}")
        if self.anneal_over not in ("rest", "all"):
            raise ValueError(f"optim.anneal_over must be rest or all, got {self.anneal_over!r}")
        if self.warmup_steps < 0 or self.min_lr < 0:
            raise ValueError("optim.warmup_steps and optim.min_lr must be >= 0")

    def build(self, module: nn.Module, total_steps: int) -> tuple[torch.optim.Optimizer, Any]:
        """The optimizer over ``module``'s trainable parameters and its scheduler."""
        make = self.optimizer
        if isinstance(make, Mapping):
            make = hydra.utils.instantiate(dict(make), _convert_="all")
        opt = make(parameter_groups(module, self.decay_norms_and_biases))
        warmup = min(self.warmup_steps, max(0, total_steps - 1))
        if self.schedule == "cosine" and self.anneal_over == "all" and warmup > 0:
            base = [g["lr"] for g in opt.param_groups]

            def factor(lr: float) -> Callable[[int], float]:
                low = self.min_lr / lr if lr > 0 else 0.0

                def at(t: int) -> float:
                    if t < warmup:
                        return (t + 1) / warmup
                    return low + (1 - low) * (1 + math.cos(math.pi * t / total_steps)) / 2

                return at

            return opt, torch.optim.lr_scheduler.LambdaLR(opt, [factor(lr) for lr in base])
        if self.schedule == "constant":
            main: Any = torch.optim.lr_scheduler.ConstantLR(opt, factor=1.0, total_iters=0)
        else:
            main = torch.optim.lr_scheduler.CosineAnnealingLR(
                opt, T_max=max(1, total_steps - warmup), eta_min=self.min_lr
            )
        if warmup == 0:
            return opt, main
        ramp = torch.optim.lr_scheduler.LinearLR(opt, 1.0 / warmup, 1.0, total_iters=warmup - 1)
        return opt, torch.optim.lr_scheduler.SequentialLR(opt, [ramp, main], milestones=[warmup])


# Parameters that set a scale or an offset rather than a feature: no weight decay on them.
_NO_DECAY_LAYERS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.Embedding)


def parameter_groups(module: nn.Module, decay_all: bool) -> list[dict[str, Any]]:
    """Trainable parameters in one group, or, unless ``decay_all``, two: weights with the
    optimizer's weight decay, and biases, normalization layers' parameters and weight/spectral
    norm scales with none. Embeddings keep decay (they are features)."""
    params = [p for p in module.parameters() if p.requires_grad]
    if decay_all:
        return [{"params": params}]
    no_decay: set[int] = set()
    for layer in module.modules():
        for name, p in layer.named_parameters(recurse=False):
            is_norm = isinstance(layer, _NO_DECAY_LAYERS) and not isinstance(layer, nn.Embedding)
            if is_norm or name == "bias" or name == "scale":
                no_decay.add(id(p))
    return [
        {"params": [p for p in params if id(p) not in no_decay]},
        {"params": [p for p in params if id(p) in no_decay], "weight_decay": 0.0},
    ]


@dataclass
class FitConfig:
    """How the equilibrium is trained.

    pretrain_steps / pretrain_unroll: for the first steps, run the cell as a weight-tied
    network of ``pretrain_unroll`` layers with ordinary backprop (Bai et al., 2019, 2020).
    jitter: the forward budget of a step is max_iter + k, k drawn uniformly from -jitter ..
    jitter (an int) or from low .. high (a list [low, high], both included): the
    DEQ-Transformer reference draws from [-delta, 0] (``rand_f_thres_delta``), MDEQ-Vision
    from [-delta, 1] (``RAND_F_THRES_DELTA``, torch.randint's exclusive end). ``jitter_on``:
    ``every_step``, or ``jac_steps`` (only the steps that take the Jacobian loss, as
    MDEQ-Vision).
    fp_weight, fp_gamma, fp_bias, fp_normalize: how fixed-point correction weighs the states
    the core samples (``core.n_states`` / ``core.indexing``; see
    :func:`deqlab.regularize.fp_correction`); with one state there is no correction.
    sradius_iters: power-method steps for ``deq/sradius`` at validation (0: off).
    trace_samples: samples drawn in the validation residual-trace figure (0: off).
    """

    pretrain_steps: int = 0
    pretrain_unroll: int = 0
    jitter: Any = 0  # int k: -k..k; [low, high]
    jitter_on: str = "every_step"  # every_step | jac_steps
    fp_weight: str = "exp"
    fp_gamma: float | None = None  # None: TorchDEQ's default (exp 0.8, linear 0.9)
    fp_bias: float = 0.0
    fp_normalize: bool = False
    sradius_iters: int = 0
    trace_samples: int = 4

    def __post_init__(self) -> None:
        if self.pretrain_steps > 0 and self.pretrain_unroll < 1:
            raise ValueError("fit.pretrain_steps > 0 needs fit.pretrain_unroll >= 1")
        low, high = self.jitter_range()
        if low > high:
            raise ValueError(f"fit.jitter [low, high] needs low <= high, got {self.jitter}")
        if self.jitter_on not in ("every_step", "jac_steps"):
            raise ValueError(
                f"fit.jitter_on must be every_step or jac_steps, got {self.jitter_on!r}"
            )

    def jitter_range(self) -> tuple[int, int]:
        """The inclusive range of budget offsets."""
        if isinstance(self.jitter, int):
            return -abs(self.jitter), abs(self.jitter)
        if isinstance(self.jitter, (list, tuple)) and len(self.jitter) == 2:
            return int(self.jitter[0]), int(self.jitter[1])
        raise ValueError(f"fit.jitter is an int or a [low, high] pair, got {self.jitter!r}")


def _plain(value: Any) -> bool:
    """Whether a config value is plain data (mappings, lists, scalars) all the way down."""
    if isinstance(value, Mapping):
        return all(_plain(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    return value is None or isinstance(value, (str, int, float, bool))


class DEQLitModule(L.LightningModule):
    """Shared DEQ training logic; see the module docstring for what a task adds."""

    net: nn.Module

    def __init__(
        self,
        net: nn.Module | None,
        core: Mapping[str, Any] | CoreConfig | nn.Module | None = None,
        solver: Mapping[str, Any] | SolverConfig | None = None,
        grad: Mapping[str, Any] | GradConfig | None = None,
        norm: Mapping[str, Any] | NormConfig | None = None,
        jac_reg: Mapping[str, Any] | JacRegConfig | None = None,
        optim: Mapping[str, Any] | OptimConfig | None = None,
        fit: Mapping[str, Any] | FitConfig | None = None,
        init: Mapping[str, Any] | InitConfig | None = None,
        seed: int = 0,
        init_from: str | None = None,
        init_from_strict: bool = True,
    ):
        super().__init__()
        # Built objects (a core from a _target_, an instantiated optimizer factory) are not
        # hyperparameters: the run's config (config_resolved.yaml) records what built them.
        built = [k for k, v in (("core", core), ("optim", optim)) if not _plain(v)]
        self.save_hyperparameters(ignore=["net", *built])
        self.deq = build_core(core, solver, grad)
        self.init_cfg = to_config(InitConfig, init, "init")
        self.norm_cfg = to_config(NormConfig, norm, "norm")
        self.jac_cfg = to_config(JacRegConfig, jac_reg, "jac_reg")
        self.optim_cfg = to_config(OptimConfig, optim, "optim")
        self.fit_cfg = to_config(FitConfig, fit, "fit")
        self.seed = seed
        self.init_from, self.init_from_strict = init_from, init_from_strict
        self._weights_loaded = False
        self.net = None
        if net is not None:
            self.attach_net(net)
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
            power_iters=n.power_iters,
            learn_scale=n.learn_scale,
            no_scale=n.no_scale,
            target_norm=n.target_norm,
            clip=n.clip,
            clip_value=n.clip_value,
        )

    def setup(self, stage: str) -> None:
        """Start from ``init_from``'s weights (once; a resumed run's checkpoint, restored after
        setup, takes precedence). Tasks that build their network in ``setup`` call this after."""
        if self.init_from and not self._weights_loaded and self.net is not None:
            report = load_initial_weights(self.init_from, self.net, self.init_from_strict)
            if self.global_rank == 0:
                print(f"deqlab: {report}")
            self._weights_loaded = True

    # -- the solve ---------------------------------------------------------------------------

    def equilibrium(
        self,
        f: Callable[[State], State],
        z0: State,
        *,
        jac_vecs: int = 0,
        sradius_iters: int = 0,
    ) -> tuple[list[State], DEQInfo | None]:
        """Solve z = f(z) from the configured start shaped like ``z0``; return the states the
        loss should read (last = the equilibrium) and the solve's statistics.

        In unrolled pre-training it runs ``pretrain_unroll`` plain steps instead (no
        statistics), in training with ordinary backprop, and in evaluation too: until
        ``pretrain_steps`` the model being trained is the unrolled network (as the reference
        implementations evaluate it). ``jac_vecs`` > 0 asks for the Jacobian penalty,
        ``sradius_iters`` > 0 for ``info.sradius`` (power method at the equilibrium).
        """
        t = self.fit_cfg
        z0 = self.init_cfg.like(z0)
        if self.global_step < t.pretrain_steps:
            z = z0
            for _ in range(t.pretrain_unroll):
                z = f(z)
            return [z], None
        kwargs: dict[str, Any] = {}
        if self.training and torch.is_grad_enabled():
            budget = self.deq.max_iter_for_training()
            low, high = t.jitter_range()
            if (low, high) != (0, 0) and (t.jitter_on == "every_step" or jac_vecs > 0):
                budget = int(torch.randint(max(1, budget + low), budget + high + 1, ()).item())
            kwargs = {"max_iter": budget, "jac_vecs": jac_vecs}
        z, info = self.deq(f, z0, **kwargs)
        if sradius_iters > 0:
            info.sradius = spectral_radius(f, z, sradius_iters)
        return info.states, info

    def forward(self, x: Tensor, **solve: Any) -> tuple[list[Tensor], DEQInfo | None]:
        """Outputs of ``net.head`` for each returned state (the last is the equilibrium's),
        and the solve's statistics; ``solve`` goes to :meth:`equilibrium`."""
        u, z0 = self.net.inject(x)
        states, info = self.equilibrium(lambda z: self.net.cell(z, u), z0, **solve)
        return [self.net.head(s) for s in states], info

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
        # the backward solves ran after training_step returned: their statistics come now
        info = outputs.get("info") if isinstance(outputs, Mapping) else None
        if info is not None and info.backward:
            done = info.backward
            self.log("deq/bwd_nfe", sum(r.nfe for r in done) / len(done))
            self.log("deq/bwd_rel_residual", torch.cat([r.rel_residual for r in done]).mean())

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
        torch.manual_seed(mix_seed(self.seed, self.global_rank, self.global_step))
        reset_dropout(self)
        # this step's learning rate (every parameter group follows the same schedule)
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"])

    def jacobian_weight(self) -> float:
        """This step's Jacobian-loss weight: the schedule's, on a random ``freq`` share of
        steps, else 0."""
        pretrain = self.fit_cfg.pretrain_steps
        weight = self.jac_cfg.weight_at(self.global_step, self.current_epoch, pretrain)
        return weight if weight > 0 and bool(torch.rand(()) < self.jac_cfg.freq) else 0.0

    def training_step(self, batch: Any, batch_idx: int) -> dict[str, Any]:
        x, y = batch
        jac_weight = self.jacobian_weight()
        outputs, info = self(x, jac_vecs=self.jac_cfg.vecs if jac_weight > 0 else 0)
        t = self.fit_cfg
        if len(outputs) > 1:
            loss = fp_correction(
                self.criterion, outputs, y, t.fp_weight, t.fp_gamma, t.fp_bias, t.fp_normalize
            )
        else:
            loss = self.criterion(outputs[-1], y)
        self.log("train/loss", loss, prog_bar=True)
        self.update_metrics("train", outputs[-1].detach(), y)
        task_loss = loss.detach()  # the criterion's, without the Jacobian term
        if info is None:  # unrolled pre-training
            return {"loss": loss, "task_loss": task_loss, "info": None}
        self.log_solver_stats("fwd", info)
        if info.jac_loss is not None:
            self.log("deq/jac_loss", info.jac_loss.detach())
            loss = loss + jac_weight * info.jac_loss
        return {"loss": loss, "task_loss": task_loss, "info": info}

    def log_solver_stats(self, prefix: str, info: DEQInfo, **kw: Any) -> None:
        self.log(f"deq/{prefix}_nfe", float(info.nfe), **kw)
        self.log(f"deq/{prefix}_rel_residual", info.rel_residual.mean(), **kw)
        self.log(f"deq/{prefix}_abs_residual", info.abs_residual.mean(), **kw)

    def _eval_step(self, batch: Any, batch_idx: int, split: str) -> Tensor:
        x, y = batch
        first = split == "val" and batch_idx == 0
        outputs, info = self(x, sradius_iters=self.fit_cfg.sradius_iters if first else 0)
        output = outputs[-1]
        loss = self.criterion(output, y)
        self.log(f"{split}/loss", loss, sync_dist=True, prog_bar=split == "val")
        self.update_metrics(split, output, y)
        if info is None:
            return loss
        self.log_solver_stats(f"{split}_fwd", info, sync_dist=True)
        if info.sradius is not None:
            self.log("deq/sradius", info.sradius.mean(), sync_dist=True)
        if first and self.fit_cfg.trace_samples > 0:
            self._val_trace = info.trace[:, : self.fit_cfg.trace_samples].float().cpu()
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
        total = max(1, int(self.trainer.estimated_stepping_batches))
        opt, sched = self.optim_cfg.build(self, total)
        return {
            "optimizer": opt,
            "lr_scheduler": {"scheduler": sched, "interval": "step"},
        }
