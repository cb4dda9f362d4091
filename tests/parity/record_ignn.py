"""Record the chains fixture from the IGNN code itself.

    python tests/parity/record_ignn.py /path/to/SwiftieH-IGNN > tests/parity/fixtures/ignn_chains.json

Runs ``load_citation_chain`` of ``nodeclassification/utils.py`` (github.com/SwiftieH/IGNN) with
its own normalization (``normalization.py``) at chain lengths 10 and 100, and writes numbers,
never code: the train split, the heads of the val and test splits, the test indices' sum,
and checksums of the normalized adjacency, the features and the labels.
``tests/test_graph.py`` requires deqlab's chains to give the same numbers.

It also runs the reference's ImplicitFunction (functions.py) on a 6-node directed chain and on
its symmetrized adjacency, and records its equilibrium X and its gradient dL/dW for
L = sum(X * C): the forward solve deqlab must reproduce, and the backward pass whose dL/dW
uses A where A^T belongs (``grad_W = grad_z @ spmm(A, X.T)``): right for a symmetric A only.

Only the function is taken from utils.py (its other imports, torch_sparse, networkx and
sklearn, serve the other datasets); its chain length is the constant ``l = 10`` in its body,
replaced for each length.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch


def main(checkout: Path) -> None:
    def show(path: str) -> str:
        return subprocess.run(
            ["git", "-C", str(checkout), "show", f"HEAD:nodeclassification/{path}"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout

    utils = show("utils.py")
    start = utils.index("def load_citation_chain")
    source = utils[start : utils.index("\ndef ", start + 1)]
    scope: dict = {"np": np, "torch": torch}
    exec(show("normalization.py"), scope)
    scope["sp"] = __import__("scipy.sparse", fromlist=["sparse"])
    scope["preprocess_citation"] = lambda adj, features, normalization: (
        scope["fetch_normalization"](normalization)(adj),
        scope["row_normalize"](features),
    )

    def to_torch(mx):
        mx = mx.tocoo().astype(np.float32)
        index = torch.from_numpy(np.vstack((mx.row, mx.col)).astype(np.int64))
        return torch.sparse_coo_tensor(index, torch.from_numpy(mx.data), mx.shape)

    scope["sparse_mx_to_torch_sparse_tensor"] = to_torch
    out = {}
    for length in (10, 100):
        exec(source.replace("l = 10 # length of chain", f"l = {length}"), scope)
        adj, x, y, train, val, test = scope["load_citation_chain"]("AugNormAdj", False)
        adj = adj.coalesce()
        out[length] = dict(
            train=train.tolist(),
            val_head=val[:10].tolist(),
            test_head=test[:10].tolist(),
            test_sum=int(test.sum()),
            adj_nnz=int(adj._nnz()),
            adj_sum=float(adj.values().double().sum()),
            adj_sq=float(adj.values().double().pow(2).sum()),
            feat_sum=float(x.double().sum()),
            labels_sum=int(y.sum()),
        )
    out["implicit"] = implicit_function(show("functions.py"))
    json.dump(out, sys.stdout)


def implicit_function(functions_source: str) -> dict:
    import torch.nn.functional as F

    scope: dict = {}
    exec(functions_source.replace("from utils import sparse_mx_to_torch_sparse_tensor", ""), scope)
    implicit = scope["ImplicitFunction"]
    g = torch.Generator().manual_seed(0)
    n, m = 6, 3
    a = torch.eye(n, dtype=torch.float64) + torch.diag(torch.ones(n - 1, dtype=torch.float64), 1)
    d = a.sum(1).pow(-0.5)
    directed = d[:, None] * a * d[None, :]
    w = 0.3 * torch.randn(m, m, dtype=torch.float64, generator=g)
    b = torch.randn(m, n, dtype=torch.float64, generator=g)
    c = torch.randn(m, n, dtype=torch.float64, generator=g)
    out = {"W": w.tolist(), "B": b.tolist(), "C": c.tolist()}
    for name, adj in (("directed", directed), ("symmetric", (directed + directed.t()) / 2)):
        wk = w.clone().requires_grad_()
        x = implicit.apply(
            wk, torch.zeros(m, n, dtype=torch.float64), adj.to_sparse(), b, F.relu, 300, 300
        )
        (grad_w,) = torch.autograd.grad((x * c).sum(), [wk])
        out[name] = {"A": adj.tolist(), "X": x.tolist(), "grad_W": grad_w.tolist()}
    return out


if __name__ == "__main__":
    main(Path(sys.argv[1]))
