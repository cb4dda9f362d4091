"""One graph as the task's models read it: node features, a normalized sparse adjacency,
labels and split masks, checked by name before any training starts."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


class GraphError(ValueError):
    """A graph the task cannot train on, named with what is wrong and how to fix it."""


@dataclass
class GraphInput:
    """What a graph model reads: features (N, F), the propagation matrix ``adj_t`` (N, N,
    sparse: row i gathers from the nodes that send to i), and its Perron-Frobenius eigenvalue
    (of |adj|, IGNN's well-posedness bound)."""

    features: Tensor
    adj_t: Tensor
    pf_eigenvalue: float

    def to(self, device: torch.device | str) -> GraphInput:
        return GraphInput(self.features.to(device), self.adj_t.to(device), self.pf_eigenvalue)


@dataclass
class NodeTargets:
    """Labels of every node and the mask of the nodes a split reads."""

    labels: Tensor
    mask: Tensor

    def __len__(self) -> int:
        return 1  # one graph: one sample of the solve, however many nodes the split reads

    def to(self, device: torch.device | str) -> NodeTargets:
        return NodeTargets(self.labels.to(device), self.mask.to(device))


def check_graph(num_nodes: int, edge_index: Tensor, labels: Tensor, num_classes: int) -> None:
    """Refuse, by name, what would train on nonsense: no edges, an edge to a node that does not
    exist, labels outside the class count. Self loops and isolated nodes are allowed (the
    normalization adds every self loop once)."""
    if edge_index.dim() != 2 or edge_index.shape[0] != 2:
        raise GraphError(f"edge_index must be (2, E), got shape {tuple(edge_index.shape)}")
    if edge_index.shape[1] == 0:
        raise GraphError(
            "the graph has no edges: every node would see only itself, and a graph model is "
            "an MLP; check the edge list (or use a model without message passing)"
        )
    if int(edge_index.min()) < 0 or int(edge_index.max()) >= num_nodes:
        raise GraphError(
            f"edge_index names nodes outside 0..{num_nodes - 1} (min {int(edge_index.min())}, "
            f"max {int(edge_index.max())}): the edge list and the features disagree"
        )
    if labels.shape[0] != num_nodes:
        raise GraphError(f"{labels.shape[0]} labels for {num_nodes} nodes")
    bad = (labels < 0) | (labels >= num_classes)
    if bool(bad.any()):
        raise GraphError(
            f"{int(bad.sum())} labels lie outside 0..{num_classes - 1} (e.g. node "
            f"{int(bad.nonzero()[0])}: {int(labels[bad][0])}); set num_classes to the label count"
        )


def normalized_adjacency(edge_index: Tensor, num_nodes: int) -> Tensor:
    """D^-1/2 (A + I) D^-1/2 with D the row sums of A + I (Kipf & Welling's renormalization,
    the IGNN code's ``AugNormAdj``), A_ij = 1 for an edge i -> j, duplicate edges and self
    loops counted once. Returned as a sparse COO tensor."""
    loops = torch.arange(num_nodes).expand(2, num_nodes)
    keys = torch.cat([edge_index, loops], dim=1)
    keys = torch.unique(keys[0] * num_nodes + keys[1])  # each edge once, sorted by row
    row, col = keys // num_nodes, keys % num_nodes
    degree = torch.bincount(row, minlength=num_nodes).float()
    d = degree.pow(-0.5)
    return torch.sparse_coo_tensor(
        torch.stack([row, col]),
        d[row] * d[col],
        (num_nodes, num_nodes),
        is_coalesced=True,
        check_invariants=True,
    )


def perron_frobenius(adj: Tensor, tol: float = 1e-5) -> float:
    """The largest eigenvalue of |adj| (a nonnegative matrix's spectral radius), plus ``tol``,
    as the IGNN code computes it (``scipy.sparse.linalg.eigs``, k=1)."""
    import numpy as np
    from scipy.sparse import coo_matrix
    from scipy.sparse.linalg import eigs

    adj = adj.coalesce()
    rows, cols = adj.indices().numpy()
    mat = coo_matrix((np.abs(adj.values().double().numpy()), (rows, cols)), shape=adj.shape)
    return float(np.abs(eigs(mat, k=1, return_eigenvectors=False)[0])) + tol
