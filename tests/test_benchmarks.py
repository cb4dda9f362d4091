"""The benchmark suite's own pieces: a faithful baseline and a memory probe that can tell."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from benchmarks.baseline import TutorialDEQFixedPoint, tutorial_anderson
from benchmarks.memory import SavedBytes, memory
from deqlab import get_solver

from .helpers.problems import ConvCell


def test_tutorial_baseline_solves_and_differentiates_like_deqlab():
    cell = ConvCell()
    x = torch.randn(2, 4, 5, 5)
    with torch.no_grad():
        theirs, _ = tutorial_anderson(
            lambda z: cell(z, x), torch.zeros_like(x), max_iter=80, tol=1e-6
        )
        ours = get_solver("anderson")(
            lambda z: cell(z, x), torch.zeros_like(x), max_iter=80, tol=1e-6
        ).z
    assert (theirs - ours).norm() / ours.norm() < 1e-3
    layer = TutorialDEQFixedPoint(cell, max_iter=80, tol=1e-6)
    layer(x).sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in cell.parameters())


def test_saved_bytes_counts_what_autograd_keeps():
    w = torch.randn(100, 100, requires_grad=True)
    with SavedBytes() as one:
        torch.tanh(w @ w).sum()
    with SavedBytes() as three:
        z = w
        for _ in range(3):
            z = torch.tanh(z @ w)
        z.sum()
    # w (counted once) and tanh's output; each further layer keeps one more 100x100 output.
    assert one.total == 2 * 100 * 100 * 4
    assert three.total - one.total == 2 * 100 * 100 * 4


def test_deq_training_memory_is_flat_in_the_budget_and_far_below_unrolled():
    rows = {r["variant"]: r["saved_MB"] for r in memory(torch.device("cpu"), batch=2)}
    budgets = [v for k, v in rows.items() if k.startswith("deqlab")]
    assert max(budgets) <= 1.05 * min(budgets)
    assert max(budgets) <= 0.25 * rows["unrolled 30 steps, backprop"]


def test_history_products_run_the_solvers_kernels():
    from benchmarks.history import history_products

    z0 = torch.zeros(2, 3, 4)
    assert history_products("fixed_point", z0, 20) is None
    for name in ("anderson", "broyden"):
        history_products(name, z0, 20)()  # shapes line up for every step of a 20-step solve


def test_lm_memory_deq_keeps_one_layer_whatever_its_budget():
    """At a small width: the DEQ's activation bytes do not depend on its forward budget and
    are about one layer's, while an unrolled stack keeps one layer's per layer."""
    from benchmarks.lm_memory import lm_memory

    width = {"d_model": 16, "n_head": 2, "d_head": 8, "d_inner": 64}
    rows = {
        r["variant"]: r for r in lm_memory(torch.device("cpu"), 2, width, 6, 6, depth=4, budget=8)
    }
    deq2 = rows["DEQ-Transformer, ift (forward budget 2)"]["activation_MB"]
    deq6 = rows["DEQ-Transformer, ift (forward budget 6)"]["activation_MB"]
    txl = rows["Transformer-XL, 4 untied layers"]["activation_MB"]
    unrolled = rows["DEQ unrolled for its budget (8), backprop"]["activation_MB"]
    assert deq2 == deq6 and 0 < deq2 < txl / 2
    # per layer L over what every variant keeps (the segment's context): the 4-layer stack
    # keeps ~3L more than the DEQ (one recorded layer and its ift leaf), the 8-layer one 4L more
    assert 1.0 < (unrolled - txl) / (txl - deq2) < 1.5


def test_soak_growth_is_the_least_squares_slope_after_warmup():
    from benchmarks.soak import growth_per_1000

    rows = [
        {"step": s, "rss_mb": 500.0 if s < 300 else 1000.0 + 0.04 * s} for s in range(0, 1500, 25)
    ]
    assert abs(growth_per_1000(rows, warmup=300) - 40.0) < 1e-9  # the jump before 300 ignored
    noisy = [
        {"step": r["step"], "rss_mb": r["rss_mb"] + (5 if i % 2 else -5)}
        for i, r in enumerate(rows)
    ]
    assert abs(growth_per_1000(noisy, warmup=300) - 40.0) < 2.0


def test_soak_probe_records_resident_memory_every_n_steps(tmp_path):
    from types import SimpleNamespace

    from benchmarks.soak import RSSProbe, rss_mb

    probe = RSSProbe(str(tmp_path / "rss.jsonl"), every=2)
    for step in range(5):
        probe.on_train_batch_end(SimpleNamespace(global_step=step), None, None, None, step)
    lines = (tmp_path / "rss.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    assert [r["step"] for r in rows] == [0, 2, 4]
    # the kernel's own figure, from another file and unit
    status = Path("/proc/self/status").read_text()
    vm_rss_kb = int(
        next(line for line in status.splitlines() if line.startswith("VmRSS:")).split()[1]
    )
    assert abs(rss_mb() - vm_rss_kb / 1024) < 5


def test_the_graph_benchmark_steps_the_same_model_sparse_and_dense():
    """Both steps train the same IGNN on the same chains: the gradients agree, and the sparse
    adjacency and its saved tensors take a fraction of the dense ones."""
    from benchmarks.graph_sparse import graph_sparse
    from deqlab import DEQ, Bound
    from deqlab.tasks.graph.chains import make_chains
    from deqlab.tasks.graph.graph import GraphInput, normalized_adjacency
    from deqlab.tasks.graph.model import IGNN

    (row,) = graph_sparse(torch.device("cpu"), repeats=1, lengths=(20,))
    assert row["nodes"] == 800 and row["sparse_s"] > 0 and row["dense_s"] > 0
    assert row["sparse_adj_MB"] < row["dense_adj_MB"] / 50
    assert row["sparse_saved_MB"] < row["dense_saved_MB"] / 2
    d = make_chains(20, train=4, val=4, test=4)
    adj_t = normalized_adjacency(d["edge_index"], 800).t().coalesce().double()
    grads = []
    for a in (adj_t, adj_t.to_dense()):
        torch.manual_seed(0)
        net = IGNN(100, hidden=8, dropout=0.0).double()
        deq = DEQ({"name": "fixed_point", "max_iter": 30, "tol": None})
        u, z0 = net.inject(GraphInput(d["x"].double(), a, 1.0))
        z, _ = deq(Bound(net.cell, u), z0)
        net.head(z).logsumexp(-1).sum().backward()
        grads.append([p.grad for p in net.parameters()])
    for sparse, dense in zip(*grads):
        torch.testing.assert_close(sparse, dense, rtol=1e-10, atol=1e-12)


def test_the_inr_benchmark_shows_explicit_memory_growing_and_the_deqs_flat():
    from benchmarks.inr_memory import inr_memory

    short, long = inr_memory(torch.device("cpu"), repeats=1, depths=(2, 6), side=16, width=16)
    assert long["explicit_saved_MB"] > 2.5 * short["explicit_saved_MB"]  # k layers' activations
    assert long["deq_saved_MB"] == short["deq_saved_MB"]  # one f at z*, whatever k
    assert long["explicit_params"] > long["deq_params"] == short["deq_params"]


def test_the_inverse_benchmark_shows_unrolled_memory_growing_and_the_deqs_flat():
    pytest.importorskip("deepinv")
    from benchmarks.inverse_memory import inverse_memory

    short, long = inverse_memory(torch.device("cpu"), repeats=1, iterations=(2, 6))
    assert long["unrolled_saved_MB"] > 2.5 * short["unrolled_saved_MB"]  # k activations
    assert long["deq_saved_MB"] == short["deq_saved_MB"]  # one f at z*, whatever k
    assert short["deq_saved_MB"] < short["unrolled_saved_MB"]


def test_the_reproduction_records_every_epochs_test_accuracy(tmp_path):
    """benchmarks.reproduce on the CPU, as a GPU run is made (--fast included: the data
    on the device, both solves captured, which on a CPU warn and run eagerly): a tiny tutorial
    model for two epochs, whose per-epoch accuracies join the results file beside an entry
    that was there before."""
    from benchmarks.reproduce import record, reproduce

    from .helpers.runs import write_cifar_folder

    data = write_cifar_folder(tmp_path / "data", train_per_class=4, test_per_class=2)
    tiny = ["trainer.max_epochs=2", "task.module.net.channels=8", "task.module.net.inner=8"]
    tiny += ["task.module.net.groups=2", "task.datamodule.batch_size=20"]
    entry = reproduce("cifar_tutorial", str(data), tmp_path / "run", "cpu", True, tiny)
    assert entry["epochs"] == 2 and len(entry["test_acc"]) == 2
    assert len(entry["epoch_train_seconds"]) == 2 and all(
        t > 0 for t in entry["epoch_train_seconds"]
    )
    assert all(0 <= a <= 1 for a in entry["test_acc"]) and entry["final_test_acc"] is not None
    assert entry["published_test_acc"] == 0.816 and entry["device"] == "cpu"
    assert "solver.capture=true" in entry["command"] and "paths." not in entry["command"]
    out = tmp_path / "cuda.json"
    out.write_text(json.dumps({"meta": {}, "reproduction": [{"experiment": "cifar_mdeq_small"}]}))
    record(entry, out)
    record(entry, out)  # a rerun replaces its own entry
    results = json.loads(out.read_text())
    assert [e["experiment"] for e in results["reproduction"]] == [
        "cifar_mdeq_small",
        "cifar_tutorial",
    ]
    assert "meta" in results


def test_each_capture_mutant_names_one_line_of_capture_py():
    """benchmarks.capture_mutants runs on a GPU only: here, that each of its mutants still
    finds its line, once, in the file it mutates."""
    from benchmarks.capture_mutants import MUTANTS, TARGET

    source = TARGET.read_text()
    assert [what for what, line, _ in MUTANTS if source.count(line) != 1] == []


def test_model_step_times_each_precision_and_builds_a_language_models_batch():
    """benchmarks.model_step on the CPU: one row per precision with its throughput; a
    language model's net, which waits for its vocabulary, is built at WikiText-103's."""
    import hydra.utils

    from benchmarks.model_step import WT103_VOCAB, example_batch, model_step
    from deqlab.runner.config import compose

    rows = model_step(torch.device("cpu"), 1, ("cifar_cpu",))
    assert [r["variant"] for r in rows] == ["cifar_cpu fp32", "cifar_cpu bf16"]
    assert all(r["images_per_s"] > 0 and r["unit"] == "images" for r in rows)
    assert rows[0]["vs_fp32"] == 1.0
    cfg = compose(["experiment=ptb_deq_transformer_cpu"], "/tmp/deqlab-bench")
    module = hydra.utils.instantiate(cfg.task.module)
    x, y, unit = example_batch(cfg, module, torch.device("cpu"))
    shape = (cfg.task.datamodule.batch_size, cfg.task.datamodule.tgt_len)
    assert unit == "tokens" and x.shape == y.shape == shape and int(x.max()) < WT103_VOCAB
    embed = module.net.embed  # adaptive (its edges end at the vocabulary) or a plain table
    assert (embed.edges[-1] if hasattr(embed, "edges") else embed.num_embeddings) == WT103_VOCAB
