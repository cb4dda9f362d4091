"""The optimizer and its learning-rate schedule (the ``optim`` config group), and which
parameters take weight decay."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import hydra.utils
import torch
from torch import nn


@dataclass
class OptimConfig:
    """Optimizer and learning-rate schedule (the ``optim`` config group).

    ``optimizer``: a ``torch.optim`` class (or yours) as a Hydra ``_partial_`` node, called
    with the parameter groups. The schedule, stepped every optimizer step, is torch's own:
    ``warmup_steps`` of linear warmup (``LinearLR``), then ``cosine`` decay to ``min_lr`` over
    the remaining steps (``CosineAnnealingLR``) or ``constant``. ``inv_sqrt``: the
    Transformer's inverse square root with warmup, as locuslab/deq's train_transformer.py
    writes it (``LambdaLR``: t / warmup^1.5 up to ``warmup_steps``, then t^-1/2).
    ``plateau``: linear warmup, then ``ReduceLROnPlateau`` stepped after every validation on
    ``plateau_monitor`` (the reference's ``dev_perf``: factor ``plateau_factor``, its
    ``decay_rate``; ``plateau_patience``; floor ``min_lr``, its ``lr_min``). ``anneal_over: all`` runs the
    cosine over all steps instead, the warmup replacing its start (step t >= warmup at
    min_lr + (lr - min_lr)(1 + cos(pi t / T)) / 2, as locuslab/deq's train_transformer.py
    anneals). ``decay_norms_and_biases``:
    false puts biases, normalization layers' parameters and weight/spectral-norm scales in a
    group without weight decay (the common practice); true decays every parameter, as the
    published DEQ/MDEQ recipes do. ``clip_nonemb``: ``trainer.gradient_clip_val`` clips the
    norm of the parameters outside embeddings only (the reference's ``--clip_nonemb``, which
    its script parses but never applies).
    """

    optimizer: Any = field(
        default_factory=lambda: {"_target_": "torch.optim.Adam", "_partial_": True, "lr": 1e-3}
    )
    schedule: str = "cosine"  # cosine | constant | inv_sqrt | plateau | multistep
    warmup_steps: int = 0
    milestones: list[int] = field(default_factory=list)  # multistep: steps where lr *= gamma
    gamma: float = 0.1
    min_lr: float = 0.0
    anneal_over: str = "rest"  # rest | all
    decay_norms_and_biases: bool = False
    plateau_monitor: str = "val/loss"
    plateau_mode: str = "min"  # min | max
    plateau_factor: float = 0.5
    plateau_patience: int = 0
    clip_nonemb: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.optimizer, Mapping) and "_target_" not in self.optimizer:
            raise ValueError("optim.optimizer needs a _target_ (e.g. torch.optim.AdamW)")
        if not (isinstance(self.optimizer, Mapping) or callable(self.optimizer)):
            raise ValueError(
                f"optim.optimizer must be a config or a callable, got {self.optimizer!r}"
            )
        if self.schedule not in SCHEDULES:
            raise ValueError(f"optim.schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.plateau_mode not in ("min", "max"):
            raise ValueError(f"optim.plateau_mode must be min or max, got {self.plateau_mode!r}")
        if not 0 < self.plateau_factor < 1 or self.plateau_patience < 0:
            raise ValueError(
                "optim.plateau_factor must lie in (0, 1) and optim.plateau_patience be >= 0, "
                f"got {self.plateau_factor} and {self.plateau_patience}"
            )
        if self.anneal_over not in ("rest", "all"):
            raise ValueError(f"optim.anneal_over must be rest or all, got {self.anneal_over!r}")
        if self.schedule == "multistep" and not self.milestones:
            raise ValueError("optim.schedule=multistep needs optim.milestones (steps)")
        if sorted(self.milestones) != list(self.milestones) or any(m < 1 for m in self.milestones):
            raise ValueError(f"optim.milestones must be increasing steps >= 1: {self.milestones}")
        if not self.gamma > 0:
            raise ValueError(f"optim.gamma must be > 0, got {self.gamma}")
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
        if self.schedule == "inv_sqrt":
            return opt, torch.optim.lr_scheduler.LambdaLR(opt, partial(inv_sqrt, warmup=warmup))
        if self.schedule == "multistep":
            main: Any = torch.optim.lr_scheduler.MultiStepLR(opt, list(self.milestones), self.gamma)
        elif self.schedule in ("constant", "plateau"):  # plateau: see plateau()
            main = torch.optim.lr_scheduler.ConstantLR(opt, factor=1.0, total_iters=0)
        else:
            main = torch.optim.lr_scheduler.CosineAnnealingLR(
                opt, T_max=max(1, total_steps - warmup), eta_min=self.min_lr
            )
        if warmup == 0:
            return opt, main
        ramp = torch.optim.lr_scheduler.LinearLR(opt, 1.0 / warmup, 1.0, total_iters=warmup - 1)
        if self.schedule == "plateau":  # the ramp alone: once done it leaves the rate as it is
            return opt, ramp
        return opt, torch.optim.lr_scheduler.SequentialLR(opt, [ramp, main], milestones=[warmup])

    def plateau(self, opt: torch.optim.Optimizer) -> Any:
        """``schedule: plateau``'s ReduceLROnPlateau over ``opt`` (else None), stepped by the
        module after each validation; the warmup before it is :meth:`build`'s ``LinearLR``,
        which leaves the rate alone once done, so the two compose."""
        if self.schedule != "plateau":
            return None
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            opt,
            mode=self.plateau_mode,
            factor=self.plateau_factor,
            patience=self.plateau_patience,
            min_lr=self.min_lr,
        )


SCHEDULES = ("cosine", "constant", "inv_sqrt", "plateau", "multistep")


def inv_sqrt(t: int, warmup: int) -> float:
    """The inverse-square-root multiplier at step t: t / warmup^1.5 while t <= warmup, then
    t^-1/2 (1 at t = 0 without warmup), locuslab/deq's ``inv_sqrt`` term for term."""
    if t == 0 and warmup == 0:
        return 1.0
    return 1.0 / t**0.5 if t > warmup else t / warmup**1.5


def non_embedding_parameters(module: nn.Module) -> list[nn.Parameter]:
    """Parameters that no nn.Embedding holds (a tied output layer's weight is the embedding's,
    and is left out with it)."""
    embedded = {
        id(p) for m in module.modules() if isinstance(m, nn.Embedding) for p in m.parameters()
    }
    return [p for p in module.parameters() if id(p) not in embedded]


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


class PlateauSchedule:
    """``optim.schedule=plateau``'s ReduceLROnPlateau, stepped after each validation (Lightning
    steps its schedulers at epoch ends, but validation may run every N steps); owned by the
    module, its state travels in the checkpoint."""

    def __init__(self) -> None:
        self.scheduler: Any = None
        self.saved: dict[str, Any] | None = None  # its state from a checkpoint, until built

    def build(self, cfg: OptimConfig, opt: torch.optim.Optimizer) -> None:
        self.scheduler = cfg.plateau(opt)
        if self.scheduler is not None and self.saved is not None:
            self.scheduler.load_state_dict(self.saved)

    def step(self, monitor: str, metrics: Mapping[str, Any]) -> None:
        """Step on ``metrics[monitor]`` (the trainer's callback metrics after validation)."""
        if self.scheduler is None:
            return
        value = metrics.get(monitor)
        if value is None:
            logged = sorted(k for k in metrics if k.startswith("val/"))
            raise ValueError(
                f"optim.plateau_monitor={monitor!r} was not logged at validation; logged: {logged}"
            )
        self.scheduler.step(float(value))

    def save(self, checkpoint: dict[str, Any]) -> None:
        if self.scheduler is not None:
            checkpoint["deqlab_plateau"] = self.scheduler.state_dict()

    def load(self, checkpoint: dict[str, Any]) -> None:
        self.saved = checkpoint.get("deqlab_plateau")


def clip_non_embedding(module: nn.Module, max_norm: float, algorithm: str | None) -> None:
    """``optim.clip_nonemb``: clip the gradient norm of the non-embedding parameters only (the
    DEQ-Transformer reference's clipping), to ``max_norm`` (``trainer.gradient_clip_val``)."""
    if algorithm not in (None, "norm"):
        raise ValueError("optim.clip_nonemb clips a norm: set trainer.gradient_clip_algorithm=norm")
    torch.nn.utils.clip_grad_norm_(non_embedding_parameters(module), max_norm)
