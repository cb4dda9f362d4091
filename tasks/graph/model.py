"""Graph networks on the DEQ interface (``inject``, ``cell``, ``head``), and the finite-depth
GCN baseline they are compared with. Every product with the adjacency is a sparse one: the
adjacency is never densified, forward or backward."""

from __future__ import annotations

import math
from itertools import pairwise

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deqlab.norm import set_norm_bound

from .graph import GraphInput


def propagate(adj_t: Tensor, h: Tensor) -> Tensor:
    """adj_t @ h with a sparse ``adj_t`` (N, N) and a dense h (N, d), differentiable in h. A
    dense ``adj_t`` is multiplied densely (what ``benchmarks/graph_sparse.py`` compares)."""
    return torch.sparse.mm(adj_t, h) if adj_t.is_sparse else adj_t @ h


def _uniform_(p: Tensor, fan: int) -> None:
    bound = 1.0 / math.sqrt(fan)
    nn.init.uniform_(p, -bound, bound)


class IGNNCell(nn.Module):
    """f(Z; (A^T, B)) = relu(A^T Z W^T + B) on the node states Z (1, N, m): the IGNN
    equilibrium (Gu et al., 2020, eq. 2, written node-major). With ||W||_inf < 1 / lambda_pf(A)
    (``norm=inf_ball``) it is a contraction, so the fixed point exists and is unique."""

    def __init__(self, hidden: int):
        super().__init__()
        self.linear = nn.Linear(hidden, hidden, bias=False)  # W: what a norm acts on
        _uniform_(self.linear.weight, hidden)

    def forward(self, z: Tensor, u: tuple[Tensor, Tensor]) -> Tensor:
        adj_t, b = u
        return F.relu(propagate(adj_t, self.linear(z[0])) + b).unsqueeze(0)


class IGNN(nn.Module):
    """IGNN for node classification, as the reference's chains model (``models_chains.py``):
    input injection B = A^T U Omega^T, the equilibrium Z*, then row-normalized states, dropout
    and a linear classifier without bias.

    Args:
        in_features: the node feature dimension.
        hidden: the state width m.
        num_classes: output classes.
        dropout: dropout before the classifier (training only).
    """

    def __init__(
        self, in_features: int, hidden: int = 16, num_classes: int = 2, dropout: float = 0.5
    ):
        super().__init__()
        self.cell = IGNNCell(hidden)
        self.omega = nn.Parameter(torch.empty(hidden, in_features))
        _uniform_(self.omega, hidden)
        self.dropout = dropout
        self.classifier = nn.Linear(hidden, num_classes, bias=False)
        self.hidden = hidden

    def inject(self, x: GraphInput) -> tuple[tuple[Tensor, Tensor], Tensor]:
        set_norm_bound(self.cell, x.pf_eigenvalue)  # the ball's radius: kappa / lambda_pf(A)
        b = propagate(x.adj_t, x.features @ self.omega.t())
        z0 = b.new_zeros(1, b.shape[0], self.hidden)  # the reference starts from X_0 = 0
        return (x.adj_t, b), z0

    def head(self, z: Tensor) -> Tensor:
        h = F.normalize(z[0], dim=-1)
        h = F.dropout(h, self.dropout, training=self.training)
        return self.classifier(h)


class GCN(nn.Module):
    """The finite-depth baseline (Kipf & Welling, 2017): ``layers`` graph convolutions
    H <- relu(A^T H W_l), each with its own weights, the last giving the class scores. It sees
    ``layers`` hops and no more. An explicit network: the runner trains it without a solve.

    Args:
        in_features: the node feature dimension.
        hidden: the width of the hidden layers.
        num_classes: output classes.
        layers: the number of graph convolutions (the receptive field in hops).
        dropout: dropout before each convolution (training only), as Kipf & Welling's.
    """

    def __init__(
        self,
        in_features: int,
        hidden: int = 16,
        num_classes: int = 2,
        layers: int = 2,
        dropout: float = 0.5,
    ):
        super().__init__()
        if layers < 1:
            raise ValueError(f"a GCN needs at least one layer, got layers={layers}")
        widths = [in_features] + [hidden] * (layers - 1) + [num_classes]
        self.convs = nn.ModuleList(nn.Linear(a, b) for a, b in pairwise(widths))
        self.dropout = dropout

    def forward(self, x: GraphInput) -> Tensor:
        h = x.features
        for i, conv in enumerate(self.convs):
            h = F.dropout(h, self.dropout, training=self.training)
            h = propagate(x.adj_t, F.linear(h, conv.weight)) + conv.bias  # A^T H W + b
            if i < len(self.convs) - 1:
                h = F.relu(h)
        return h
