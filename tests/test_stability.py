"""The stability monitor: per-sample figures over the whole validation split, and a warning
when the share of unconverged samples rises validation after validation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback

from deqlab.grad import DivergenceWarning
from deqlab.runner.main import run
from deqlab.runner.stability import rising, summarize

from .helpers.runs import TINY, compose_cfg, metrics, write_cifar_folder


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_cifar_folder(tmp_path_factory.mktemp("data"))


class Drift(Callback):
    """Scales the cell's convolutions up after every training epoch: a model drifting
    towards instability, whatever the optimizer does."""

    def on_train_epoch_end(self, trainer, module) -> None:
        with torch.no_grad():
            for m in module.net.cell.modules():
                if isinstance(m, torch.nn.Conv2d):
                    m.weight.mul_(2.0)


def test_a_drifting_model_is_warned_of(data_dir, tmp_path):
    overrides = [
        f"paths.data_dir={data_dir}",
        *TINY,
        "trainer.max_epochs=3",
        "solver.max_iter=8",
        "task.datamodule.val_size=32",
        "task.module.fit.sradius_iters=4",
        "task.module.fit.unstable_above=0.03",
        "optim.optimizer.lr=1e-6",
        "+callbacks.drift._target_=tests.test_stability.Drift",
    ]
    cfg = compose_cfg(overrides, tmp_path)
    with pytest.warns(DivergenceWarning, match=r"deq/val_unstable_share rose at 2 validations"):
        run(cfg)
    rows = metrics(tmp_path)
    shares = [float(r["deq/val_unstable_share"]) for r in rows if r.get("deq/val_unstable_share")]
    assert len(shares) == 3 and shares[0] < shares[1] < shares[2]
    assert rising(shares, 2)
    # every logged figure is the per-sample data's, over all 32 validation samples
    figures = sorted((tmp_path / "csv").glob("version_*/figures/deq_stability_step*.csv"))
    assert len(figures) == 3
    last = np.loadtxt(figures[-1], delimiter=",")
    assert last.shape == (32, 2)
    values = {"rel_residual": torch.tensor(last[:, 0]), "steps": torch.tensor(last[:, 1])}
    want = summarize(values, 0.03)
    final = [r for r in rows if r.get("deq/val_unstable_share")][-1]
    for name in ("unstable_share", "steps_p50", "steps_p90", "steps_max"):
        assert float(final[f"deq/val_{name}"]) == pytest.approx(want[name], rel=1e-6), name
    assert float(final["deq/val_sradius_max"]) >= float(final["deq/val_sradius_p50"]) > 0


def test_rising_needs_patience_rises_in_a_row():
    assert rising([0.1, 0.2, 0.3], 2)
    assert not rising([0.1, 0.2, 0.2], 2)
    assert not rising([0.3, 0.1, 0.2], 2)
    assert not rising([0.1, 0.2], 2)  # not enough validations yet
    assert not rising([0.1, 0.2, 0.3], 0)  # 0: never warns


def test_the_adaptive_jacobian_weight_follows_the_unstable_share():
    from deqlab.runner.fit import JacRegConfig

    cfg = JacRegConfig(name="hutchinson", adaptive=True, adaptive_target=0.1, adaptive_factor=2)
    assert cfg.adapt(1.0, 0.3) == 2.0 and cfg.adapt(2.0, 0.3) == 4.0  # above: rises
    assert cfg.adapt(4.0, 0.1) == 2.0 and cfg.adapt(1.0, 0.0) == 1.0  # met: falls, floor 1
    with pytest.raises(ValueError, match="set jac_reg=hutchinson"):
        JacRegConfig(adaptive=True)


def test_a_drifting_run_raises_its_jacobian_weight(data_dir, tmp_path):
    """With jac_reg.adaptive the weight doubles after each validation above the target
    (the drifting model of the test above), and a resumed run keeps the multiplier."""
    overrides = [
        f"paths.data_dir={data_dir}",
        *TINY,
        "trainer.max_epochs=3",
        "solver.max_iter=8",
        "task.datamodule.val_size=32",
        "task.module.fit.unstable_above=1e-4",
        "task.module.fit.unstable_patience=0",
        "jac_reg=hutchinson",
        "jac_reg.freq=1.0",
        "jac_reg.weight=0.25",
        "jac_reg.adaptive=true",
        "jac_reg.adaptive_target=0.5",
        "optim.optimizer.lr=1e-6",
        "+callbacks.drift._target_=tests.test_stability.Drift",
    ]
    run(compose_cfg(overrides, tmp_path))
    rows = metrics(tmp_path)
    shares = [float(r["deq/val_unstable_share"]) for r in rows if r.get("deq/val_unstable_share")]
    assert all(s > 0.5 for s in shares)  # the premise: every validation above the target
    by_epoch = {}
    for r in rows:
        if r.get("deq/jac_weight"):
            by_epoch.setdefault(int(r["epoch"]), set()).add(float(r["deq/jac_weight"]))
    assert by_epoch == {0: {0.25}, 1: {0.5}, 2: {1.0}}
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["deqlab_jac_multiplier"] == 8.0  # three validations above the target
