"""Graph classification data: a TU dataset (Morris et al., 2020, "TUDataset: a collection of
benchmark datasets for learning with graphs"), read from its raw text files by PyTorch
Geometric's reader, split into stratified folds, served as padded batches of graphs
(:func:`~deqlab.tasks.graph.graph.pad_batch`: each graph one sample of the solve).

PyG's ``TUDataset`` class caches a processed pickle and loads it back, falling back to a full
unpickle when the safe load fails; deqlab reads the raw files themselves (plain text) every
time instead, which for these datasets takes under a second.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from deqlab.runner.data import EpochShuffle, ResumableDataModule, ResumableLoader, rank_and_world

from .graph import GraphError, GraphInput, pad_batch

TU_URL = "https://www.chrsmrrs.com/graphkerneldatasets"  # torch_geometric's TUDataset.url


class Graphs(Dataset):
    """Graphs as (features (n, F), edge_index (2, e), label) triples."""

    def __init__(self, items: list[tuple[Tensor, Tensor, int]]):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor, int]:
        return self.items[i]


class CollateGraphs:
    """A list of graphs -> (padded :class:`GraphInput`, labels (B,)), through the disjoint
    union and batch vector PyG would build."""

    def __init__(self, max_nodes: int):
        self.max_nodes = max_nodes

    def __call__(self, graphs: list[tuple[Tensor, Tensor, int]]) -> tuple[GraphInput, Tensor]:
        sizes = torch.tensor([x.shape[0] for x, _, _ in graphs])
        offsets = torch.cumsum(sizes, 0) - sizes
        x = torch.cat([g[0] for g in graphs])
        edge_index = torch.cat([e + o for (_, e, _), o in zip(graphs, offsets.tolist())], dim=1)
        batch = torch.repeat_interleave(torch.arange(len(graphs)), sizes)
        labels = torch.tensor([y for _, _, y in graphs])
        return pad_batch(x, edge_index, batch, self.max_nodes), labels


def read_tu(raw_dir: Path, name: str) -> list[tuple[Tensor, Tensor, int]]:
    """The graphs of a TU dataset's raw files (``<name>_A.txt``, ``_graph_indicator``,
    ``_graph_labels``, ``_node_labels``, ...), read by PyG's ``read_tu_data``: the node
    labels one-hot as the features (continuous node attributes left out, as torch_geometric's
    ``TUDataset`` leaves them by default and the IGNN code reads them); self loops and
    duplicate edges removed.
    A dataset without node features gets each node's in-degree, as the IGNN code does."""
    from torch_geometric.io import read_tu_data

    data, slices, sizes = read_tu_data(str(raw_dir), name)
    if data.x is not None:  # node labels only, as TUDataset(use_node_attr=False) gives them
        data.x = data.x[:, sizes["num_node_attributes"] :]
        if data.x.shape[1] == 0:
            data.x = None
    if data.y is None:
        raise GraphError(f"{name} has no {name}_graph_labels.txt: not a classification dataset")
    graphs = []
    for g in range(len(slices["y"]) - 1):
        e0, e1 = int(slices["edge_index"][g]), int(slices["edge_index"][g + 1])
        edge_index = data.edge_index[:, e0:e1]
        if data.x is not None:
            x = data.x[int(slices["x"][g]) : int(slices["x"][g + 1])].float()
        else:  # no node labels: the counts come from the slices, or from the reader
            n = int(slices["x"][g + 1] - slices["x"][g]) if "x" in slices else data._num_nodes[g]
            x = torch.bincount(edge_index[1], minlength=n).float().unsqueeze(1)
        graphs.append((x, edge_index, int(data.y[g])))
    return graphs


def stratified_folds(labels: Tensor, folds: int, seed: int) -> Tensor:
    """The fold of each item: each class shuffled and dealt round-robin over the folds, the
    next class continuing where the last one stopped (as scikit-learn's StratifiedKFold
    balances them): every fold holds each class's share to within one item, and the fold
    sizes differ by at most one."""
    g = torch.Generator().manual_seed(seed)
    fold_of = torch.empty(len(labels), dtype=torch.long)
    start = 0
    for cls in labels.unique().tolist():
        members = (labels == cls).nonzero().flatten()
        members = members[torch.randperm(len(members), generator=g)]
        fold_of[members] = (torch.arange(len(members)) + start) % folds
        start = (start + len(members)) % folds
    return fold_of


class TUDataModule(ResumableDataModule):
    """Graph classification on a TU dataset, k-fold cross-validation as the IGNN code runs it
    (``graphclassification/train_IGNN.py``): the held-out fold is the test split, and the
    validation loop runs on it too, every epoch, as that code reports it (its figure is the
    best epoch's accuracy on the held-out fold, the protocol of Xu et al., 2019 that the graph
    classification papers share: ``val/acc`` at its max). ``test/acc`` is the last epoch's.

    Args:
        data_dir: the root: raw files in ``data_dir/<name>/raw`` (torch_geometric's layout).
        name: the dataset (``MUTAG``, ``PTC_MR``, ``COX2``, ``PROTEINS``, ``NCI1``, ...).
        num_features: node features the network expects; the data must have as many.
        num_classes: graph classes the network scores; every label must be below it.
        folds: folds of the cross-validation.
        fold: the held-out fold, 0 .. folds - 1.
        batch_size: graphs per training batch.
        eval_batch_size: graphs per evaluation batch (default: ``batch_size``).
        max_nodes: the largest graph a batch may hold (each batch is padded to its largest
            graph); a larger graph is refused when the data is set up.
        download: fetch ``<name>.zip`` with torch_geometric when the raw files are missing.
        url: where the zips are (torch_geometric's ``TUDataset.url``).
        seed: the folds' and the training order's seed.
    """

    def __init__(
        self,
        data_dir: str = "data",
        name: str = "MUTAG",
        num_features: int = 7,
        num_classes: int = 2,
        folds: int = 10,
        fold: int = 0,
        batch_size: int = 128,
        eval_batch_size: int | None = None,
        max_nodes: int = 1000,
        download: bool = False,
        url: str = TU_URL,
        seed: int = 42,
    ):
        super().__init__()
        if not 0 <= fold < folds:
            raise ValueError(f"task.datamodule.fold={fold} is not a fold of 0..{folds - 1}")
        if batch_size < 1 or (eval_batch_size is not None and eval_batch_size < 1):
            raise ValueError("task.datamodule.batch_size and eval_batch_size must be >= 1")
        self.data_dir, self.name, self.download, self.url = Path(data_dir), name, download, url
        self.num_features, self.num_classes = num_features, num_classes
        self.folds, self.fold, self.seed, self.max_nodes = folds, fold, seed, max_nodes
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size or batch_size
        self.train_set: Graphs | None = None
        self.test_set: Graphs | None = None

    @property
    def raw_dir(self) -> Path:
        return self.data_dir / self.name / "raw"

    def _missing(self) -> list[str]:
        need = [f"{self.name}_{part}.txt" for part in ("A", "graph_indicator", "graph_labels")]
        return [f for f in need if not (self.raw_dir / f).is_file()]

    def prepare_data(self) -> None:
        if not self._missing():
            return
        if not self.download:
            raise FileNotFoundError(
                f"{self.name} is not in {self.raw_dir} (missing {', '.join(self._missing())}): "
                f"set task.datamodule.download=true to fetch it with torch_geometric, or unpack "
                f"{self.url}/{self.name}.zip there"
            )
        from torch_geometric.datasets import TUDataset

        # TUDataset's own download (fetch, unzip, flatten into raw/), without its processing
        where = SimpleNamespace(
            url=self.url, cleaned=False, raw_dir=str(self.raw_dir), name=self.name
        )
        self.raw_dir.mkdir(parents=True, exist_ok=True)  # as torch_geometric does first
        TUDataset.download(where)  # type: ignore[arg-type]
        if self._missing():
            raise FileNotFoundError(f"{self.url}/{self.name}.zip lacked {self._missing()}")

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        self.prepare_data()  # refuses missing data by name on every process
        graphs = read_tu(self.raw_dir, self.name)
        self._check(graphs)
        labels = torch.tensor([y for _, _, y in graphs])
        fold_of = stratified_folds(labels, self.folds, self.seed)
        self.train_set = Graphs([g for g, f in zip(graphs, fold_of.tolist()) if f != self.fold])
        self.test_set = Graphs([g for g, f in zip(graphs, fold_of.tolist()) if f == self.fold])

    def _check(self, graphs: list[tuple[Tensor, Tensor, int]]) -> None:
        width = graphs[0][0].shape[1]
        if width != self.num_features:
            raise GraphError(
                f"{self.name}'s nodes have {width} features, the network expects "
                f"task.datamodule.num_features={self.num_features}: set it to {width}"
            )
        top = max(y for _, _, y in graphs)
        if top >= self.num_classes:
            raise GraphError(
                f"{self.name} has labels up to {top}, outside 0..{self.num_classes - 1}: set "
                f"task.datamodule.num_classes to {top + 1}"
            )
        largest = max(range(len(graphs)), key=lambda g: graphs[g][0].shape[0])
        n = graphs[largest][0].shape[0]
        if n > self.max_nodes:
            raise GraphError(
                f"{self.name} graph {largest} has {n} nodes, above task.datamodule.max_nodes="
                f"{self.max_nodes}: each batch is padded to its largest graph, so memory grows "
                "with it; raise max_nodes or use a dataset of smaller graphs"
            )

    @property
    def indexed(self) -> bool:
        return False

    @indexed.setter
    def indexed(self, value: bool) -> None:
        if value:  # the runner asks for sample indices (init=cached)
            from deqlab.warm_start import WarmStartError

            raise WarmStartError(
                "init=cached: task=tu pads each batch to its largest graph, so a graph's state "
                "has no fixed shape to keep between epochs; use init=zeros here"
            )

    def make_train_loader(self) -> ResumableLoader:
        world = rank_and_world()[1]
        order = {"seed": self.seed, "graphs": len(self.train_set), "batch": self.batch_size}
        return ResumableLoader(
            self.train_set,
            self.batch_size,
            sampler=EpochShuffle(len(self.train_set), self.seed),
            collate_fn=CollateGraphs(self.max_nodes),
            order={**order, "processes": world},
        )

    def _eval_loader(self) -> DataLoader:
        return DataLoader(
            self.test_set, self.eval_batch_size, collate_fn=CollateGraphs(self.max_nodes)
        )

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader()

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader()

    def transfer_batch_to_device(self, batch: Any, device: torch.device, idx: int) -> Any:
        # Lightning's own transfer walks a dataclass by deep-copying it: slow, and needless
        graph, labels = batch
        return graph.to(device), labels.to(device)
