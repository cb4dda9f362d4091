"""How the equilibrium is trained (``task.module.fit``) and the Jacobian regularization's
schedule (the ``jac_reg`` config group)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


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

    ``adaptive``: the weight follows the stability monitor (:mod:`deqlab.runner.stability`).
    After each validation whose unstable share (``deq/val_unstable_share``) is above
    ``adaptive_target`` the weight's multiplier is multiplied by ``adaptive_factor``; after one
    at or below it, divided by it, never below 1 (the scheduled weight). Logged as
    ``deq/jac_weight``.
    """

    name: str = "none"  # none | hutchinson
    weight: float = 0.5
    freq: float = 0.5
    vecs: int = 1
    incremental: int = 0
    increment: float = 0.1
    incremental_from: str = "start"  # start | deq
    stop_epoch: int | None = None
    adaptive: bool = False
    adaptive_target: float = 0.05
    adaptive_factor: float = 2.0

    def __post_init__(self) -> None:
        if self.adaptive and self.name == "none":
            raise ValueError("jac_reg.adaptive adapts the Jacobian weight: set jac_reg=hutchinson")
        if not (0 <= self.adaptive_target < 1 and self.adaptive_factor > 1):
            raise ValueError(
                "jac_reg.adaptive_target is a share in [0, 1) and jac_reg.adaptive_factor > 1, "
                f"got {self.adaptive_target} and {self.adaptive_factor}"
            )
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

    def adapt(self, multiplier: float, unstable_share: float) -> float:
        """The weight's next multiplier after a validation with this unstable share."""
        if unstable_share > self.adaptive_target:
            return multiplier * self.adaptive_factor
        return max(1.0, multiplier / self.adaptive_factor)

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
class FitConfig:
    """How the equilibrium is trained.

    pretrain_steps / pretrain_unroll: for the first steps, run the cell as a weight-tied
    network of ``pretrain_unroll`` layers with ordinary backprop (Bai et al., 2019, 2020).
    unrolled: k > 0 trains the cell as an unrolled network of k iterations from the start
    (ordinary backprop through all of them), the baseline an equilibrium model is compared
    with (Gilton et al., 2021); evaluation still runs the solver, so with ``fixed_point``,
    no tolerance and ``eval_max_iter=k`` it is that network, and larger budgets run it past
    its training depth.
    jitter: the forward budget of a step is max_iter + k, k drawn uniformly from -jitter ..
    jitter (an int) or from low .. high (a list [low, high], both included): the
    DEQ-Transformer reference draws from [-delta, 0] (``rand_f_thres_delta``), MDEQ-Vision
    from [-delta, 1] (``RAND_F_THRES_DELTA``, torch.randint's exclusive end). ``jitter_on``:
    ``every_step``, or ``jac_steps`` (only the steps that take the Jacobian loss, as
    MDEQ-Vision).
    fp_weight, fp_gamma, fp_bias, fp_normalize: how fixed-point correction weighs the states
    the core samples (``core.n_states`` / ``core.indexing``; see
    :func:`deqlab.regularize.fp_correction`); with one state there is no correction.
    sradius_iters: power-method steps for the spectral radius of J_f at z*, per sample over
    the whole validation split (``deq/sradius``, its distribution; 0: off).
    unstable_above, unstable_patience: the stability monitor (:mod:`deqlab.runner.stability`):
    the share of validation samples ending above this relative residual is
    ``deq/val_unstable_share``; a share rising at ``unstable_patience`` validations in a row
    warns (0: never).
    trace_samples: samples drawn in the validation residual-trace figure (0: off).
    figures_every: draw the validation figures (``deq/residual_trace``, ``deq/stability``)
    at the first validation and every ``figures_every``-th after it (0: never); their
    statistics are logged at every validation. A figure takes about half a second: with an
    epoch of one step (a graph), drawing every time would be most of the run.
    batch_chunk: split each training batch into this many chunks, solved and backpropagated
    one after the other, their gradients accumulated in one step (the DEQ-Transformer
    reference's ``--batch_chunk``: the same step in less memory).
    budget_splits, budget_grid: the metric against the solver budget, from one pass over
    these splits (``val``, ``test``): for each k in the grid, ``split/<metric>@k`` is what an
    evaluation with ``solver.eval_max_iter=k`` scores, and ``split/nfe@k`` the f evaluations it
    spends. ``budget_splits`` None: the test split, where the core keeps per-budget states
    (the built-in cores do). ``budget_grid`` empty: powers of two below the eval budget, and
    the budget itself.
    """

    pretrain_steps: int = 0
    pretrain_unroll: int = 0
    unrolled: int = 0
    jitter: Any = 0  # int k: -k..k; [low, high]
    jitter_on: str = "every_step"  # every_step | jac_steps
    fp_weight: str = "exp"
    fp_gamma: float | None = None  # None: TorchDEQ's default (exp 0.8, linear 0.9)
    fp_bias: float = 0.0
    fp_normalize: bool = False
    sradius_iters: int = 0
    trace_samples: int = 4
    figures_every: int = 1
    batch_chunk: int = 1
    unstable_above: float = 0.05
    unstable_patience: int = 2
    budget_splits: list[str] | None = None
    budget_grid: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.unstable_above > 0 or self.unstable_patience < 0:
            raise ValueError(
                "fit.unstable_above must be > 0 and fit.unstable_patience >= 0, got "
                f"{self.unstable_above} and {self.unstable_patience}"
            )
        splits = self.budget_splits or []
        if not set(splits) <= {"val", "test"}:
            raise ValueError(f"fit.budget_splits lists val and/or test, got {splits}")
        grid = list(self.budget_grid)
        if any(not isinstance(k, int) or k < 1 for k in grid) or grid != sorted(set(grid)):
            raise ValueError(f"fit.budget_grid lists increasing step counts >= 1, got {grid}")
        if self.pretrain_steps > 0 and self.pretrain_unroll < 1:
            raise ValueError("fit.pretrain_steps > 0 needs fit.pretrain_unroll >= 1")
        if self.unrolled < 0 or (self.unrolled > 0 and self.pretrain_steps > 0):
            raise ValueError(
                f"fit.unrolled={self.unrolled}: an unrolled network of k >= 1 iterations, "
                "trained so from the start (without fit.pretrain_steps)"
            )
        low, high = self.jitter_range()
        if low > high:
            raise ValueError(f"fit.jitter [low, high] needs low <= high, got {self.jitter}")
        if self.batch_chunk < 1:
            raise ValueError(f"fit.batch_chunk must be >= 1, got {self.batch_chunk}")
        if self.figures_every < 0:
            raise ValueError(f"fit.figures_every must be >= 0 (0: never), got {self.figures_every}")
        if self.jitter_on not in ("every_step", "jac_steps"):
            raise ValueError(
                f"fit.jitter_on must be every_step or jac_steps, got {self.jitter_on!r}"
            )

    def budgets(self, eval_budget: int) -> list[int]:
        """The budget curve's step counts for an evaluation budget of ``eval_budget``."""
        if self.budget_grid:
            if self.budget_grid[-1] > eval_budget:
                raise ValueError(
                    f"fit.budget_grid {self.budget_grid} goes past the eval budget "
                    f"{eval_budget}: raise solver.eval_max_iter or shorten the grid"
                )
            return list(self.budget_grid)
        powers = [2**i for i in range(eval_budget.bit_length()) if 2**i < eval_budget]
        return [*powers, eval_budget]

    def figures_due(self, validation: int) -> bool:
        """Whether the validation numbered ``validation`` (0 for the first) draws figures."""
        return self.figures_every > 0 and validation % self.figures_every == 0

    def draw_budget(self, budget: int, jac_vecs: int) -> int:
        """This step's forward budget: ``budget`` jittered as ``jitter`` and ``jitter_on`` say
        (on every step, or on the steps that take the Jacobian term, ``jac_vecs`` > 0)."""
        low, high = self.jitter_range()
        if (low, high) != (0, 0) and (self.jitter_on == "every_step" or jac_vecs > 0):
            budget = int(torch.randint(max(1, budget + low), budget + high + 1, ()).item())
        return budget

    def jitter_range(self) -> tuple[int, int]:
        """The inclusive range of budget offsets."""
        if isinstance(self.jitter, int):
            return -abs(self.jitter), abs(self.jitter)
        if isinstance(self.jitter, (list, tuple)) and len(self.jitter) == 2:
            return int(self.jitter[0]), int(self.jitter[1])
        raise ValueError(f"fit.jitter is an int or a [low, high] pair, got {self.jitter!r}")
