"""Warm starts carried across training (init=cached): each sample starts from its own last
equilibrium, the cache grows within its bound, survives a checkpoint, and refuses or drops
a cache that no longer matches the model or the data."""

from __future__ import annotations

import pytest
import torch

from deqlab import DEQ, Bound, InitConfig
from deqlab.warm_start import WarmStartError, WarmStarts


def test_each_sample_starts_from_its_own_last_equilibrium():
    cache = WarmStarts()
    z0 = torch.zeros(3, 2)
    assert torch.equal(cache.read(torch.tensor([0, 5, 9]), z0), z0)  # nothing cached yet
    cache.write(torch.tensor([5, 0]), torch.tensor([[5.0, 5.0], [1.0, 1.0]]))
    start = cache.read(torch.tensor([0, 5, 9]), z0)
    assert start.tolist() == [[1.0, 1.0], [5.0, 5.0], [0.0, 0.0]]  # 9: never seen, its base
    assert cache.read_counts() == (2, 4)  # warm, cold since the start
    assert torch.equal(z0, torch.zeros(3, 2))  # the base start is not written into
    cache.write(torch.tensor([9]), torch.tensor([[9.0, 9.0]]))  # grows to index 9
    assert cache.read(torch.tensor([9]), torch.zeros(1, 2)).tolist() == [[9.0, 9.0]]


def test_a_state_of_several_tensors_is_cached_part_by_part():
    cache = WarmStarts()
    state = (torch.ones(2, 3), torch.full((2, 4, 4), 2.0))
    cache.write(torch.tensor([0, 1]), state)
    a, b = cache.read(torch.tensor([1]), (torch.zeros(1, 3), torch.zeros(1, 4, 4)))
    assert bool((a == 1).all()) and bool((b == 2).all())


def test_a_cache_past_its_bound_or_of_another_shape_is_refused_by_name():
    with pytest.raises(WarmStartError, match=r"above init\.max_gb=1e-06"):
        WarmStarts(max_gb=1e-6).write(torch.tensor([10_000]), torch.zeros(1, 8))
    cache = WarmStarts()
    cache.write(torch.tensor([0]), torch.zeros(1, 8))
    with pytest.raises(WarmStartError, match=r"state shape changed"):
        cache.read(torch.tensor([0]), torch.zeros(1, 16))
    with pytest.raises(WarmStartError, match=r"init\.storage='disk'"):
        WarmStarts(storage="disk")
    with pytest.raises(ValueError, match=r"init\.base must be one of"):
        InitConfig(name="cached", base="cached")


def test_the_cache_survives_a_checkpoint_and_is_dropped_for_other_data():
    cache = WarmStarts()
    cache.bind(10)
    cache.write(torch.tensor([3]), torch.full((1, 2), 3.0))
    restored = WarmStarts()
    restored.load_state_dict(cache.state_dict(), torch.device("cpu"))
    assert restored.read(torch.tensor([3]), torch.zeros(1, 2)).tolist() == [[3.0, 3.0]]
    restored.bind(10)  # the same data: kept
    assert restored.read(torch.tensor([3]), torch.zeros(1, 2)).tolist() == [[3.0, 3.0]]
    with pytest.warns(UserWarning, match="filled on 10 training samples, the data now has 12"):
        restored.bind(12)
    assert restored.read(torch.tensor([3]), torch.zeros(1, 2)).tolist() == [[0.0, 0.0]]


def test_a_warm_start_reaches_the_same_equilibrium_in_fewer_steps():
    """z = tanh(W z + x) with ||W|| < 1: from the cached equilibrium of slightly different
    weights, fixed-point iteration stops after fewer steps at the same point."""
    torch.manual_seed(0)
    w = torch.randn(16, 16, dtype=torch.float64)
    w *= 0.9 / torch.linalg.matrix_norm(w, 2)
    x = torch.randn(4, 16, dtype=torch.float64)
    deq = DEQ({"name": "fixed_point", "max_iter": 500, "tol": 1e-8, "stop_mode": "abs"})
    cell = lambda z, u: torch.tanh(z @ w.t() + u)
    z, cold = deq(Bound(cell, x), torch.zeros_like(x))
    cache = WarmStarts()
    cache.write(torch.arange(4), z)
    w += 1e-5 * torch.randn_like(w)  # a small training step later
    keys = torch.arange(4)
    warm_z, warm = deq(Bound(cell, x), cache.read(keys, torch.zeros_like(x)))
    cold_z, cold = deq(Bound(cell, x), torch.zeros_like(x))
    torch.testing.assert_close(warm_z, cold_z, rtol=0, atol=1e-7)
    assert warm.nfe <= 0.6 * cold.nfe  # 13 against 25: the distance to cover is 1e-5, not 1


def test_language_model_segments_are_keyed_and_start_warm_in_the_second_epoch(tmp_path):
    """BPTT segments recur every epoch: row r of segment k is keyed k * batch + r, the short
    last segment -1 (never cached); a second epoch of the DEQ-Transformer starts warm."""
    from deqlab.runner.main import run
    from deqlab.tasks.lm.data import BPTTStream

    from .helpers.runs import TINY_LM, compose_cfg, metrics, write_ptb_folder

    stream = BPTTStream(torch.arange(40), batch_size=2, tgt_len=6)
    stream.indexed = True
    keys = [k.tolist() for *_, k in stream]
    assert keys == [[0, 1], [2, 3], [4, 5], [-1, -1]]  # 19 tokens a stream: 6, 6, 6, 1
    data = write_ptb_folder(tmp_path / "data", lines=40)
    overrides = [*TINY_LM, f"paths.data_dir={data}", "init=cached", "trainer.max_epochs=2"]
    run(compose_cfg([*overrides, "logger=csv", "trainer.log_every_n_steps=1"], tmp_path / "run"))
    rows = [r for r in metrics(tmp_path / "run") if r.get("deq/warm_share")]
    first = [float(r["deq/warm_share"]) for r in rows if r["epoch"] == "0"]
    second = [float(r["deq/warm_share"]) for r in rows if r["epoch"] == "1"]
    assert set(first) == {0.0}
    assert second and min(second[:-1]) == 1.0  # all but the short last segment


def test_a_one_graph_task_starts_every_step_after_the_first_warm(tmp_path):
    """The chains: one graph, key 0, trained at every step: from the second step on the solve
    starts from the last step's equilibrium and needs fewer evaluations than the first."""
    pytest.importorskip("torch_geometric")
    from deqlab.runner.main import run

    from .helpers.runs import compose_cfg, metrics
    from .test_graph import CHAINS_RUN

    overrides = ["experiment=ignn_chains", "trainer.max_epochs=4", "init=cached", *CHAINS_RUN]
    overrides += ["trainer.log_every_n_steps=1"]
    run(compose_cfg(overrides, tmp_path))
    rows = metrics(tmp_path)
    shares = [float(r["deq/warm_share"]) for r in rows if r.get("deq/warm_share")]
    nfe = [float(r["deq/fwd_nfe"]) for r in rows if r.get("deq/fwd_nfe")]
    assert shares == [0.0, 1.0, 1.0, 1.0]
    assert max(nfe[1:]) < nfe[0]
