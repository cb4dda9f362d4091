"""DEQLitModule: the DEQ training step every task shares.

A task module subclasses it and supplies a network (the :class:`DEQNet` protocol: inject,
cell, head) and the hooks of :class:`TaskHooks` (``criterion``, ``update_metrics``,
``curve_values``). The module solves through a pluggable core (with unrolled pre-training,
budget jitter and sampled states), adds the Jacobian term on its schedule and the fixed-point
correction, and logs the solver's statistics under ``deq/``. What is not the step is a small
component the module owns, each with its own state in the checkpoint:
:class:`~deqlab.runner.budget_curve.BudgetCurve`,
:class:`~deqlab.runner.batch_chunks.BatchChunks` (``fit.batch_chunk``),
:class:`~deqlab.runner.stability.StabilityMonitor` (with ``jac_reg.adaptive``),
:class:`~deqlab.runner.optim.PlateauSchedule` and :class:`~deqlab.runner.clock.TrainingClock`.

Data flows through return values: ``forward`` returns the outputs and the solve's
:class:`DEQInfo`; the steps log from them, and the backward statistics (filled in during
``backward()``) are logged from the training step's output in ``on_train_batch_end``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from ..bound import Bound
from ..core import CoreConfig, DEQInfo, GradConfig, SolverConfig, build_core
from ..dropout import mask_kinds, reset_dropout, restore_mask_kinds
from ..grad import evaluate
from ..initial_state import InitConfig
from ..norm import NormConfig, apply_norm
from ..regularize import fp_correction, spectral_radius
from ..settings import to_config
from ..state import State, as_tuple, leaf
from ..warm_start import WarmStartError, WarmStarts
from .batch_chunks import BatchChunks
from .budget_curve import BudgetCurve
from .checkpoint import check_compatible, load_initial_weights
from .clock import TrainingClock
from .data import mix_seed
from .fit import FitConfig, JacRegConfig
from .loggers import log_figure, residual_trace_figure
from .optim import OptimConfig, PlateauSchedule, clip_non_embedding
from .stability import StabilityMonitor
from .step_log import StepLogging


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


class TaskHooks(Protocol):
    """What a task's module adds to :class:`DEQLitModule`: the contract, in one place.

    ``criterion(output, target) -> loss``: the training and evaluation loss, a scalar, from
    the head's output at one state (fixed-point correction calls it at each sampled state).

    ``update_metrics(split, output, target)``: update the task's torchmetrics for ``split``
    (``train``, ``val`` or ``test``) from a detached output at the equilibrium; the task logs
    them (``split/name``).

    ``curve_values(output, target) -> values``: the per-element values whose mean over a split
    is the budget curve's metric (accuracy: 1.0 per correct prediction; a language model: the
    per-token loss), named ``curve_metric``; ``curve_finish(mean)`` turns the mean into the
    metric (a perplexity: ``exp``), and ``curve_higher_is_better`` says which way is better.
    ``deqlab analyze`` reads the same values per sample.
    """

    curve_metric: str
    curve_higher_is_better: bool

    def criterion(self, output: Tensor, target: Any) -> Tensor:
        """The loss.

        Args:
            output: the head's output at one state.
            target: the batch's targets.

        Returns:
            A scalar tensor, differentiable in ``output``.
        """
        ...

    def update_metrics(self, split: str, output: Tensor, target: Any) -> None:
        """Update (and log) the task's metrics.

        Args:
            split: ``train``, ``val`` or ``test``.
            output: the head's output at the equilibrium, detached.
            target: the batch's targets.
        """
        ...

    def curve_values(self, output: Tensor, target: Any) -> Tensor:
        """The budget curve's per-element values.

        Args:
            output: the head's output at a state (the equilibrium, or a shorter budget's).
            target: the batch's targets.

        Returns:
            A tensor with the batch first whose mean over a split is the metric before
            ``curve_finish``.
        """
        ...

    def curve_finish(self, mean: Tensor) -> Tensor:
        """The metric from the mean of :meth:`curve_values` (identity by default).

        Args:
            mean: the values' mean over a split.

        Returns:
            The metric logged as ``split/<curve_metric>@k``.
        """
        ...


@dataclass
class KeptEval:
    """One evaluation batch's solve, kept for a callback when ``keep_eval`` is set
    (``deqlab analyze``): the statistics, the targets, the task's ``curve_values`` at the full
    budget, and by budget k at each point of the budget curve."""

    info: DEQInfo | None = None
    target: Any = None
    values: Tensor | None = None
    by_budget: dict[int, Tensor] = field(default_factory=dict)


def _plain(value: Any) -> bool:
    """Whether a config value is plain data (mappings, lists, scalars) all the way down."""
    if isinstance(value, Mapping):
        return all(_plain(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    return value is None or isinstance(value, (str, int, float, bool))


def compile_cell(cell: nn.Module, options: Mapping[str, Any] | None = None) -> nn.Module:
    """``torch.compile`` the cell in place (its state dict keeps its keys: no ``_orig_mod.``).
    ift's backward takes many vector-Jacobian products through one f(z*) graph
    (``retain_graph=True``), which AOTAutograd's donated buffers forbid: they are switched off
    (a process-wide setting of torch's)."""
    torch._functorch.config.donated_buffer = False
    cell.compile(**dict(options or {}))
    return cell


class DEQLitModule(StepLogging):
    """The DEQ training step every task shares; a task adds its network and :class:`TaskHooks`.

    Args:
        net: the network (:class:`DEQNet`), or None for a task that builds it in ``setup``
            (then :meth:`attach_net`).
        core: the core's settings (the ``core`` group), a built core, or None for deqlab's.
        solver: the forward solver's settings (the ``solver`` group).
        grad: the gradient mode's settings (the ``grad`` group).
        norm: weight or spectral normalization of the cell (the ``norm`` group).
        jac_reg: the Jacobian regularization (the ``jac_reg`` group).
        optim: optimizer and learning-rate schedule (the ``optim`` group).
        fit: the task's training settings (:class:`~deqlab.runner.fit.FitConfig`).
        init: the solve's initial state (the ``init`` group).
        seed: the run's seed; each step's randomness is a function of (seed, rank, step).
        init_from: weights to start from: a deqlab checkpoint, a state dict or a reference
            implementation's.
        init_from_strict: load every tensor of ``init_from`` (else those that fit).
        compile: ``torch.compile`` the cell.
        compile_options: ``torch.compile``'s arguments.
    """

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
        compile: bool = False,
        compile_options: Mapping[str, Any] | None = None,
    ):
        super().__init__()
        # Built objects (a core from a _target_, an instantiated optimizer factory) are not
        # hyperparameters: the run's config (config_resolved.yaml) records what built them.
        built = [k for k, v in (("core", core), ("optim", optim)) if not _plain(v)]
        self.save_hyperparameters(ignore=["net", *built])
        self.deq = build_core(core, solver, grad)
        self.grad_cfg = to_config(GradConfig, grad, "grad")  # mem_gc of unrolled pre-training
        self.init_cfg = to_config(InitConfig, init, "init")
        self.norm_cfg = to_config(NormConfig, norm, "norm")
        self.jac_cfg = to_config(JacRegConfig, jac_reg, "jac_reg")
        self.optim_cfg = to_config(OptimConfig, optim, "optim")
        self.fit_cfg = to_config(FitConfig, fit, "fit")
        self.seed = seed
        i = self.init_cfg
        self.warm = WarmStarts(i.storage, i.max_gb) if i.name == "cached" else None
        self._warm_keys: Tensor | None = None  # this training batch's sample indices
        self.init_loss: Tensor | None = None  # init=learned: the prediction's distance to z*
        if self.warm is not None and self.fit_cfg.batch_chunk > 1:
            raise WarmStartError("init=cached cannot split batches: set fit.batch_chunk=1")
        self.init_from, self.init_from_strict = init_from, init_from_strict
        self.compile_cell, self.compile_options = compile, dict(compile_options or {})
        self._weights_loaded = False
        self.net = None
        if net is not None:
            self.attach_net(net)
        self.curve = BudgetCurve()
        self.chunks = BatchChunks()
        self.stability = StabilityMonitor()
        self.plateau = PlateauSchedule()
        self.clock = TrainingClock()
        self._val_trace: Tensor | None = None  # the residual-trace figure's samples
        # deqlab analyze: every evaluation batch's solve kept for a callback to read, and the
        # spectral radius taken on every split
        self.keep_eval = False
        self.kept_eval = KeptEval()

    @property
    def training_chunk(self) -> tuple[slice, int] | None:
        """With ``fit.batch_chunk``, the chunk being trained (its rows of the batch, the batch
        size); None otherwise: what a task with per-sample state (a memory) reads."""
        return self.chunks.current

    def attach_net(self, net: nn.Module) -> None:
        """Install the network, normalize its cell and, with ``compile``, compile it
        (``torch.compile`` with ``compile_options``). Tasks whose network depends on the data
        (e.g. a vocabulary size) pass ``net=None`` and call this from ``setup``."""
        self.net = net
        if self.init_cfg.name == "learned":
            enable = getattr(net, "enable_learned_start", None)
            if enable is None:
                raise ValueError(
                    f"init=learned: {type(net).__name__} cannot predict its state (it has no "
                    "enable_learned_start / predict_start); use another init"
                )
            enable()
        n = self.norm_cfg
        apply_norm(
            getattr(net, "cell", net),  # an explicit baseline has no cell: the whole net
            n.kind,
            exclude=n.exclude,
            power_iters=n.power_iters,
            learn_scale=n.learn_scale,
            no_scale=n.no_scale,
            target_norm=n.target_norm,
            clip=n.clip,
            clip_value=n.clip_value,
        )
        if self.compile_cell:
            compile_cell(getattr(net, "cell", net), self.compile_options)

    def setup(self, stage: str) -> None:
        """Start from ``init_from``'s weights (once; a resumed run's checkpoint, restored after
        setup, takes precedence). Tasks that build their network in ``setup`` call this after."""
        self.load_initial_weights()

    def load_initial_weights(self) -> None:
        """Load ``init_from`` into the network, once it is built (the runner calls this before
        it writes anything, so that weights that do not fit fail first)."""
        if self.init_from and not self._weights_loaded and self.net is not None:
            report = load_initial_weights(self.init_from, self.net, self.init_from_strict)
            if self.global_rank == 0:
                print(f"deqlab: {report}")
            self._weights_loaded = True

    def check_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse ``checkpoint`` unless this task module wrote it with this network."""
        reader = self.qualified_name()
        check_compatible(checkpoint, self, checkpoint.get("deqlab_module", reader), reader)

    @classmethod
    def qualified_name(cls) -> str:
        return f"{cls.__module__}.{cls.__qualname__}"

    # -- the solve ---------------------------------------------------------------------------
    def equilibrium(
        self,
        f: Callable[[State], State],
        z0: State,
        *,
        jac_vecs: int = 0,
        sradius_iters: int = 0,
        max_iter: int | None = None,
        budgets: list[int] | None = None,
    ) -> tuple[list[State], DEQInfo | None]:
        """Solve z = f(z) from the configured start shaped like ``z0``; return the states the
        loss should read (last = the equilibrium) and the solve's statistics.

        In unrolled pre-training it runs ``pretrain_unroll`` plain steps instead (no
        statistics), in training with ordinary backprop, and in evaluation too (an
        ``unrolled`` network: ``unrolled`` steps in training only); until
        ``pretrain_steps`` the model being trained is the unrolled network (as the reference
        implementations evaluate it). ``jac_vecs`` > 0 asks for the Jacobian penalty,
        ``sradius_iters`` > 0 for ``info.sradius`` (power method at the equilibrium);
        ``max_iter``: the training budget already drawn for this step (else drawn here);
        ``budgets``: in evaluation, the step counts ``info.at_budget`` keeps.
        """
        t = self.fit_cfg
        z0 = self.init_cfg.like(z0)
        training = self.training and torch.is_grad_enabled()
        unrolled = t.unrolled if training else 0
        if self.global_step < t.pretrain_steps or unrolled:
            z = z0
            for _ in range(unrolled or t.pretrain_unroll):
                z = evaluate(f, z, self.grad_cfg.mem_gc)
            return [z], None
        keys = self._warm_keys if training and self.warm is not None else None
        if keys is not None:
            z0 = self.warm.read(keys, z0)
        kwargs: dict[str, Any] = {}
        if training:
            budget = self.training_budget(jac_vecs) if max_iter is None else max_iter
            kwargs = {"max_iter": budget, "jac_vecs": jac_vecs}
        elif budgets:
            kwargs = {"budgets": budgets}
        z, info = self.deq(f, z0, **kwargs)
        if keys is not None:
            self.warm.write(keys, info.states[-1])
        if sradius_iters > 0:
            info.sradius = spectral_radius(f, z, sradius_iters)
        return info.states, info

    def training_budget(self, jac_vecs: int) -> int:
        """This step's forward budget: max_iter, jittered as ``fit.jitter`` says."""
        return self.fit_cfg.draw_budget(self.deq.max_iter_for_training(), jac_vecs)

    def forward(self, x: Tensor, **solve: Any) -> tuple[list[Tensor], DEQInfo | None]:
        """Outputs of ``net.head`` for each returned state (the last is the equilibrium's),
        and the solve's statistics; ``solve`` goes to :meth:`equilibrium`. A network without
        ``inject`` is an explicit baseline (a finite-depth GCN, a ResNet): its output alone,
        no solve and no statistics, so that it trains through the same runner."""
        if not hasattr(self.net, "inject"):
            return [self.net(x)], None
        u, z0 = self.net.inject(x)
        states, info = self.equilibrium_from(u, z0, **solve)
        return [self.net.head(s) for s in states], info

    def equilibrium_from(self, u: Any, z0: State, **solve: Any) -> tuple[list[State], DEQInfo]:
        """The equilibrium of ``net.cell`` with injection ``u``, solved from z0 or, under
        ``init=learned``, from the network's prediction, which then learns toward it
        (``init_loss``)."""
        predicted = self.predicted_start(u, z0) if self.init_cfg.name == "learned" else None
        start = z0 if predicted is None else leaf(predicted, False)
        states, info = self.equilibrium(Bound(self.net.cell, u), start, **solve)
        if predicted is not None:  # the prediction learns toward the equilibrium reached
            pairs = list(zip(as_tuple(predicted), as_tuple(states[-1])))
            self.init_loss = sum((p - z.detach()).pow(2).mean() for p, z in pairs) / len(pairs)
        return states, info

    def predicted_start(self, u: Any, z0: State) -> State:
        """``init=learned``: the network's prediction of z* from its injection u (a tensor, or
        one per part of a multi-part state), checked against the state's structure and
        shapes."""
        predicted = self.net.predict_start(u)
        shapes = [tuple(p.shape) for p in as_tuple(predicted)]
        want = [tuple(p.shape) for p in as_tuple(z0)]
        if isinstance(predicted, Tensor) != isinstance(z0, Tensor) or shapes != want:
            raise ValueError(
                f"init=learned: predict_start gave shapes {shapes}, the state has {want}"
            )
        return predicted

    # -- what a task supplies (TaskHooks) ----------------------------------------------------

    def criterion(self, output: Tensor, target: Any) -> Tensor:
        raise NotImplementedError("a task module defines criterion (see TaskHooks)")

    def update_metrics(self, split: str, output: Tensor, target: Any) -> None:
        raise NotImplementedError("a task module defines update_metrics (see TaskHooks)")

    curve_metric = "metric"
    curve_higher_is_better = True

    def curve_values(self, output: Tensor, target: Any) -> Tensor:
        raise NotImplementedError("a task module defines curve_values (see TaskHooks)")

    def curve_finish(self, mean: Tensor) -> Tensor:
        return mean

    # -- training ----------------------------------------------------------------------------

    def on_fit_start(self) -> None:
        self.clock.start_fit()

    def on_train_start(self) -> None:
        if self.warm is not None:  # a cache filled on other data is dropped
            loader = self.trainer.train_dataloader
            self.warm.bind(len(getattr(loader, "dataset", ())))

    def on_train_epoch_start(self) -> None:
        self.clock.start_epoch()

    def on_train_epoch_end(self) -> None:
        self.clock.end_epoch(self.log, self.device)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # Each step's randomness (dropout masks, budget jitter, whether to regularize) is a
        # function of (seed, rank, step) alone, so a resumed run repeats it exactly.
        torch.manual_seed(mix_seed(self.seed, self.global_rank, self.global_step))
        reset_dropout(self)
        # this step's learning rate (every parameter group follows the same schedule)
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], step_reduce="last")

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.clock.log_elapsed(self.log)
        # the backward solves ran after training_step returned: their statistics come now
        info = outputs.get("info") if isinstance(outputs, Mapping) else None
        if info is not None and info.backward:
            done = info.backward
            self.log("deq/bwd_nfe", sum(r.nfe for r in done) / len(done))
            self.log("deq/bwd_rel_residual", torch.cat([r.rel_residual for r in done]).mean())
        super().on_train_batch_end(outputs, batch, batch_idx)  # a logging step logs the means

    def jacobian_weight(self) -> float:
        """This step's Jacobian-loss weight: the schedule's (times ``jac_reg.adaptive``'s
        multiplier), on a random ``freq`` share of steps, else 0."""
        pretrain = self.fit_cfg.pretrain_steps
        weight = self.jac_cfg.weight_at(self.global_step, self.current_epoch, pretrain)
        weight *= self.stability.jac_multiplier
        if self.jac_cfg.adaptive:
            self.log("deq/jac_weight", weight)
        return weight if weight > 0 and bool(torch.rand(()) < self.jac_cfg.freq) else 0.0

    def training_step(self, batch: Any, batch_idx: int) -> dict[str, Any]:
        x, y, *index = batch  # the samples' indices, from an indexed data set (init=cached)
        self._warm_keys = self.warm_keys(index)
        jac_weight = self.jacobian_weight()
        jac_vecs = self.jac_cfg.vecs if jac_weight > 0 else 0
        if self.fit_cfg.batch_chunk > 1:
            loss, task_loss, info = self.chunks.loss(self, x, y, batch_idx, jac_weight, jac_vecs)
        else:
            loss, task_loss, info = self.loss(x, y, jac_weight, jac_vecs)
        self.log("train/loss", task_loss, prog_bar=True)
        if info is None:  # unrolled pre-training
            return {"loss": loss, "task_loss": task_loss, "info": None}
        self.log_solver_stats("fwd", info)
        if self.warm is not None:
            warm, cold = self.warm.read_counts()
            self.log("deq/warm_share", warm / max(warm + cold, 1))
        if info.jac_loss is not None:
            self.log("deq/jac_loss", info.jac_loss.detach())
        return {"loss": loss, "task_loss": task_loss, "info": info}

    def warm_keys(self, index: list[Any]) -> Tensor | None:
        """The batch's sample indices when ``init=cached`` reads them, refused when absent."""
        if self.warm is None:
            return None
        if not index:
            raise WarmStartError(
                "init=cached needs each training sample's index: this task's data module "
                "does not give one (its batches are (x, y), not (x, y, index))"
            )
        return index[0]

    def loss(
        self, x: Any, y: Any, jac_weight: float, jac_vecs: int, max_iter: int | None = None
    ) -> tuple[Tensor, Tensor, DEQInfo | None]:
        """The training loss of (x, y) with the Jacobian term, the task's loss alone
        (detached), and the solve's statistics (None in unrolled pre-training).

        Args:
            x: the batch's inputs (or a chunk's).
            y: its targets.
            jac_weight: the Jacobian term's weight (0: none).
            jac_vecs: its probe vectors (0: none).
            max_iter: the forward budget, when drawn once for the step's chunks.
        """
        solve: dict[str, Any] = {"jac_vecs": jac_vecs}
        if max_iter is not None:
            solve["max_iter"] = max_iter
        outputs, info = self(x, **solve)
        t = self.fit_cfg
        if len(outputs) > 1:
            loss = fp_correction(
                self.criterion, outputs, y, t.fp_weight, t.fp_gamma, t.fp_bias, t.fp_normalize
            )
        else:
            loss = self.criterion(outputs[-1], y)
        self.update_metrics("train", outputs[-1].detach(), y)
        task_loss = loss.detach()  # the criterion's, without the Jacobian term
        if info is not None and info.jac_loss is not None:
            loss = loss + jac_weight * info.jac_loss
        if self.init_loss is not None:  # init=learned: pull the predicted start toward z*
            self.log("train/init_loss", self.init_loss.detach())
            loss = loss + self.init_cfg.weight * self.init_loss
            self.init_loss = None
        return loss, task_loss, info

    def optimizer_zero_grad(self, epoch: int, batch_idx: int, optimizer: Any) -> None:
        if not self.chunks.skip_zero_grad():  # batch_chunk: the first chunks' gradients
            super().optimizer_zero_grad(epoch, batch_idx, optimizer)

    def log_solver_stats(self, prefix: str, info: DEQInfo, **kw: Any) -> None:
        self.log(f"deq/{prefix}_nfe", float(info.nfe), **kw)
        if info.fallbacks:  # samples the solve left unconverged, handed to solver.fallback
            self.log(f"deq/{prefix}_fallbacks", float(info.fallbacks[0]), **kw)
        self.log(f"deq/{prefix}_rel_residual", info.rel_residual.mean(), **kw)
        self.log(f"deq/{prefix}_abs_residual", info.abs_residual.mean(), **kw)

    # -- evaluation --------------------------------------------------------------------------

    def _eval_step(self, batch: Any, batch_idx: int, split: str) -> Tensor:
        x, y, *_ = batch  # evaluation starts every solve from init.base
        sradius_iters = self.fit_cfg.sradius_iters if split == "val" or self.keep_eval else 0
        grid = self.curve.grid(split, self.deq, self.fit_cfg, self.global_step)
        outputs, info = self(x, sradius_iters=sradius_iters, budgets=grid)
        output = outputs[-1]
        if self.keep_eval:
            self.kept_eval = KeptEval(info, y, self.curve_values(output, y).detach())
        loss = self.criterion(output, y)
        self.log(f"{split}/loss", loss, sync_dist=True, prog_bar=split == "val")
        self.update_metrics(split, output, y)
        if info is None:
            return loss
        self.log_solver_stats(f"{split}_fwd", info, sync_dist=True)
        if info.sradius is not None:
            self.log("deq/sradius", info.sradius.mean(), sync_dist=True)
        if info.at_budget:
            curve = self.curve.update(split, info, output, y, self.net.head, self.curve_values)
            if self.keep_eval:
                self.kept_eval.by_budget.update(curve)
        if split == "val":
            self.stability.update(info)
            if batch_idx == 0 and self.fit_cfg.trace_samples > 0:
                self._val_trace = info.trace[:, : self.fit_cfg.trace_samples].float().cpu()
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._eval_step(batch, batch_idx, "val")

    def test_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._eval_step(batch, batch_idx, "test")

    def on_validation_epoch_end(self) -> None:
        trace, self._val_trace = self._val_trace, None
        if self.trainer.sanity_checking:
            self.curve.reset("val")
            self.stability.split = None
            return
        # figures come from rank 0 alone: another rank would open a logger folder of its own
        due = self.fit_cfg.figures_due(len(self.stability.history))  # this validation's number
        if trace is not None and self.trainer.is_global_zero and due:
            fig = residual_trace_figure(trace, self.current_epoch)
            log_figure(self.loggers, "deq/residual_trace", fig, self.global_step, trace)
        self.curve.log("val", self.log, self.curve_metric, self.curve_finish)
        self.stability.end_validation(self)

    def on_test_epoch_end(self) -> None:
        self.curve.log("test", self.log, self.curve_metric, self.curve_finish)

    def on_validation_end(self) -> None:
        if not self.trainer.sanity_checking:
            self.plateau.step(self.optim_cfg.plateau_monitor, self.trainer.callback_metrics)

    # -- checkpoints -------------------------------------------------------------------------

    # A run resumed mid-epoch does not call on_train_epoch_start again: whatever an epoch
    # accumulates travels in the checkpoint (each component's state; tasks add their own).
    # The writer's class is stored so that a checkpoint of another task is refused by name.
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["deqlab_module"] = self.qualified_name()
        checkpoint["deqlab_dropout_masks"] = mask_kinds(self)  # which masks a batch redraws
        for part in (self.clock, self.plateau, self.stability):
            part.save(checkpoint)
        if self.warm is not None:
            checkpoint["warm_starts"] = self.warm.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.check_checkpoint(checkpoint)
        super().on_load_checkpoint(checkpoint)
        restore_mask_kinds(self, checkpoint.get("deqlab_dropout_masks", {}), self.device)
        for part in (self.clock, self.plateau, self.stability):
            part.load(checkpoint)
        if self.warm is not None and "warm_starts" in checkpoint:
            self.warm.load_state_dict(checkpoint["warm_starts"], self.device)

    # -- optimization ------------------------------------------------------------------------

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        """As Lightning clips (``trainer.gradient_clip_val``), or, with ``optim.clip_nonemb``,
        the norm of the non-embedding parameters only."""
        if self.optim_cfg.clip_nonemb and gradient_clip_val:
            clip_non_embedding(self, gradient_clip_val, gradient_clip_algorithm)
        else:
            self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def configure_optimizers(self) -> dict[str, Any]:
        total = max(1, int(self.trainer.estimated_stepping_batches))
        opt, sched = self.optim_cfg.build(self, total)
        self.plateau.build(self.optim_cfg, opt)  # optim.schedule=plateau, stepped after validation
        return {
            "optimizer": opt,
            # name: what callbacks.lr_monitor logs it as (optim/lr/pg1, ...)
            "lr_scheduler": {"scheduler": sched, "interval": "step", "name": "optim/lr"},
        }
