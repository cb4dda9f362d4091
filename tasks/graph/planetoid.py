"""Planetoid's citation graphs (Yang, Cohen and Salakhutdinov, 2016: Cora, CiteSeer, PubMed)
with their public split, as torch_geometric's ``Planetoid`` class and the GCN and IGNN codes
read them: 20 labelled nodes per class for training, the next 500 for validation, 1,000 for
testing.

The raw files (``ind.<name>.x``, ``.allx``, ``.graph``, ...) are Python 2 pickles, and
unpickling runs whatever a file names. They are read here by an unpickler that builds only
what those files hold (numpy arrays, scipy CSR matrices, a dict of lists) and refuses
anything else by name; torch_geometric's own reader would unpickle them in full.
"""

from __future__ import annotations

import pickle
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .data import OneGraphDataModule

PLANETOID_URL = "https://github.com/kimiyoung/planetoid/raw/master/data"  # torch_geometric's
PARTS = ("x", "tx", "allx", "y", "ty", "ally", "graph", "test.index")

# (module, name) as the files spell them (Python 2 names included)
ALLOWED = {
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("scipy.sparse.csr", "csr_matrix"),
    ("scipy.sparse._csr", "csr_matrix"),
    ("collections", "defaultdict"),
    ("__builtin__", "list"),
    ("builtins", "list"),
}


class _ArraysOnly(pickle.Unpickler):
    def __init__(self, file: Any, path: Path):
        super().__init__(file, encoding="latin1")
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in ALLOWED:
            raise pickle.UnpicklingError(
                f"{self.path} names {module}.{name}: a Planetoid file holds arrays, sparse "
                "matrices and a dict of lists only, so it is not read (a corrupt or foreign file)"
            )
        with warnings.catch_warnings():  # scipy.sparse.csr: the old module path, deprecated
            warnings.simplefilter("ignore", DeprecationWarning)
            return super().find_class(module, name)


def read_part(raw_dir: Path, name: str, part: str) -> Any:
    """One raw file: ``test.index`` is text; the others go through :class:`_ArraysOnly`."""
    path = raw_dir / f"ind.{name.lower()}.{part}"
    if part == "test.index":
        return torch.tensor([int(line) for line in path.read_text().split()])
    with open(path, "rb") as f:
        out = _ArraysOnly(f, path).load()
    if part == "graph":
        return out
    return torch.from_numpy(np.asarray(out.todense() if hasattr(out, "todense") else out)).float()


def read_planetoid(raw_dir: Path, name: str) -> dict[str, Tensor]:
    """The graph and its public split, assembled as torch_geometric's ``read_planetoid_data``
    assembles Cora, CiteSeer and PubMed: the test nodes' rows put back in node order, CiteSeer's
    isolated test nodes as zero rows, self loops dropped, every edge in both directions."""
    from torch_geometric.io.planetoid import edge_index_from_dict
    from torch_geometric.utils import to_undirected

    _, tx, allx, y, ty, ally, graph, test_index = (read_part(raw_dir, name, p) for p in PARTS)
    sorted_test = test_index.sort().values
    if name.lower() == "citeseer":  # test indices with gaps: isolated nodes, zero rows
        span = int(test_index.max() - test_index.min()) + 1
        tx_full, ty_full = tx.new_zeros(span, tx.shape[1]), ty.new_zeros(span, ty.shape[1])
        tx_full[sorted_test - test_index.min()] = tx
        ty_full[sorted_test - test_index.min()] = ty
        tx, ty = tx_full, ty_full
    features = torch.cat([allx, tx])
    features[test_index] = features[sorted_test]
    labels = torch.cat([ally, ty]).argmax(1)
    labels[test_index] = labels[sorted_test]
    n = labels.shape[0]
    edge_index = to_undirected(edge_index_from_dict(graph, num_nodes=n), num_nodes=n)
    return {
        "x": features,
        "edge_index": edge_index,
        "y": labels,
        "train": torch.arange(y.shape[0]),
        "val": torch.arange(y.shape[0], y.shape[0] + 500),
        "test": test_index,
    }


class PlanetoidDataModule(OneGraphDataModule):
    """A Planetoid citation graph with its public split, one graph.

    Args:
        data_dir: the root: raw files in ``data_dir/<name>/raw`` (torch_geometric's layout).
        name: ``Cora``, ``CiteSeer`` or ``PubMed``.
        num_features: node features the network expects (Cora: 1433); checked.
        num_classes: classes (Cora: 7).
        normalize_features: divide each node's features by their sum (the GCN and IGNN
            codes' ``row_normalize``; torch_geometric's ``NormalizeFeatures``).
        download: fetch the raw files with torch_geometric when they are missing.
        url: where the files are (torch_geometric's ``Planetoid.url``).
    """

    def __init__(
        self,
        data_dir: str = "data",
        name: str = "Cora",
        num_features: int = 1433,
        num_classes: int = 7,
        normalize_features: bool = True,
        download: bool = False,
        url: str = PLANETOID_URL,
    ):
        super().__init__(num_classes)
        self.data_dir, self.name, self.url = Path(data_dir), name, url
        self.num_features, self.normalize_features = num_features, normalize_features
        self.download = download

    @property
    def raw_dir(self) -> Path:
        return self.data_dir / self.name / "raw"

    def _missing(self) -> list[str]:
        files = [f"ind.{self.name.lower()}.{p}" for p in PARTS]
        return [f for f in files if not (self.raw_dir / f).is_file()]

    def prepare_data(self) -> None:
        if not self._missing():
            return
        if not self.download:
            raise FileNotFoundError(
                f"{self.name} is not in {self.raw_dir} (missing {', '.join(self._missing())}): "
                "set task.datamodule.download=true to fetch it with torch_geometric, or put "
                f"the files of {self.url} there"
            )
        from torch_geometric.datasets import Planetoid

        # Planetoid's own download (each raw file into raw/), without its processing
        raw = [f"ind.{self.name.lower()}.{p}" for p in PARTS]
        where = SimpleNamespace(
            url=self.url, raw_dir=str(self.raw_dir), raw_file_names=raw, split="public"
        )
        self.raw_dir.mkdir(parents=True, exist_ok=True)  # as torch_geometric does first
        Planetoid.download(where)  # type: ignore[arg-type]

    def load(self) -> dict[str, Tensor]:
        self.prepare_data()  # refuses missing data by name on every process
        d = read_planetoid(self.raw_dir, self.name)
        width = d["x"].shape[1]
        if width != self.num_features:
            raise ValueError(
                f"{self.name}'s nodes have {width} features, the network expects "
                f"task.datamodule.num_features={self.num_features}: set it to {width}"
            )
        if self.normalize_features:
            d["x"] = d["x"] / d["x"].sum(1, keepdim=True).clamp(min=1e-12)
        return d
