"""Record the MUTAG fixture from the IGNN code's graph classifier itself.

    python tests/parity/record_ignn_mutag.py /path/to/SwiftieH-IGNN \
        > tests/parity/fixtures/ignn_mutag.json

Builds the reference's ``IGNN`` (``graphclassification/models.py``: three ImplicitGraph layers
of ``layers.py``, sum pooling, V_0 and V_1) with 16 hidden units and no dropout, on the first
eight graphs of the real MUTAG files (``tests/fixtures/tu``, read by torch_geometric's
``read_tu_data``), the adjacency of unit edge weights normalized by the reference's
``AugNormAdj``. It runs one forward pass and the backward pass of the NLL loss, and writes
numbers, never code: the weights as used (after the reference's projection), the log-
probabilities, the loss and every weight's gradient. ``tests/test_graph_batches.py`` loads
the weights into deqlab's IGNNGraphClassifier and requires the same outputs and gradients.

The reference's utils.py imports torch_sparse, networkx and scikit-learn for other datasets;
they are stubbed here, unused by the functions the model calls. The checkout is a work tree
(``git clone``): its modules are imported as the script imports them.
"""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import numpy as np
import torch

FIXTURE = Path(__file__).parents[1] / "fixtures" / "tu" / "MUTAG" / "raw"


def main(checkout: Path) -> None:
    from importlib.machinery import ModuleSpec

    for name in ("torch_sparse", "networkx", "sklearn"):
        stub = types.ModuleType(name)
        stub.__spec__ = ModuleSpec(name, None)
        sys.modules.setdefault(name, stub)
    sys.modules["sklearn"].metrics = types.ModuleType("sklearn.metrics")  # type: ignore[attr-defined]
    sys.path.insert(0, str(checkout / "graphclassification"))
    from models import IGNN  # the reference's
    from normalization import fetch_normalization
    from scipy.sparse import csr_matrix
    from torch_geometric.io import read_tu_data

    data, slices, _ = read_tu_data(str(FIXTURE), "MUTAG")
    graphs = 8
    nodes = int(slices["x"][graphs])
    edges = int(slices["edge_index"][graphs])
    offsets = slices["x"][:graphs]
    counts = (slices["x"][1 : graphs + 1] - offsets).tolist()
    batch = torch.repeat_interleave(torch.arange(graphs), torch.tensor(counts))
    # read_tu_data numbers each graph's nodes from 0: shift them into the union's numbering
    edge_graph = torch.repeat_interleave(
        torch.arange(graphs), slices["edge_index"][1 : graphs + 1] - slices["edge_index"][:graphs]
    )
    edge_index = data.edge_index[:, :edges] + offsets[edge_graph]
    x = data.x[:nodes].float()
    y = data.y[:graphs]
    ones = np.ones(edges, dtype=np.float32)
    adj_sp = csr_matrix((ones, (edge_index[0].numpy(), edge_index[1].numpy())), (nodes, nodes))
    adj_nz = fetch_normalization("AugNormAdj")(adj_sp)
    index = torch.from_numpy(np.array([adj_nz.row, adj_nz.col], dtype=np.int64))
    adj = torch.sparse_coo_tensor(index, torch.tensor(adj_nz.data, dtype=torch.float32))

    torch.manual_seed(0)
    model = IGNN(nfeat=7, nhid=16, nclass=2, num_node=None, dropout=0.0, kappa=0.9)
    out = model(x.T, adj, batch)
    loss = torch.nn.functional.nll_loss(out, y)
    layers = [model.ig1, model.ig2, model.ig3]
    used = {  # the tensors the forward pass used, by deqlab's names
        "omega": layers[0].Omega_1,
        "cell.layers.0.linear.weight": layers[0].W,
        "cell.layers.1.linear.weight": layers[1].W,
        "cell.layers.2.linear.weight": layers[2].W,
        "cell.omegas.0": layers[1].Omega_1,
        "cell.omegas.1": layers[2].Omega_1,
        "pool_linear.weight": model.V_0.weight,
        "pool_linear.bias": model.V_0.bias,
        "classifier.weight": model.V_1.weight,
        "classifier.bias": model.V_1.bias,
    }
    grads = torch.autograd.grad(loss, list(used.values()))
    record = {
        "graphs": graphs,
        "labels": y.tolist(),
        "weights": {k: v.detach().tolist() for k, v in used.items()},
        "log_probs": out.detach().tolist(),
        "loss": float(loss),
        "grads": {k: g.tolist() for k, g in zip(used, grads)},
    }
    json.dump(record, sys.stdout)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
