"""The IGNN training step with the adjacency sparse (deqlab's) against the same step with it
dense: time and memory per step at chain graphs of growing size."""

from __future__ import annotations

import time
from typing import Any

import torch

from deqlab import DEQ, Bound
from deqlab.norm import apply_norm
from deqlab.tasks.graph.chains import make_chains
from deqlab.tasks.graph.graph import GraphInput, normalized_adjacency
from deqlab.tasks.graph.model import IGNN

from .memory import SavedBytes


def _step(net: IGNN, deq: DEQ, graph: GraphInput, labels: torch.Tensor) -> None:
    u, z0 = net.inject(graph)
    z, _ = deq(Bound(net.cell, u), z0)
    torch.nn.functional.cross_entropy(net.head(z)[0], labels).backward()


def graph_sparse(
    device: torch.device, repeats: int = 3, lengths: tuple[int, ...] = (25, 100, 200)
) -> list[dict[str, Any]]:
    """Seconds per training step (forward solve and ift backward, 30 fixed-point steps each)
    and the bytes of the adjacency and of autograd's saved tensors, sparse and dense, on the
    chains at each chain length (40 chains: 40 L nodes)."""
    rows = []
    for length in lengths:
        d = make_chains(length, train=4, val=4, test=4)
        n = d["x"].shape[0]
        adj_t = normalized_adjacency(d["edge_index"], n).t().coalesce().to(device)
        x, labels = d["x"].to(device), d["y"].to(device)
        row: dict[str, Any] = {"bench": "graph_sparse", "nodes": n}
        for kind, a in (("sparse", adj_t), ("dense", adj_t.to_dense())):
            torch.manual_seed(0)
            net = IGNN(x.shape[1], hidden=16, num_classes=2, dropout=0.0).to(device)
            apply_norm(net.cell, "inf_ball", target_norm=0.9)
            deq = DEQ(
                {"name": "fixed_point", "max_iter": 30, "tol": None},
                {"name": "ift", "solver": "fixed_point", "max_iter": 30, "tol": None},
            )
            graph = GraphInput(x, a, 1.0)
            _step(net, deq, graph, labels)  # warm-up
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                _step(net, deq, graph, labels)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - start)
            with SavedBytes() as saved:
                u, z0 = net.inject(graph)
                z, _ = deq(Bound(net.cell, u), z0)
                loss = torch.nn.functional.cross_entropy(net.head(z)[0], labels)
            loss.backward()
            adj_bytes = a.values().nbytes + a.indices().nbytes if a.is_sparse else a.nbytes
            row[f"{kind}_s"] = sorted(times)[len(times) // 2]
            row[f"{kind}_adj_MB"] = adj_bytes / 2**20
            row[f"{kind}_saved_MB"] = saved.total / 2**20
        row["dense_over_sparse_time"] = row["dense_s"] / row["sparse_s"]
        rows.append(row)
    return rows
