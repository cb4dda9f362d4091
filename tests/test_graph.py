"""Graphs: the IGNN paper's chains as its code builds them, the well-posedness projection,
the IGNN equilibrium and its gradient through sparse products, bad graphs refused by name, and
the chains experiment through the runner."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("scipy")

from deqlab import DEQ, Bound
from deqlab.norm import InfNormBall, apply_norm, project_rows_l1
from deqlab.tasks.graph.chains import make_chains
from deqlab.tasks.graph.graph import (
    GraphError,
    GraphInput,
    check_graph,
    normalized_adjacency,
    perron_frobenius,
)
from deqlab.tasks.graph.model import IGNN

REFERENCE = json.loads((Path(__file__).parent / "parity/fixtures/ignn_chains.json").read_text())


@pytest.mark.parametrize("length", [10, 100])
def test_chains_are_the_reference_codes(length):
    """The same splits, adjacency and features as the IGNN code's load_citation_chain
    (numbers recorded from it by tests/parity/record_ignn.py)."""
    ref = REFERENCE[str(length)]
    d = make_chains(length)
    assert d["train"].tolist() == ref["train"]
    assert d["val"][:10].tolist() == ref["val_head"] and d["test"][:10].tolist() == ref["test_head"]
    assert int(d["test"].sum()) == ref["test_sum"] and int(d["y"].sum()) == ref["labels_sum"]
    assert float(d["x"].double().sum()) == pytest.approx(ref["feat_sum"], abs=1e-9)
    adj = normalized_adjacency(d["edge_index"], d["x"].shape[0])
    assert adj._nnz() == ref["adj_nnz"]
    assert float(adj.values().double().sum()) == pytest.approx(ref["adj_sum"], rel=1e-6)
    assert float(adj.values().double().pow(2).sum()) == pytest.approx(ref["adj_sq"], rel=1e-6)
    # upper triangular with 1/2 on the diagonal and 1 at each chain's end: lambda_pf = 1
    assert perron_frobenius(adj) == pytest.approx(1.0 + 1e-5, abs=1e-9)


def _project_by_hand(row: list[float], radius: float) -> list[float]:
    """The IGNN code's projection of one row onto the L1 ball (utils.projection_norm_inf)."""
    if sum(abs(v) for v in row) <= radius:
        return row
    a = sorted(abs(v) for v in row)
    s, n = sum(a) - radius, float(len(a))
    for v in a:
        if s / n > v:
            s, n = s - v, n - 1
        else:
            break
    alpha = s / n
    return [(1 if v > 0 else -1 if v < 0 else 0) * max(abs(v) - alpha, 0.0) for v in row]


def test_the_inf_norm_projection_is_the_reference_codes_row_by_row():
    torch.manual_seed(0)
    w = (
        torch.randn(12, 9, dtype=torch.float64)
        * torch.linspace(0.01, 1.0, 12, dtype=torch.float64)[:, None]
    )
    w[3, :4] = 0.0  # zeros keep their sign (none)
    got = project_rows_l1(w, 0.9)
    want = torch.tensor([_project_by_hand(r, 0.9) for r in w.tolist()], dtype=torch.float64)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-14)
    inside = w.abs().sum(1) <= 0.9
    assert 0 < int(inside.sum()) < 12 and torch.equal(got[inside], w[inside])
    assert (got.abs().sum(1) <= 0.9 + 1e-12).all()


def test_the_ball_projects_the_weight_itself_only_when_it_left_the_ball():
    """Projected gradient, as the IGNN code trains: the stored weight is projected in place
    (kappa / lambda_pf), and left alone (no new version) while inside."""
    layer = torch.nn.Linear(6, 6, bias=False)
    with torch.no_grad():
        layer.weight.mul_(10.0)
    apply_norm(layer, "inf_ball", target_norm=0.9)
    ball = layer.parametrizations.weight[0]
    assert isinstance(ball, InfNormBall)
    from deqlab.norm import set_norm_bound

    assert set_norm_bound(layer, 1.5) == 1
    w = layer.weight
    assert float(w.detach().abs().sum(1).max()) == pytest.approx(0.9 / 1.5)
    original = layer.parametrizations.weight.original
    assert torch.equal(original, w)  # the parameter itself moved
    version = original._version
    layer.weight  # noqa: B018
    assert original._version == version
    with pytest.raises(ValueError, match="inf_ball projects a matrix by its rows"):
        apply_norm(torch.nn.Conv2d(2, 2, 3), "inf_ball")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_projected_weight_is_not_projected_again(dtype):
    """Rows projected onto the ball sum to the radius up to rounding: using the weight again
    leaves it alone, so a graph that saved it for backward stays valid (an unrolled loop)."""
    torch.manual_seed(0)
    for _ in range(20):
        layer = torch.nn.Linear(16, 16, bias=False).to(dtype)
        apply_norm(layer, "inf_ball", target_norm=0.9)
        layer.weight  # noqa: B018  (projects: the rows sum to 16 * 0.125 on average)
        original = layer.parametrizations.weight.original
        version = original._version
        for _ in range(5):
            layer.weight  # noqa: B018
        assert original._version == version


def _chain_graph(length: int = 6, dtype=torch.float64):
    d = make_chains(length, chains_per_class=3, train=4, val=4, test=4)
    adj = normalized_adjacency(d["edge_index"], d["x"].shape[0])
    adj_t = adj.t().coalesce().to(dtype)
    return GraphInput(d["x"].to(dtype), adj_t, perron_frobenius(adj)), d


def test_ignn_equilibrium_and_gradient_match_the_dense_unrolled_iteration():
    """Through sparse products the solve reaches the fixed point of the dense equations, and
    ift's gradient is autograd's through 300 unrolled dense steps (float64)."""
    torch.manual_seed(0)
    graph, _ = _chain_graph()
    net = IGNN(100, hidden=8, num_classes=2, dropout=0.0).double()
    apply_norm(net.cell, "inf_ball", target_norm=0.9)
    deq = DEQ(
        {"name": "fixed_point", "max_iter": 300, "tol": 1e-12, "stop_mode": "abs"},
        {"name": "ift", "solver": "fixed_point", "max_iter": 300, "tol": 1e-13, "stop_mode": "abs"},
    )
    u, z0 = net.inject(graph)
    z, _ = deq(Bound(net.cell, u), z0)
    loss = net.head(z).logsumexp(-1).sum()
    params = [net.cell.linear.parametrizations.weight.original, net.omega, net.classifier.weight]
    got = torch.autograd.grad(loss, params)

    dense = graph.adj_t.to_dense()
    w, omega = params[0], params[1]
    b = dense @ (graph.features[0] @ omega.t())
    h = torch.zeros_like(b)
    for _ in range(300):
        h = torch.relu(dense @ h @ w.t() + b)
    torch.testing.assert_close(z[0], h, rtol=0, atol=1e-10)
    want = torch.autograd.grad(net.head(h.unsqueeze(0)).logsumexp(-1).sum(), params)
    for g, ref in zip(got, want):
        torch.testing.assert_close(g, ref, rtol=1e-8, atol=1e-10)
    assert not graph.adj_t.is_sparse or graph.adj_t.layout == torch.sparse_coo  # never densified


@pytest.mark.parametrize("adjacency", ["symmetric", "directed"])
def test_the_equilibrium_is_the_reference_codes_and_the_gradient_is_exact(adjacency):
    """On the numbers recorded from the IGNN code's ImplicitFunction: the same equilibrium
    (to its tolerance, 3e-6); the same dL/dW for a symmetric A; for the directed chain, the
    gradient of autograd through the unrolled iteration, where the reference's backward uses A
    in place of A^T (its relative error there: 64%)."""
    from deqlab.tasks.graph.model import IGNNCell

    ref = REFERENCE["implicit"]
    w, b, c = (torch.tensor(ref[k], dtype=torch.float64) for k in ("W", "B", "C"))
    a = torch.tensor(ref[adjacency]["A"], dtype=torch.float64)
    cell = IGNNCell(3).double()
    with torch.no_grad():
        cell.linear.weight.copy_(w)
    deq = DEQ(
        {"name": "fixed_point", "max_iter": 500, "tol": 1e-13, "stop_mode": "abs"},
        {"name": "ift", "solver": "fixed_point", "max_iter": 500, "tol": 1e-14, "stop_mode": "abs"},
    )
    u = (a.t().to_sparse(), b.t())
    z, _ = deq(Bound(cell, u), torch.zeros(1, 6, 3, dtype=torch.float64))
    x = z[0].t()  # the reference's layout: features by nodes
    torch.testing.assert_close(
        x, torch.tensor(ref[adjacency]["X"], dtype=torch.float64), rtol=0, atol=1e-5
    )
    (grad_w,) = torch.autograd.grad((x * c).sum(), [cell.linear.weight])
    reference = torch.tensor(ref[adjacency]["grad_W"], dtype=torch.float64)
    wk = w.clone().requires_grad_()
    unrolled = torch.zeros(3, 6, dtype=torch.float64)
    for _ in range(500):
        unrolled = torch.relu(wk @ unrolled @ a + b)
    (exact,) = torch.autograd.grad((unrolled * c).sum(), [wk])
    torch.testing.assert_close(grad_w, exact, rtol=1e-8, atol=1e-10)
    error = float((reference - exact).norm() / exact.norm())
    assert error < 1e-4 if adjacency == "symmetric" else error > 0.5  # 0.64 here


@pytest.mark.parametrize(
    ("edge_index", "labels", "message"),
    [
        (torch.zeros(2, 0, dtype=torch.long), torch.zeros(3, dtype=torch.long), "has no edges"),
        (torch.tensor([[0, 1], [1, 5]]), torch.zeros(3, dtype=torch.long), r"nodes outside 0\.\.2"),
        (torch.tensor([[0, 1], [1, 2]]), torch.tensor([0, 1, 4]), r"1 labels lie outside 0\.\.1"),
        (torch.tensor([[0, 1], [1, 2]]), torch.zeros(2, dtype=torch.long), "2 labels for 3 nodes"),
        (torch.tensor([0, 1, 2]), torch.zeros(3, dtype=torch.long), r"must be \(2, E\)"),
    ],
)
def test_a_graph_that_cannot_train_is_refused_by_name(edge_index, labels, message):
    with pytest.raises(GraphError, match=message):
        check_graph(3, edge_index, labels, num_classes=2)


def test_self_loops_and_isolated_nodes_are_normalized_once():
    adj = normalized_adjacency(torch.tensor([[0, 0, 1], [0, 1, 0]]), 3).to_dense()
    # node 0: self loop given and added (once), edge to 1; node 2: isolated, its own loop
    torch.testing.assert_close(adj.diagonal(), torch.tensor([0.5, 0.5, 1.0]))
    assert adj[2].sum() == 1.0 and adj[0, 2] == 0


def test_chains_refuse_impossible_settings():
    with pytest.raises(GraphError, match="at least 2 nodes"):
        make_chains(1)
    with pytest.raises(GraphError, match="splits ask for 320 nodes of 80"):
        make_chains(2)


CHAINS_RUN = ["trainer.num_sanity_val_steps=0", "~callbacks.progress", "logger=csv"]


def test_the_chains_experiments_train_through_the_runner(tmp_path):
    """experiment=ignn_chains and gcn_chains run end to end: IGNN solves (statistics logged,
    the weight kept in its ball), the GCN baseline trains without a solve. Figures are drawn
    at the first validation and every figures_every-th after it."""
    from deqlab.runner.main import run

    from .helpers.runs import compose_cfg, metrics

    ignn_dir, gcn_dir = tmp_path / "ignn", tmp_path / "gcn"
    every = "task.module.fit.figures_every=2"
    run(
        compose_cfg(
            ["experiment=ignn_chains", "trainer.max_epochs=3", every, *CHAINS_RUN], ignn_dir
        )
    )
    rows = metrics(ignn_dir)
    assert any(r.get("deq/val_fwd_nfe") for r in rows) and any(r.get("test/acc") for r in rows)
    assert len([r for r in rows if r.get("deq/val_unstable_share")]) == 3
    figures = ignn_dir / "csv" / "version_0" / "figures"
    for name in ("deq_residual_trace", "deq_stability"):
        assert sorted(p.name for p in figures.glob(f"{name}_*.png")) == [
            f"{name}_step1.png",  # after the first epoch's step: the first validation
            f"{name}_step3.png",  # the third
        ]
    run(compose_cfg(["experiment=gcn_chains", "trainer.max_epochs=3", *CHAINS_RUN], gcn_dir))
    rows = metrics(gcn_dir)
    assert not any(r.get("deq/val_fwd_nfe") for r in rows) and any(r.get("test/acc") for r in rows)


@pytest.mark.slow
def test_ignn_sees_the_whole_chain_where_a_two_layer_gcn_sees_two_hops(tmp_path):
    """The paper's point, at chain length 10 in a short run: IGNN classifies every test node,
    a 2-layer GCN only those within two hops of their chain's head (and guesses the rest)."""
    from deqlab.runner.main import run

    from .helpers.runs import compose_cfg, last_value, metrics

    accs = {}
    for name in ("ignn_chains", "gcn_chains"):
        out = tmp_path / name
        run(compose_cfg([f"experiment={name}", "trainer.max_epochs=150", *CHAINS_RUN], out))
        accs[name] = last_value(metrics(out), "test/acc")
    assert accs["ignn_chains"] == 1.0, accs
    assert accs["gcn_chains"] < 0.8, accs
