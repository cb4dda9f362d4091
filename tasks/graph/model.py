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
    """adj_t @ h per node row, for node states h (B, n, d) and a sparse ``adj_t`` (B n, B n)
    (:class:`GraphInput`'s), differentiable in h. A dense ``adj_t`` is multiplied densely
    (what ``benchmarks/graph_sparse.py`` compares)."""
    rows = h.reshape(-1, h.shape[-1])
    out = torch.sparse.mm(adj_t, rows) if adj_t.is_sparse else adj_t @ rows
    return out.view(h.shape[:-1] + out.shape[-1:])


def _uniform_(p: Tensor, fan: int) -> None:
    bound = 1.0 / math.sqrt(fan)
    nn.init.uniform_(p, -bound, bound)


class IGNNCell(nn.Module):
    """f(Z; (A^T, B)) = relu(A^T Z W^T + B) on the node states Z (B, n, m): the IGNN
    equilibrium (Gu et al., 2020, eq. 2, written node-major). With ||W||_inf < 1 / lambda_pf(A)
    (``norm=inf_ball``) it is a contraction, so the fixed point exists and is unique."""

    def __init__(self, hidden: int):
        super().__init__()
        self.linear = nn.Linear(hidden, hidden, bias=False)  # W: what a norm acts on
        _uniform_(self.linear.weight, hidden)

    def forward(self, z: Tensor, u: tuple[Tensor, Tensor]) -> Tensor:
        adj_t, b = u
        return F.relu(propagate(adj_t, self.linear(z)) + b)


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
        return (x.adj_t, b), torch.zeros_like(b)  # the reference starts from X_0 = 0

    def head(self, z: Tensor) -> Tensor:
        h = F.normalize(z, dim=-1)
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
            if x.mask is not None:  # padding stays zero: it is no node
                h = h * x.mask.unsqueeze(-1)
            if i < len(self.convs) - 1:
                h = F.relu(h)
        return h


class IGNNStack(nn.Module):
    """L implicit graph layers solved jointly: the state is (Z_1, ..., Z_L) and

        f_1 = relu(A^T Z_1 W_1^T + B),   f_l = relu(A^T Z_l W_l^T + A^T Z_{l-1} Omega_l^T),

    each layer's injection the previous layer's state. The Jacobian is block lower
    triangular with each diagonal block a contraction (``norm=inf_ball``), so the joint fixed
    point exists, is unique, and is the stacked layers' fixed points solved one after the
    other, as the IGNN code does; one joint solve gives the same implicit gradient.

    Args:
        hidden: the width m of every layer.
        layers: L.
    """

    def __init__(self, hidden: int, layers: int):
        super().__init__()
        if layers < 1:
            raise ValueError(f"an IGNN stack needs at least one layer, got layers={layers}")
        self.layers = nn.ModuleList(IGNNCell(hidden) for _ in range(layers))
        # Parameters, not Linear layers: a norm of the cell acts on the W_l alone
        self.omegas = nn.ParameterList(
            nn.Parameter(torch.empty(hidden, hidden)) for _ in range(layers - 1)
        )
        for omega in self.omegas:
            _uniform_(omega, hidden)

    def forward(self, z: tuple[Tensor, ...], u: tuple[Tensor, Tensor]) -> tuple[Tensor, ...]:
        adj_t, b = u
        out = [self.layers[0](z[0], (adj_t, b))]
        for layer, omega, z_prev, z_l in zip(self.layers[1:], self.omegas, z, z[1:]):
            out.append(layer(z_l, (adj_t, propagate(adj_t, z_prev @ omega.t()))))
        return tuple(out)


class IGNNGraphClassifier(nn.Module):
    """IGNN for graph classification, as the reference's (``graphclassification/models.py``):
    ``layers`` implicit graph layers (:class:`IGNNStack`), the last one's node states summed
    over each graph (``global_add_pool``), then relu(V_0 .), dropout and V_1.

    Args:
        in_features: the node feature dimension.
        hidden: the width of every layer.
        num_classes: output classes.
        layers: implicit graph layers (the reference's 3).
        dropout: dropout before the last linear layer (training only).
    """

    def __init__(
        self,
        in_features: int,
        hidden: int = 64,
        num_classes: int = 2,
        layers: int = 3,
        dropout: float = 0.5,
    ):
        super().__init__()
        self.cell = IGNNStack(hidden, layers)
        self.omega = nn.Parameter(torch.empty(hidden, in_features))
        _uniform_(self.omega, hidden)
        self.pool_linear = nn.Linear(hidden, hidden)
        self.classifier = nn.Linear(hidden, num_classes)
        self.dropout = dropout

    def inject(self, x: GraphInput) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, ...]]:
        set_norm_bound(self.cell, x.pf_eigenvalue)
        b = propagate(x.adj_t, x.features @ self.omega.t())
        return (x.adj_t, b), tuple(torch.zeros_like(b) for _ in self.cell.layers)

    def head(self, z: tuple[Tensor, ...]) -> Tensor:
        pooled = z[-1].sum(1)  # padded rows are zero: the sum over each graph's nodes
        h = F.dropout(F.relu(self.pool_linear(pooled)), self.dropout, training=self.training)
        return self.classifier(h)
