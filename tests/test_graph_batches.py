"""Batches of graphs: each graph one sample of the solve (it stops, converges and is reported
on its own, exactly as when solved alone), the disjoint union refused by name when it does not
add up, and graph classification on the real MUTAG files through torch_geometric's reader,
its download client and the runner."""

from __future__ import annotations

import csv
import shutil
import zipfile
from pathlib import Path

import pytest
import torch

pytest.importorskip("scipy")
pytest.importorskip("torch_geometric")

from deqlab import DEQ, Bound
from deqlab.norm import apply_norm
from deqlab.tasks.graph.graph import GraphError, pad_batch
from deqlab.tasks.graph.model import IGNNGraphClassifier
from deqlab.tasks.graph.tu import CollateGraphs, TUDataModule

MUTAG = Path(__file__).parent / "fixtures" / "tu"  # the real dataset's raw files


def _graphs(sizes, features=5, seed=0):
    """Random undirected graphs (both directions of each edge), as TU datasets store them."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in sizes:
        src, dst = torch.randint(0, n, (2, 2 * n), generator=g)
        keep = src != dst
        edges = torch.stack([src[keep], dst[keep]])
        edges = torch.cat([edges, edges.flip(0)], dim=1)
        x = torch.randn(n, features, generator=g, dtype=torch.float64)
        out.append((x, edges, int(torch.randint(0, 2, (), generator=g))))
    return out


def _net(layers=2):
    torch.manual_seed(0)
    net = IGNNGraphClassifier(5, hidden=6, num_classes=2, layers=layers, dropout=0.0).double()
    apply_norm(net.cell, "inf_ball", target_norm=0.9)
    return net


def _solve(net, graph, solver):
    deq = DEQ(
        {"max_iter": 200, "tol": 1e-9, "stop_mode": "abs", **solver},
        {"name": "ift", "solver": "fixed_point", "max_iter": 400, "tol": 1e-12},
    )
    u, z0 = net.inject(graph)
    return deq(Bound(net.cell, u), z0)


@pytest.mark.parametrize(
    "solver", [{"name": "fixed_point"}, {"name": "anderson", "m": 4}, {"name": "broyden"}]
)
def test_each_graph_of_a_batch_is_solved_as_if_alone(solver):
    """Per graph, not per batch or per node: a graph's equilibrium, residuals, convergence and
    returned step in a batch are those of solving it alone, and the padding stays zero."""
    graphs = _graphs([3, 9, 5, 12, 7])
    graphs[2] = (graphs[2][0], torch.zeros(2, 0, dtype=torch.long), 1)  # no edges: handled
    net = _net()
    collate = CollateGraphs(max_nodes=20)
    batch, _ = collate(graphs)
    z, info = _solve(net, batch, solver)
    assert info.abs_residual.shape == (5,) and info.converged.all()
    steps = []
    for g, graph in enumerate(graphs):
        alone, _ = collate([graph])
        z_alone, info_alone = _solve(net, alone, solver)
        n = graph[0].shape[0]
        for part, part_alone in zip(z, z_alone):
            torch.testing.assert_close(part[g, :n], part_alone[0], rtol=0, atol=1e-12)
            assert not part[g, n:].any()  # padded rows: no node, exactly zero
        assert int(info.best_step[g]) == int(info_alone.best_step[0])
        torch.testing.assert_close(
            info.abs_residual[g], info_alone.abs_residual[0], rtol=1e-6, atol=1e-13
        )
        steps.append(int(info.best_step[g]))
    assert len(set(steps)) > 1  # the graphs did stop at different steps


def test_a_batchs_implicit_gradient_is_the_sum_of_its_graphs():
    graphs = _graphs([4, 8, 6])
    net = _net(layers=3)
    collate = CollateGraphs(max_nodes=20)
    batch, labels = collate(graphs)
    z, _ = _solve(net, batch, {"name": "anderson"})
    loss = torch.nn.functional.cross_entropy(net.head(z), labels, reduction="sum")
    got = torch.autograd.grad(loss, list(net.parameters()))
    want = [torch.zeros_like(p) for p in net.parameters()]
    for graph in graphs:
        alone, label = collate([graph])
        z, _ = _solve(net, alone, {"name": "anderson"})
        loss = torch.nn.functional.cross_entropy(net.head(z), label, reduction="sum")
        for w, g in zip(want, torch.autograd.grad(loss, list(net.parameters()))):
            w += g
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-7, atol=1e-10)


def test_the_joint_solve_is_the_layers_solved_in_turn():
    """The stack's joint fixed point is layer 1's equilibrium, then layer 2's with layer 1's
    as its injection: what the IGNN code computes one layer after the other."""
    from deqlab.tasks.graph.model import propagate

    graph, _ = CollateGraphs(20)(_graphs([6, 4]))
    net = _net(layers=2)
    z, _ = _solve(net, graph, {"name": "fixed_point"})
    (adj_t, b), _ = net.inject(graph)
    w1 = net.cell.layers[0].linear.weight
    w2 = net.cell.layers[1].linear.weight
    x1 = torch.zeros_like(b)
    for _ in range(300):
        x1 = torch.relu(propagate(adj_t, x1 @ w1.t()) + b)
    b2 = propagate(adj_t, x1 @ net.cell.omegas[0].t())
    x2 = torch.zeros_like(b)
    for _ in range(300):
        x2 = torch.relu(propagate(adj_t, x2 @ w2.t()) + b2)
    torch.testing.assert_close(z[0], x1, rtol=0, atol=1e-8)
    torch.testing.assert_close(z[1], x2, rtol=0, atol=1e-8)


def test_the_stacks_implicit_gradient_on_real_molecules_is_autograds_through_the_iteration():
    """ift through the three-layer joint equilibrium, with the experiment's backward settings,
    against autograd through 300 unrolled steps (float64, eight MUTAG graphs)."""
    dm = TUDataModule(str(MUTAG))
    dm.setup()
    graph, labels = CollateGraphs(100)(dm.test_set.items[:8])
    graph = type(graph)(graph.features.double(), graph.adj_t.double(), 1.0, graph.mask)
    torch.manual_seed(0)
    net = IGNNGraphClassifier(7, hidden=8, num_classes=2, layers=3, dropout=0.0).double()
    apply_norm(net.cell, "inf_ball", target_norm=0.9)
    backward = {"output": "fz", "jacobian_at": "z", "solve_from": "zeros"}
    deq = DEQ(
        {"name": "fixed_point", "max_iter": 300, "tol": 1e-12, "stop_mode": "abs"},
        {"name": "ift", "solver": "fixed_point", "max_iter": 300, "tol": 1e-13, **backward},
    )
    u, z0 = net.inject(graph)
    z, _ = deq(Bound(net.cell, u), z0)
    params = list(net.parameters())
    got = torch.autograd.grad(torch.nn.functional.cross_entropy(net.head(z), labels), params)
    u, z = net.inject(graph)
    for _ in range(300):
        z = net.cell(z, u)  # the projected weights are not projected again: no new version
    want = torch.autograd.grad(torch.nn.functional.cross_entropy(net.head(z), labels), params)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-12)


def test_the_graph_classifier_is_the_reference_codes_on_real_molecules():
    """On numbers recorded from the IGNN code's graph classifier (tests/parity/
    record_ignn_mutag.py: its weights, eight MUTAG graphs): the same log-probabilities (to
    1e-5; 1.5e-6 seen), loss and gradients (to 1e-3 relative; 2.2e-4 seen), with the
    experiment's solver settings: the layers solved jointly here, in turn there, each to a
    3e-6 tolerance."""
    import json

    from deqlab.tasks.graph.tu import read_tu

    ref = json.loads((Path(__file__).parent / "parity/fixtures/ignn_mutag.json").read_text())
    graph, labels = CollateGraphs(100)(read_tu(MUTAG / "MUTAG" / "raw", "MUTAG")[:8])
    assert labels.tolist() == ref["labels"]
    net = IGNNGraphClassifier(7, hidden=16, num_classes=2, layers=3, dropout=0.0)
    apply_norm(net.cell, "inf_ball", target_norm=0.9)
    params = dict(net.named_parameters())
    with torch.no_grad():
        for name, value in ref["weights"].items():
            key = name.replace(".weight", ".parametrizations.weight.original")
            params[key if key in params else name].copy_(torch.tensor(value))
    deq = DEQ(
        {"name": "fixed_point", "max_iter": 300, "tol": 3e-6, "stop_mode": "abs"},
        {
            "name": "ift",
            "solver": "fixed_point",
            "max_iter": 300,
            "tol": 3e-6,
            "stop_mode": "abs",
            "output": "fz",
            "jacobian_at": "z",
            "solve_from": "zeros",
        },
    )
    u, z0 = net.inject(graph)
    z, _ = deq(Bound(net.cell, u), z0)
    log_probs = torch.log_softmax(net.head(z), dim=1)
    torch.testing.assert_close(log_probs, torch.tensor(ref["log_probs"]), rtol=0, atol=1e-5)
    loss = torch.nn.functional.nll_loss(log_probs, labels)
    assert float(loss) == pytest.approx(ref["loss"], abs=1e-5)
    grads = torch.autograd.grad(loss, list(params.values()))
    for name, g in zip(params, grads):
        want = torch.tensor(
            ref["grads"][name.replace(".parametrizations.weight.original", ".weight")]
        )
        assert float((g - want).norm() / want.norm()) < 1e-3, name


@pytest.mark.parametrize(
    ("batch", "edges", "max_nodes", "message"),
    [
        ([0, 0, 1], [[0], [1]], 10, r"shape \(3,\) for 4 nodes"),
        ([0, 1, 0, 1], [[0], [2]], 10, "contiguous run"),
        ([1, 1, 2, 2], [[0], [1]], 10, "contiguous run"),
        ([0, 0, 1, 1], [[1], [2]], 10, "edge 0 joins graph 0 to graph 1"),
        ([0, 0, 0, 1], [[0], [1]], 2, "graph 0 of the batch has 3 nodes, above max_nodes=2"),
    ],
)
def test_a_union_that_does_not_add_up_is_refused_by_name(batch, edges, max_nodes, message):
    x = torch.zeros(4, 2)
    batch = torch.tensor(batch)
    if message.startswith("shape"):
        batch = batch[:3]
    with pytest.raises(GraphError, match=message):
        pad_batch(x, torch.tensor(edges), batch, max_nodes)


# -- MUTAG: the real raw files ----------------------------------------------------------------


def test_mutag_is_read_from_its_raw_files_and_split_into_stratified_folds():
    seen = set()
    for fold in range(10):
        dm = TUDataModule(str(MUTAG), fold=fold)
        dm.setup()
        train, test = dm.train_set.items, dm.test_set.items
        assert len(train) + len(test) == 188 and len(test) in (18, 19)
        assert sum(y for *_, y in test) in (12, 13)  # 125 of 188 are mutagenic: 2/3 per fold
        ids = {id(item) for item in test}
        seen |= {sum(x.shape[0] for x, *_ in test)}
        assert not ids & {id(item) for item in train}
    nodes = sum(x.shape[0] for x, *_ in train + test)
    edges = sum(e.shape[1] for _, e, _ in train + test)
    assert (nodes, edges) == (3371, 7442)  # MUTAG's README: 17.93 nodes, 19.79 edges a graph
    assert train[0][0].shape[1] == 7 and torch.equal(
        train[0][0].sum(1), torch.ones(len(train[0][0]))
    )
    graph, labels = next(iter(dm.test_dataloader()))
    assert graph.num_graphs == len(labels) == len(test)
    assert graph.pf_eigenvalue == pytest.approx(1.0, abs=1e-4)  # D^-1/2 (A + I) D^-1/2, symmetric


def _write_tu(raw: Path, attributes: bool, labels: bool) -> None:
    """Two graphs (a triangle, an edge) in the TU raw format: 1-based, comma separated."""
    raw.mkdir(parents=True)
    edges = [(1, 2), (2, 1), (2, 3), (3, 2), (1, 3), (3, 1), (4, 5), (5, 4)]
    (raw / "TOY_A.txt").write_text("".join(f"{a}, {b}\n" for a, b in edges))
    (raw / "TOY_graph_indicator.txt").write_text("1\n1\n1\n2\n2\n")
    (raw / "TOY_graph_labels.txt").write_text("1\n-1\n")
    if attributes:
        (raw / "TOY_node_attributes.txt").write_text("0.5\n1.5\n2.5\n3.5\n4.5\n")
    if labels:
        (raw / "TOY_node_labels.txt").write_text("0\n1\n2\n0\n1\n")


@pytest.mark.parametrize(
    ("attributes", "labels", "width"), [(True, True, 3), (False, True, 3), (True, False, 1)]
)
def test_tu_features_are_the_node_labels_or_else_the_degrees(tmp_path, attributes, labels, width):
    """As TUDataset's default (use_node_attr=False) and the IGNN code read them: node labels
    one-hot, continuous attributes left out; without labels, each node's in-degree."""
    from deqlab.tasks.graph.tu import read_tu

    _write_tu(tmp_path / "raw", attributes, labels)
    graphs = read_tu(tmp_path / "raw", "TOY")
    assert [x.shape for x, _, _ in graphs] == [(3, width), (2, width)]
    assert [y for *_, y in graphs] == [1, 0]
    if labels:
        assert graphs[0][0].argmax(1).tolist() == [0, 1, 2]
    else:
        assert graphs[0][0][:, 0].tolist() == [2.0, 2.0, 2.0]  # triangle: in-degree 2


def test_missing_data_names_the_download_and_the_client_fetches_it(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"set task\.datamodule\.download=true"):
        TUDataModule(str(tmp_path / "root")).prepare_data()
    # torch_geometric's TUDataset download, from a folder holding MUTAG.zip as the host serves it
    host = tmp_path / "host"
    host.mkdir()
    with zipfile.ZipFile(host / "MUTAG.zip", "w") as z:
        for f in (MUTAG / "MUTAG" / "raw").iterdir():
            z.write(f, f"MUTAG/{f.name}")
    dm = TUDataModule(str(tmp_path / "root"), download=True, url=str(host))
    dm.prepare_data()
    dm.setup()
    assert len(dm.train_set) + len(dm.test_set) == 188
    assert (tmp_path / "root" / "MUTAG" / "raw" / "MUTAG_A.txt").is_file()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"num_features": 5}, "have 7 features.*num_features=5: set it to 7"),
        ({"num_classes": 1}, r"labels up to 1, outside 0\.\.0"),
        ({"max_nodes": 20}, "has 28 nodes, above task.datamodule.max_nodes=20"),
    ],
)
def test_a_dataset_the_network_cannot_take_is_refused_by_name(options, message):
    with pytest.raises(GraphError, match=message):
        TUDataModule(str(MUTAG), **options).setup()
    with pytest.raises(ValueError, match="fold=10 is not a fold"):
        TUDataModule(str(MUTAG), fold=10)


def test_mutag_trains_through_the_runner_and_analyze_reads_each_graph(tmp_path):
    """experiment=ignn_mutag for two epochs, then deqlab analyze: one row per graph of the
    held-out fold, each with the steps, residuals and accuracy of its own solve."""
    from hydra.utils import instantiate

    from deqlab.runner.analyze import analyze
    from deqlab.runner.checkpoint import read_checkpoint, run_config
    from deqlab.runner.main import run
    from deqlab.runner.stability import sample_steps

    from .helpers.runs import compose_cfg, last_value, metrics

    data = tmp_path / "data"
    shutil.copytree(MUTAG, data)
    overrides = ["experiment=ignn_mutag", "trainer.max_epochs=2", f"paths.data_dir={data}"]
    overrides += ["task.module.net.hidden=16", "trainer.num_sanity_val_steps=0", "logger=csv"]
    overrides += ["callbacks.last_checkpoint.every_n_epochs=1"]
    run(compose_cfg(overrides, tmp_path / "run"))
    rows = metrics(tmp_path / "run")
    assert any(r.get("deq/fwd_nfe") for r in rows)
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    report = analyze(ckpt, grid=[1, 2, 4, 300], sradius_iters=2)
    with open(report.parent / "samples.csv") as fh:
        samples = list(csv.DictReader(fh))
    assert len(samples) == 19  # the graphs of the held-out fold
    acc = sum(float(s["acc"]) for s in samples) / len(samples)
    assert acc == pytest.approx(last_value(rows, "test/acc"), abs=1e-6)

    cfg = run_config(ckpt, "test")
    dm = instantiate(cfg.task.datamodule)
    dm.setup("test")
    module = instantiate(cfg.task.module, init_from=None)
    module.load_state_dict(read_checkpoint(ckpt)["state_dict"])
    graph, _ = next(iter(dm.test_dataloader()))
    with torch.no_grad():
        _, info = module.eval()(graph)
    steps = sample_steps(info)
    for g, s in enumerate(samples):  # per graph: not one figure for the batch
        assert float(s["abs_residual"]) == pytest.approx(float(info.abs_residual[g]), rel=1e-6)
        assert int(s["steps"]) == int(steps[g])
    assert len({s["abs_residual"] for s in samples}) == len(samples)
