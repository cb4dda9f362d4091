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

import time
from collections.abc import Callable, Mapping
from contextlib import nullcontext
from dataclasses import replace
from typing import Any, Protocol

import lightning as L
import torch
from torch import Tensor, nn
from torchmetrics import MeanMetric

from ..core import CoreConfig, DEQInfo, GradConfig, SolverConfig, build_core
from ..dropout import reset_dropout
from ..grad import evaluate
from ..initial_state import InitConfig
from ..norm import NormConfig, apply_norm
from ..regularize import fp_correction, spectral_radius
from ..settings import to_config
from ..solvers.capture import Bound
from ..state import State
from .checkpoint import check_compatible, load_initial_weights
from .data import mix_seed
from .fit import FitConfig, JacRegConfig
from .loggers import log_figure, residual_trace_figure
from .optim import OptimConfig, non_embedding_parameters
from .stability import SplitStability, rising, stability_figure, summarize, warn_rising


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
        self.init_from, self.init_from_strict = init_from, init_from_strict
        self.compile_cell, self.compile_options = compile, dict(compile_options or {})
        self._weights_loaded = False
        self.net = None
        if net is not None:
            self.attach_net(net)
        self._val_trace: Tensor | None = None
        self._epoch_t0: float | None = None  # perf_counter() at the epoch's start
        self._fit_t0: float | None = None  # perf_counter() at the start of training
        self._plateau: Any = None  # optim.schedule=plateau's ReduceLROnPlateau
        # batch_chunk: the chunk being trained (its rows, the batch size) and whether its
        # step's gradients are already accumulating
        self._chunk: tuple[slice, int] | None = None
        self._grads_pending = False
        self._plateau_state: dict[str, Any] | None = None  # its state from a checkpoint
        # deqlab analyze: every evaluation batch's solve kept for a callback to read, and the
        # spectral radius taken on every split
        self.keep_eval = False
        # (info, target, the metric's values at the full budget, and by budget k)
        self.kept_eval: tuple[DEQInfo | None, Any, Any, dict[int, Tensor]] = (None, None, None, {})
        self._stability: SplitStability | None = None  # this validation's per-sample figures
        self._unstable_history: list[float] = []  # deq/val_unstable_share, validation by validation
        self._jac_multiplier = 1.0  # jac_reg.adaptive: the scheduled weight's multiplier
        # budget curve: per split, step count k -> running means of the metric and of nfe
        self._curve: dict[str, dict[int, tuple[MeanMetric, MeanMetric]]] = {}

    def attach_net(self, net: nn.Module) -> None:
        """Install the network, normalize its cell and, with ``compile``, compile it
        (``torch.compile`` with ``compile_options``). Tasks whose network depends on the data
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
        if self.compile_cell:
            compile_cell(net.cell, self.compile_options)

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
        statistics), in training with ordinary backprop, and in evaluation too: until
        ``pretrain_steps`` the model being trained is the unrolled network (as the reference
        implementations evaluate it). ``jac_vecs`` > 0 asks for the Jacobian penalty,
        ``sradius_iters`` > 0 for ``info.sradius`` (power method at the equilibrium);
        ``max_iter``: the training budget already drawn for this step (else drawn here);
        ``budgets``: in evaluation, the step counts ``info.at_budget`` keeps.
        """
        t = self.fit_cfg
        z0 = self.init_cfg.like(z0)
        if self.global_step < t.pretrain_steps:
            z = z0
            for _ in range(t.pretrain_unroll):
                z = evaluate(f, z, self.grad_cfg.mem_gc)
            return [z], None
        kwargs: dict[str, Any] = {}
        if self.training and torch.is_grad_enabled():
            budget = self.training_budget(jac_vecs) if max_iter is None else max_iter
            kwargs = {"max_iter": budget, "jac_vecs": jac_vecs}
        elif budgets:
            kwargs = {"budgets": budgets}
        z, info = self.deq(f, z0, **kwargs)
        if sradius_iters > 0:
            info.sradius = spectral_radius(f, z, sradius_iters)
        return info.states, info

    def training_budget(self, jac_vecs: int) -> int:
        """This step's forward budget: max_iter, jittered as ``fit.jitter`` says."""
        t = self.fit_cfg
        budget = self.deq.max_iter_for_training()
        low, high = t.jitter_range()
        if (low, high) != (0, 0) and (t.jitter_on == "every_step" or jac_vecs > 0):
            budget = int(torch.randint(max(1, budget + low), budget + high + 1, ()).item())
        return budget

    def forward(self, x: Tensor, **solve: Any) -> tuple[list[Tensor], DEQInfo | None]:
        """Outputs of ``net.head`` for each returned state (the last is the equilibrium's),
        and the solve's statistics; ``solve`` goes to :meth:`equilibrium`."""
        u, z0 = self.net.inject(x)
        states, info = self.equilibrium(Bound(self.net.cell, u), z0, **solve)
        return [self.net.head(s) for s in states], info

    # -- what a task supplies ---------------------------------------------------------------

    def criterion(self, output: Tensor, target: Tensor) -> Tensor:
        raise NotImplementedError

    def update_metrics(self, split: str, output: Tensor, target: Tensor) -> None:
        raise NotImplementedError

    # The budget curve's metric: its name, its per-element values (their mean over the split
    # is the metric before ``curve_finish``), e.g. accuracy: 1.0 for each correct prediction.
    curve_metric = "metric"
    curve_higher_is_better = True

    def curve_values(self, output: Tensor, target: Tensor) -> Tensor:
        raise NotImplementedError

    def curve_finish(self, mean: Tensor) -> Tensor:
        return mean

    # -- the budget curve ---------------------------------------------------------------------

    def budget_grid(self, split: str) -> list[int]:
        """The step counts of ``split``'s budget curve (``fit.budget_splits`` and
        ``fit.budget_grid``), empty when the split draws none."""
        splits = self.fit_cfg.budget_splits
        keeps = getattr(self.deq, "keeps_budgets", lambda: False)()
        if splits is None:  # the default: the test split, where the core can
            splits = ["test"] if keeps else []
        elif splits and not keeps:
            raise ValueError(
                f"fit.budget_splits={splits}: this core ({type(self.deq).__name__}, solver "
                "capture or a solver without a `budgets` option) keeps no per-budget states; "
                "set task.module.fit.budget_splits=[]"
            )
        if split not in splits or self.global_step < self.fit_cfg.pretrain_steps:
            return []
        return self.fit_cfg.budgets(self.deq.solver_cfg.eval_budget())

    def _update_curve(
        self, split: str, info: DEQInfo, output: Tensor, y: Tensor
    ) -> dict[int, Tensor]:
        """Add each budget's per-element metric values to the split's running means; returns
        them by budget. ``output`` is the head at the full solve's z, which a budget the solve
        stopped before shares (the same tensor): its head is not evaluated again."""
        curve = self._curve.setdefault(split, {})
        kept = {}
        for k, res in info.at_budget.items():
            if k not in curve:
                curve[k] = (MeanMetric().to(self.device), MeanMetric().to(self.device))
            head = output if res.z is info.z else self.net.head(res.z)
            kept[k] = self.curve_values(head, y).detach()
            curve[k][0].update(kept[k].flatten().float())
            curve[k][1].update(torch.tensor(float(res.nfe), device=self.device), len(y))
        return kept

    def _log_curve(self, split: str) -> None:
        """Log ``split/<metric>@k`` and ``split/nfe@k`` over the whole split (synced across
        processes by the metrics), then start afresh."""
        for k, (metric, nfe) in sorted(self._curve.pop(split, {}).items()):
            self.log(f"{split}/{self.curve_metric}@{k}", self.curve_finish(metric.compute()))
            self.log(f"{split}/nfe@{k}", nfe.compute())

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
        if self._plateau is not None:
            checkpoint["deqlab_plateau"] = self._plateau.state_dict()
        checkpoint["deqlab_unstable_history"] = list(self._unstable_history)
        checkpoint["deqlab_jac_multiplier"] = self._jac_multiplier

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._plateau_state = checkpoint.get("deqlab_plateau")  # restored once built
        self._unstable_history = list(checkpoint.get("deqlab_unstable_history", []))
        self._jac_multiplier = float(checkpoint.get("deqlab_jac_multiplier", 1.0))
        self.check_checkpoint(checkpoint)
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
        weight *= self._jac_multiplier
        if self.jac_cfg.adaptive:
            self.log("deq/jac_weight", weight)
        return weight if weight > 0 and bool(torch.rand(()) < self.jac_cfg.freq) else 0.0

    def training_step(self, batch: Any, batch_idx: int) -> dict[str, Any]:
        x, y = batch
        jac_weight = self.jacobian_weight()
        jac_vecs = self.jac_cfg.vecs if jac_weight > 0 else 0
        if self.fit_cfg.batch_chunk > 1:
            loss, task_loss, info = self._chunked_loss(x, y, batch_idx, jac_weight, jac_vecs)
        else:
            loss, task_loss, info = self._loss(x, y, jac_weight, jac_vecs)
        self.log("train/loss", task_loss, prog_bar=True)
        if info is None:  # unrolled pre-training
            return {"loss": loss, "task_loss": task_loss, "info": None}
        self.log_solver_stats("fwd", info)
        if info.jac_loss is not None:
            self.log("deq/jac_loss", info.jac_loss.detach())
        return {"loss": loss, "task_loss": task_loss, "info": info}

    def _loss(
        self, x: Tensor, y: Tensor, jac_weight: float, jac_vecs: int, max_iter: int | None = None
    ) -> tuple[Tensor, Tensor, DEQInfo | None]:
        """The training loss of (x, y) with the Jacobian term, the task's loss alone
        (detached), and the solve's statistics."""
        solve: dict[str, Any] = {"jac_vecs": jac_vecs}
        if max_iter is not None:  # a budget drawn once for the step's chunks
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
        return loss, task_loss, info

    def _chunked_loss(
        self, x: Tensor, y: Tensor, batch_idx: int, jac_weight: float, jac_vecs: int
    ) -> tuple[Tensor, Tensor, DEQInfo | None]:
        """``fit.batch_chunk`` = n: the batch in n equal chunks, each solved and
        backpropagated in turn (the DEQ-Transformer reference's ``--batch_chunk``, to fit a
        large model in less memory); their gradients add up to the whole batch's, the budget
        is drawn once. The first n - 1 chunks are backpropagated here, the last by Lightning,
        so Lightning's zero_grad, which runs after the step, is skipped once
        (:meth:`optimizer_zero_grad`)."""
        n, b = self.fit_cfg.batch_chunk, x.shape[0]
        if b % n:
            raise ValueError(
                f"fit.batch_chunk={n} must divide the batch of {b} samples each process steps on"
            )
        pretraining = self.global_step < self.fit_cfg.pretrain_steps
        budget = None if pretraining else self.training_budget(jac_vecs)
        accumulate = self.trainer.accumulate_grad_batches
        if batch_idx % accumulate == 0:  # where Lightning zeroes
            for opt in self.trainer.optimizers:
                opt.zero_grad()
        self._grads_pending = True
        no_sync = getattr(self.trainer.strategy, "block_backward_sync", nullcontext)
        size, task_losses, infos = b // n, [], []
        for i in range(n):
            self._chunk = (slice(i * size, (i + 1) * size), b)
            rows = self._chunk[0]
            loss, task_loss, info = self._loss(x[rows], y[rows], jac_weight, jac_vecs, budget)
            loss = loss / n
            task_losses.append(task_loss)
            infos.append(info)
            if i < n - 1:  # scaled as Lightning scales the loss it backpropagates itself
                with no_sync():
                    self.trainer.strategy.backward(loss / accumulate, None)
        self._chunk = None
        task_loss = torch.stack(task_losses).mean()
        if infos[-1] is None:
            return loss, task_loss, None
        info = replace(
            infos[-1],
            nfe=sum(i.nfe for i in infos) / n,
            rel_residual=torch.cat([i.rel_residual for i in infos]),
            abs_residual=torch.cat([i.abs_residual for i in infos]),
            jac_loss=None
            if infos[-1].jac_loss is None
            else torch.stack([i.jac_loss.detach() for i in infos]).mean(),
        )
        return loss, task_loss, info

    def optimizer_zero_grad(self, epoch: int, batch_idx: int, optimizer: Any) -> None:
        if self._grads_pending:  # batch_chunk: the step's first chunks hold their gradients
            self._grads_pending = False
            return
        super().optimizer_zero_grad(epoch, batch_idx, optimizer)

    def log_solver_stats(self, prefix: str, info: DEQInfo, **kw: Any) -> None:
        self.log(f"deq/{prefix}_nfe", float(info.nfe), **kw)
        if info.fallbacks:  # samples the solve left unconverged, handed to solver.fallback
            self.log(f"deq/{prefix}_fallbacks", float(info.fallbacks[0]), **kw)
        self.log(f"deq/{prefix}_rel_residual", info.rel_residual.mean(), **kw)
        self.log(f"deq/{prefix}_abs_residual", info.abs_residual.mean(), **kw)

    def _eval_step(self, batch: Any, batch_idx: int, split: str) -> Tensor:
        x, y = batch
        first = split == "val" and batch_idx == 0
        sradius_iters = self.fit_cfg.sradius_iters if split == "val" or self.keep_eval else 0
        outputs, info = self(x, sradius_iters=sradius_iters, budgets=self.budget_grid(split))
        output = outputs[-1]
        if self.keep_eval:
            self.kept_eval = (info, y, self.curve_values(output, y).detach(), {})
        loss = self.criterion(output, y)
        self.log(f"{split}/loss", loss, sync_dist=True, prog_bar=split == "val")
        self.update_metrics(split, output, y)
        if info is None:
            return loss
        self.log_solver_stats(f"{split}_fwd", info, sync_dist=True)
        if info.sradius is not None:
            self.log("deq/sradius", info.sradius.mean(), sync_dist=True)
        if info.at_budget:
            curve = self._update_curve(split, info, output, y)
            if self.keep_eval:
                self.kept_eval[3].update(curve)
        if split == "val":
            if self._stability is None:
                self._stability = SplitStability()
            self._stability.update(info)
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
        if not self.trainer.sanity_checking:
            self._log_curve("val")
            self._log_stability()
        self._curve.pop("val", None)
        self._stability = None

    def _log_stability(self) -> None:
        """The stability monitor over the whole validation split (all processes' samples)."""
        if self._stability is None:
            return
        fit = self.fit_cfg
        values = {
            k: self.all_gather(v).flatten().cpu() for k, v in self._stability.tensors().items()
        }
        figures = summarize(values, fit.unstable_above)
        for name, value in figures.items():
            self.log(f"deq/val_{name}", value)
        self._unstable_history.append(figures["unstable_share"])
        if self.jac_cfg.adaptive:
            self._jac_multiplier = self.jac_cfg.adapt(
                self._jac_multiplier, figures["unstable_share"]
            )
        if rising(self._unstable_history, fit.unstable_patience) and self.trainer.is_global_zero:
            warn_rising(self._unstable_history, fit.unstable_patience, fit.unstable_above)
        if self.trainer.is_global_zero:
            fig = stability_figure(values, fit.unstable_above, self.current_epoch)
            data = torch.stack([values["rel_residual"], values["steps"]], dim=1)
            log_figure(self.loggers, "deq/stability", fig, self.global_step, data)

    def on_test_epoch_end(self) -> None:
        self._log_curve("test")

    # -- optimization -------------------------------------------------------------------------

    def on_validation_end(self) -> None:
        if self._plateau is None or self.trainer.sanity_checking:
            return
        monitor = self.optim_cfg.plateau_monitor
        value = self.trainer.callback_metrics.get(monitor)
        if value is None:
            logged = sorted(k for k in self.trainer.callback_metrics if k.startswith("val/"))
            raise ValueError(
                f"optim.plateau_monitor={monitor!r} was not logged at validation; logged: {logged}"
            )
        self._plateau.step(float(value))

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        """As Lightning clips (``trainer.gradient_clip_val``), or, with ``optim.clip_nonemb``,
        the norm of the non-embedding parameters only."""
        if not (self.optim_cfg.clip_nonemb and gradient_clip_val):
            self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)
            return
        if gradient_clip_algorithm not in (None, "norm"):
            raise ValueError(
                "optim.clip_nonemb clips a norm: set trainer.gradient_clip_algorithm=norm"
            )
        torch.nn.utils.clip_grad_norm_(non_embedding_parameters(self), gradient_clip_val)

    def configure_optimizers(self) -> dict[str, Any]:
        total = max(1, int(self.trainer.estimated_stepping_batches))
        opt, sched = self.optim_cfg.build(self, total)
        # optim.schedule=plateau: stepped here after each validation (Lightning steps its
        # schedulers at epoch ends, but validation may run every N steps)
        self._plateau = self.optim_cfg.plateau(opt)
        if self._plateau is not None and self._plateau_state is not None:
            self._plateau.load_state_dict(self._plateau_state)
        return {
            "optimizer": opt,
            # name: what callbacks.lr_monitor logs it as (optim/lr/pg1, ...)
            "lr_scheduler": {"scheduler": sched, "interval": "step", "name": "optim/lr"},
        }
