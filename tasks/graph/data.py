"""Node classification data: one graph, served whole as every split's one batch (the split
reads the nodes its mask selects): the chains here, Planetoid's citation graphs in
:mod:`~deqlab.tasks.graph.planetoid`."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from .chains import make_chains
from .graph import GraphInput, NodeTargets, check_graph, normalized_adjacency, perron_frobenius


class _One(Dataset):
    def __init__(self, item: Any):
        self.item = item

    def __len__(self) -> int:
        return 1

    def __getitem__(self, i: int) -> Any:
        return self.item


class OneGraphDataModule(L.LightningDataModule):
    """Node classification on one graph: the graph served whole as each split's one batch,
    the split reading the nodes its mask selects. A subclass supplies the graph
    (:meth:`load`); this class checks it, normalizes the adjacency and builds the splits.

    With ``indexed`` (the runner sets it for ``init=cached``) the training batch carries the
    graph's key, 0: every step trains the same sample, and starts from its last equilibrium.

    Args:
        num_classes: the classes the network scores; every label must be below it.
    """

    def __init__(self, num_classes: int):
        super().__init__()
        self.num_classes = num_classes
        self.batches: dict[str, tuple[GraphInput, NodeTargets]] = {}
        self.indexed = False

    def load(self) -> dict[str, Tensor]:
        """The graph: ``x`` (N, F), ``edge_index`` (2, E), ``y`` (N,) and the node indices of
        ``train``, ``val`` and ``test``."""
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        if self.batches:
            return
        d = self.load()
        n = d["x"].shape[0]
        check_graph(n, d["edge_index"], d["y"], self.num_classes)
        # messages follow the edges: row i of A^T gathers from the nodes with an edge into i
        adj = normalized_adjacency(d["edge_index"], n)
        graph = GraphInput(d["x"], adj.t().coalesce(), perron_frobenius(adj))
        for split in ("train", "val", "test"):
            mask = torch.zeros(n, dtype=torch.bool)
            mask[d[split]] = True
            self.batches[split] = (graph, NodeTargets(d["y"], mask))

    def _loader(self, split: str) -> DataLoader:
        return DataLoader(_One(self.batches[split]), batch_size=None, num_workers=0)

    def train_dataloader(self) -> DataLoader:
        if self.indexed:
            key = torch.zeros(1, dtype=torch.long)
            return DataLoader(_One((*self.batches["train"], key)), batch_size=None)
        return self._loader("train")

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

    def transfer_batch_to_device(self, batch: Any, device: torch.device, idx: int) -> Any:
        # Lightning's own transfer walks a dataclass by deep-copying it: 12 ms a batch here,
        # more than a training step of the chains model on the CPU
        graph, targets, *key = batch
        return graph.to(device), targets.to(device), *(k.to(device) for k in key)


class ChainsDataModule(OneGraphDataModule):
    """The IGNN paper's chains (:func:`~deqlab.tasks.graph.chains.make_chains`), one graph.

    Args:
        chain_length: nodes per chain.
        num_classes: classes (the reference's 2).
        chains_per_class: chains of each class (20).
        feature_dim: node feature dimension (100).
        train, val, test: nodes in each split (20, 100, 200).
        noise: uniform feature noise (0).
        seed: the generator's seed (the reference's 42).
    """

    def __init__(
        self,
        chain_length: int = 10,
        num_classes: int = 2,
        chains_per_class: int = 20,
        feature_dim: int = 100,
        train: int = 20,
        val: int = 100,
        test: int = 200,
        noise: float = 0.0,
        seed: int = 42,
    ):
        super().__init__(num_classes)
        self.options = dict(
            classes=num_classes,
            chains_per_class=chains_per_class,
            features=feature_dim,
            train=train,
            val=val,
            test=test,
            noise=noise,
            seed=seed,
        )
        self.chain_length = chain_length

    def load(self) -> dict[str, Tensor]:
        return make_chains(self.chain_length, **self.options)

    @property
    def in_features(self) -> int:
        return self.options["features"]
