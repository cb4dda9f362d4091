"""``fit.batch_chunk`` = n: a training batch in n equal chunks, each solved and backpropagated
in turn (the DEQ-Transformer reference's ``--batch_chunk``, to fit a large model in less
memory). Their gradients add up to the whole batch's; the budget is drawn once per step."""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import replace
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ..core import DEQInfo

if TYPE_CHECKING:  # the module owns a BatchChunks and hands itself in
    from .module import DEQLitModule


class BatchChunks:
    """The chunking of one training step; owned by the module.

    The first n - 1 chunks are backpropagated here, the last by Lightning, so Lightning's
    ``zero_grad``, which runs after the step, is skipped once (:meth:`skip_zero_grad`).
    """

    def __init__(self) -> None:
        self.current: tuple[slice, int] | None = None  # the chunk's rows, the batch size
        self.pending = False  # the step's first chunks hold their gradients

    def loss(
        self,
        module: DEQLitModule,
        x: Tensor,
        y: Tensor,
        batch_idx: int,
        jac_weight: float,
        jac_vecs: int,
    ) -> tuple[Tensor, Tensor, DEQInfo | None]:
        """The step's loss as :meth:`DEQLitModule.loss` returns it, over the n chunks.

        Args:
            module: the module being trained (its ``loss``, budget and trainer).
            x: the whole batch's inputs.
            y: its targets.
            batch_idx: the batch's index (gradients are zeroed where Lightning zeroes them).
            jac_weight: this step's Jacobian-loss weight.
            jac_vecs: its probe vectors.
        """
        n, b = module.fit_cfg.batch_chunk, x.shape[0]
        if b % n:
            raise ValueError(
                f"fit.batch_chunk={n} must divide the batch of {b} samples each process steps on"
            )
        trainer = module.trainer
        pretraining = module.global_step < module.fit_cfg.pretrain_steps
        budget = None if pretraining else module.training_budget(jac_vecs)
        accumulate = trainer.accumulate_grad_batches
        if batch_idx % accumulate == 0:  # where Lightning zeroes
            for opt in trainer.optimizers:
                opt.zero_grad()
        self.pending = True
        no_sync = getattr(trainer.strategy, "block_backward_sync", nullcontext)
        size, task_losses, infos = b // n, [], []
        for i in range(n):
            rows = slice(i * size, (i + 1) * size)
            self.current = (rows, b)
            loss, task_loss, info = module.loss(x[rows], y[rows], jac_weight, jac_vecs, budget)
            loss = loss / n
            task_losses.append(task_loss)
            infos.append(info)
            if i < n - 1:  # scaled as Lightning scales the loss it backpropagates itself
                with no_sync():
                    trainer.strategy.backward(loss / accumulate, None)
        self.current = None
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

    def skip_zero_grad(self) -> bool:
        """Whether Lightning's next ``zero_grad`` must be skipped (once per chunked step)."""
        skip, self.pending = self.pending, False
        return skip
