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
    """What a graph model reads, for B graphs padded to n nodes each.

    ``features`` (B, n, F), zero past each graph's nodes (one graph's (N, F) is taken as
    (1, N, F)); ``adj_t`` (B n, B n), sparse and block diagonal: row i gathers from the
    nodes that send to i, row ``g * n + p`` being node p of graph g; ``pf_eigenvalue``: the
    Perron-Frobenius eigenvalue of |adj| (of the whole batch: the largest of its graphs'),
    IGNN's well-posedness bound; ``mask`` (B, n): the real nodes, None without padding.

    A graph is one sample of the solve: its nodes are one row of the (B, n * d) state, so the
    solvers stop, and report ``nfe``, residuals and convergence, per graph.
    """

    features: Tensor
    adj_t: Tensor
    pf_eigenvalue: float
    mask: Tensor | None = None

    def __post_init__(self) -> None:
        if self.features.dim() == 2:
            self.features = self.features.unsqueeze(0)
        b, n = self.features.shape[:2]
        if tuple(self.adj_t.shape) != (b * n, b * n):
            raise GraphError(
                f"adj_t is {tuple(self.adj_t.shape)} for {b} graph(s) of {n} node slots: it "
                f"must be ({b * n}, {b * n}), one row per node slot"
            )
        if self.mask is not None and tuple(self.mask.shape) != (b, n):
            raise GraphError(f"mask is {tuple(self.mask.shape)}, the features are ({b}, {n}, .)")

    @property
    def num_graphs(self) -> int:
        return self.features.shape[0]

    def to(self, device: torch.device | str) -> GraphInput:
        mask = None if self.mask is None else self.mask.to(device)
        return GraphInput(self.features.to(device), self.adj_t.to(device), self.pf_eigenvalue, mask)


@dataclass
class NodeTargets:
    """Labels of the nodes (B, n) and the mask (B, n) of those a split reads (one graph's
    (N,) are taken as (1, N))."""

    labels: Tensor
    mask: Tensor

    def __post_init__(self) -> None:
        if self.labels.dim() == 1:
            self.labels, self.mask = self.labels.unsqueeze(0), self.mask.unsqueeze(0)

    def __len__(self) -> int:
        return self.labels.shape[0]  # graphs: the samples of the solve

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
    as the IGNN code computes it (``scipy.sparse.linalg.eigs``, k=1), taken component by
    component: the eigenvalues of a graph are those of its (weakly) connected components,
    and on a graph of many components ARPACK meets the same largest eigenvalue many times
    over and does not converge. A component below ``DENSE_EIGEN_NODES`` nodes is solved
    densely (ARPACK needs k < N - 1); a larger one has a simple largest eigenvalue (self
    loops make it aperiodic), where ARPACK converges."""
    import numpy as np
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components
    from scipy.sparse.linalg import eigs

    adj = adj.coalesce()
    rows, cols = adj.indices().numpy()
    mat = coo_matrix((np.abs(adj.values().double().numpy()), (rows, cols)), shape=adj.shape).tocsr()
    _, label = connected_components(mat, directed=True, connection="weak")
    order = np.argsort(label, kind="stable")
    bounds = np.cumsum(np.bincount(label))[:-1]
    largest = 0.0
    for nodes in np.split(order, bounds):
        block = mat[nodes][:, nodes]
        if len(nodes) < DENSE_EIGEN_NODES:
            value = np.abs(np.linalg.eigvals(block.toarray())).max()
        else:
            value = np.abs(eigs(block, k=1, return_eigenvectors=False)[0])
        largest = max(largest, float(value))
    return largest + tol


DENSE_EIGEN_NODES = 400  # below it a dense eigvals is fast and always converges


def pad_batch(x: Tensor, edge_index: Tensor, batch: Tensor, max_nodes: int) -> GraphInput:
    """B graphs given as their disjoint union (PyG's layout: node rows ``x`` (N, F), edges
    ``edge_index`` (2, E) between them, ``batch`` (N,) naming each node's graph) as a padded
    :class:`GraphInput`, each graph one sample, normalized as :func:`normalized_adjacency`.

    Args:
        x: node features of all graphs, graph by graph.
        edge_index: edges i -> j in the union's node numbering; an edge never joins graphs.
        batch: the graph of each node, 0, 1, ... in node order (each graph a contiguous run).
        max_nodes: the most nodes a graph may have. Every graph is padded to the largest of
            its batch, so memory grows with it: a larger graph is refused by name.

    A graph without edges is kept: its nodes see themselves through the self loops.
    """
    num_nodes = x.shape[0]
    if batch.dim() != 1 or batch.shape[0] != num_nodes:
        raise GraphError(
            f"the batch vector has shape {tuple(batch.shape)} for {num_nodes} nodes: it needs "
            "one graph index per node row of x"
        )
    if num_nodes == 0:
        raise GraphError("the batch has no nodes")
    if int(batch[0]) != 0 or bool((batch.diff() < 0).any()) or bool((batch.diff() > 1).any()):
        raise GraphError(
            "the batch vector must number the graphs 0, 1, 2, ... in node order, each graph's "
            "nodes one contiguous run (as torch_geometric's Batch does)"
        )
    if edge_index.numel() and bool((batch[edge_index[0]] != batch[edge_index[1]]).any()):
        e = int((batch[edge_index[0]] != batch[edge_index[1]]).nonzero()[0])
        raise GraphError(
            f"edge {e} joins graph {int(batch[edge_index[0, e]])} to graph "
            f"{int(batch[edge_index[1, e]])}: edge_index and the batch vector disagree"
        )
    counts = torch.bincount(batch)
    n = int(counts.max())
    if n > max_nodes:
        raise GraphError(
            f"graph {int(counts.argmax())} of the batch has {n} nodes, above max_nodes="
            f"{max_nodes}: every graph of a batch is padded to its largest one, so memory grows "
            "with it; raise task.datamodule.max_nodes or leave such graphs out"
        )
    b = counts.numel()
    start = torch.cumsum(counts, 0) - counts
    slot = batch * n + (torch.arange(num_nodes) - start[batch])  # node -> padded row
    adj = normalized_adjacency(edge_index, num_nodes)
    rows, cols = slot[adj.indices()]
    adj_t = torch.sparse_coo_tensor(
        torch.stack([cols, rows]),
        adj.values().to(x.dtype),
        (b * n, b * n),
        check_invariants=True,
    ).coalesce()
    features = x.new_zeros(b * n, x.shape[1])
    features[slot] = x
    mask = torch.zeros(b * n, dtype=torch.bool)
    mask[slot] = True
    return GraphInput(features.view(b, n, -1), adj_t, perron_frobenius(adj), mask.view(b, n))
