"""Language-modeling LightningModule: segment memory, token NLL, perplexity over whole splits."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torchmetrics import SumMetric

from deqlab.core import DEQInfo
from deqlab.runner.module import DEQLitModule

from .model import DEQTransformerLM, Memory


def vocabulary_id(itos: list[str]) -> dict[str, Any]:
    """Size and SHA-1 of the vocabulary in index order: what an LM's weights depend on."""
    return {"size": len(itos), "sha1": hashlib.sha1("\n".join(itos).encode()).hexdigest()}


class LMModule(DEQLitModule):
    """Word-level LM on ordered BPTT segments (tasks/lm/data.py).

    The network is built in ``setup`` once the vocabulary is known: ``net`` is a factory
    (Hydra ``_partial_``) called with ``n_token``. The equilibrium states of each segment,
    detached, are the attention memory of the next (``mem_len`` positions; ``eval_mem_len``
    in validation and test). Perplexity is exp(summed token NLL / token count) over the whole
    split, not an average of batch perplexities. Metrics: ``train/loss``, ``train/ppl``,
    ``val/loss``, ``val/ppl``, ``test/ppl``.
    """

    def __init__(
        self,
        net: Callable[..., DEQTransformerLM] | nn.Module,
        mem_len: int = 70,
        eval_mem_len: int | None = None,
        **deq: Any,
    ):
        super().__init__(net if isinstance(net, nn.Module) else None, **deq)
        self.net_factory = None if isinstance(net, nn.Module) else net
        self.mem_len, self.eval_mem_len = (
            mem_len,
            eval_mem_len if eval_mem_len is not None else mem_len,
        )
        self._mem: dict[str, Memory | None] = {}
        self._next_mem: Any = None  # batch_chunk: the next memory, assembled chunk by chunk
        self.vocab: dict[str, Any] | None = None
        self._split = "train"
        self.nll_sum = nn.ModuleDict({s: SumMetric() for s in ("val", "test")})
        self.tokens = nn.ModuleDict({s: SumMetric() for s in ("val", "test")})

    def setup(self, stage: str) -> None:
        corpus = self.trainer.datamodule.corpus
        self.vocab = vocabulary_id(corpus.itos)
        if self.net is None:
            self.attach_net(self.net_factory(n_token=len(corpus)))
        super().setup(stage)

    # The weights are tied to the vocabulary's order, and a resumed run must continue from the
    # memory the interrupted one had reached.
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["deqlab_vocabulary"] = self.vocab
        checkpoint["deqlab_train_memory"] = self._mem.get("train")

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        saved = checkpoint.get("deqlab_vocabulary")
        if saved is not None and saved != self.vocab:
            raise ValueError(
                f"the checkpoint was trained on a vocabulary of {saved['size']:,} words "
                f"(sha1 {saved['sha1'][:12]}), this corpus has {self.vocab['size']:,} "
                f"(sha1 {self.vocab['sha1'][:12]}): evaluate it on the corpus it was trained on"
            )
        super().on_load_checkpoint(checkpoint)
        mem = checkpoint.get("deqlab_train_memory")
        self._mem["train"] = None if mem is None else (mem[0], mem[1])

    def forward(self, x: Tensor, **solve: Any) -> tuple[list[Tensor], DEQInfo | None]:
        split = "train" if self.training else self._split
        chunk = self.training_chunk if split == "train" else None  # fit.batch_chunk: these rows
        mem = self._mem.get(split)
        if mem is not None and mem[0].device != x.device:  # restored from a checkpoint on the CPU
            mem = (mem[0].to(x.device), mem[1].to(x.device))
        if mem is not None and chunk is not None:
            mem = (mem[0][chunk[0]], mem[1][chunk[0]])
        ctx, z0 = self.net.inject(x, mem)
        states, info = self.equilibrium_from(ctx, z0, **solve)
        keep = self.mem_len if split == "train" else self.eval_mem_len
        if keep > 0:  # no gradient flows into the next segment through the memory
            new = self.net.next_memory(ctx, states[-1], keep)
            if chunk is None:
                self._mem[split] = new
            else:  # the step's later chunks still read the old memory: assemble the new aside
                rows, batch = chunk
                if rows.start == 0:
                    self._next_mem = tuple(t.new_empty(batch, *t.shape[1:]) for t in new)
                for whole, part in zip(self._next_mem, new):
                    whole[rows] = part
                if rows.stop == batch:
                    self._mem[split] = self._next_mem
        return [self.net.head(s) for s in states], info

    def criterion(self, output: Tensor, target: Tensor) -> Tensor:
        return self.net.nll(output, target).mean()

    # The budget curve's points read the memory that the full-budget solve of the previous
    # segment left; an evaluation at budget k would carry its own (eval_mem_len=0: the same).
    curve_metric = "ppl"
    curve_higher_is_better = False

    def curve_values(self, output: Tensor, target: Tensor) -> Tensor:
        return self.net.nll(output, target)

    def curve_finish(self, mean: Tensor) -> Tensor:
        return mean.exp()

    def update_metrics(self, split: str, output: Tensor, target: Tensor) -> None:
        if split == "train":
            return
        self.nll_sum[split].update(self.net.nll(output, target).sum())
        self.tokens[split].update(torch.tensor(float(target.numel()), device=target.device))

    def _reset(self, split: str) -> None:
        self._mem[split] = None

    def on_train_epoch_start(self) -> None:
        super().on_train_epoch_start()
        self._reset("train")

    def on_validation_epoch_start(self) -> None:
        self._reset("val")

    def on_test_epoch_start(self) -> None:
        self._reset("test")

    def validation_step(self, batch: Any, batch_idx: int) -> Tensor:
        self._split = "val"
        return super().validation_step(batch, batch_idx)

    def test_step(self, batch: Any, batch_idx: int) -> Tensor:
        self._split = "test"
        return super().test_step(batch, batch_idx)

    def _log_ppl(self, split: str) -> None:
        nll = self.nll_sum[split].compute() / self.tokens[split].compute().clamp_min(1)
        self.log(f"{split}/ppl", nll.exp())
        self.log(f"{split}/nll", nll)
        self.nll_sum[split].reset()
        self.tokens[split].reset()

    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()
        self._log_ppl("val")

    def on_test_epoch_end(self) -> None:
        super().on_test_epoch_end()
        self._log_ppl("test")
