"""`python -m deqlab` end to end on a tiny image folder: outputs, combinations, resume,
W&B offline and DDP on CPU (sweeps: tests/test_sweeps.py)."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch

from deqlab.runner.main import run

from .helpers import wandb_records
from .helpers.problems import GRADS, SOLVERS
from .helpers.runs import (
    TINY,
    compose_cfg,
    last_value,
    metrics,
    run_cli,
    wait_for,
    write_cifar_folder,
)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return write_cifar_folder(tmp_path_factory.mktemp("data"))


def test_cli_trains_tests_and_writes_its_outputs(data_dir, tmp_path):
    out = tmp_path / "run"
    proc = run_cli(
        [
            "task=cifar",
            "solver=broyden",
            f"paths.data_dir={data_dir}",
            f"hydra.run.dir={out}",
            *TINY,
        ],
        tmp_path,
    )
    assert "deqlab: train done; best val/acc=" in proc.stdout
    assert "Tip:" not in proc.stdout + proc.stderr  # Lightning's advertisements are dropped
    assert not (out / ".deqlab.lock").exists()  # the run folder's lock is released
    assert (out / "checkpoints" / "last.ckpt").is_file() and (
        out / "checkpoints" / "best.ckpt"
    ).is_file()
    assert (out / ".hydra" / "config.yaml").is_file() and (out / "config_resolved.yaml").is_file()
    assert "name: broyden" in (out / "config_resolved.yaml").read_text()
    rows = metrics(out)
    for key in (
        "train/loss",
        "train/acc",
        "val/loss",
        "val/acc",
        "test/acc",
        "deq/fwd_nfe",
        "deq/fwd_rel_residual",
        "deq/fwd_abs_residual",
        "deq/bwd_nfe",
        "deq/bwd_rel_residual",
        "deq/val_fwd_nfe",
        "train/lr",
    ):
        assert any(r.get(key) for r in rows), f"{key} never logged"
    assert last_value(rows, "deq/fwd_nfe") <= 4
    assert list((out / "csv" / "version_0" / "figures").glob("deq_residual_trace_*.png"))


COMBOS = list(itertools.product(SOLVERS, GRADS, ["none", "weight_norm", "spectral_norm"]))


@pytest.mark.parametrize("solver,grad,norm", COMBOS, ids=["-".join(c) for c in COMBOS])
def test_every_solver_grad_norm_combination_runs_a_step(solver, grad, norm, data_dir, tmp_path):
    cfg = compose_cfg(
        [
            f"solver={solver}",
            f"grad={grad}",
            f"norm={norm}",
            f"paths.data_dir={data_dir}",
            *TINY,
            "+trainer.fast_dev_run=1",
            "logger=csv",
        ],
        tmp_path,
    )
    run(cfg)


DEQ_STATS = ("deq/fwd_nfe", "deq/fwd_rel_residual", "deq/fwd_abs_residual", "deq/val_fwd_nfe")


@pytest.mark.parametrize(
    "core",
    [
        ["core=sliced", "core.n_states=2", "grad=phantom"],
        ["core=torchdeq", "grad=ift"],
        ["core=mine"],  # a user's core: its own YAML and class, found through hydra.searchpath
    ],
    ids=["sliced", "torchdeq", "user"],
)
def test_each_core_trains_through_the_runner_and_logs_the_deq_statistics(core, data_dir, tmp_path):
    if "core=torchdeq" in core:
        pytest.importorskip("torchdeq")
    conf = tmp_path / "my_conf" / "core"
    conf.mkdir(parents=True)
    (conf / "mine.yaml").write_text(
        "_target_: tests.test_core_variants.Unrolled\nsolver: ${solver}\ngrad: ${grad}\nsteps: 3\n"
    )
    out = tmp_path / "run"
    searchpath = f"hydra.searchpath=[file://{tmp_path / 'my_conf'}]"
    run_cli(
        [*TINY, *core, f"paths.data_dir={data_dir}", f"hydra.run.dir={out}", searchpath], tmp_path
    )
    rows = metrics(out)
    for key in DEQ_STATS:
        assert any(r.get(key) for r in rows), f"{key} never logged"
    if "core=mine" in core:
        assert last_value(rows, "deq/fwd_nfe") == 3
    if "grad=ift" in core:
        assert any(r.get("deq/bwd_nfe") for r in rows)


def test_a_captured_config_trains_on_a_cpu_with_a_warning(data_dir, tmp_path):
    cfg = compose_cfg(
        [f"paths.data_dir={data_dir}", *TINY, "solver.capture=true", "solver.check_every=2"],
        tmp_path,
    )
    with pytest.warns(UserWarning, match="CUDA graphs need a CUDA device; on cpu"):
        assert run(cfg) is not None


def _train(data_dir, out, epochs, extra=()):
    cfg = compose_cfg(
        [
            f"paths.data_dir={data_dir}",
            *TINY,
            f"trainer.max_epochs={epochs}",
            "jac_reg=hutchinson",
            "task.module.fit.jitter=1",
            *extra,
        ],
        out,
    )
    run(cfg)
    return metrics(out)


def test_resume_continues_exactly(data_dir, tmp_path):
    """Two epochs straight == one epoch, then resume from last.ckpt for the second."""
    full = _train(data_dir, tmp_path / "full", 2)
    first = _train(
        data_dir,
        tmp_path / "part",
        2,
        ["+callbacks.kill._target_=tests.helpers.runs.StopAfterEpoch"],
    )
    last = tmp_path / "part" / "checkpoints" / "last.ckpt"
    ckpt = torch.load(last, weights_only=False)
    assert ckpt["global_step"] == 5  # 60 images - 16 val = 44 train, 5 full batches of 8
    resumed = _train(data_dir, tmp_path / "part", 2, ["ckpt_path=last"])  # found in the run folder
    # The first launch's logs are kept beside the resumed one's.
    assert (tmp_path / "part" / "csv" / "version_0" / "metrics.csv").is_file() and first
    for key in ("val/loss", "val/acc", "train/loss"):
        assert last_value(resumed, key) == pytest.approx(
            last_value(full, key), rel=1e-5, abs=1e-6
        ), key
    steps_full = [int(r["step"]) for r in full if r.get("train/loss")]
    steps_resumed = [int(r["step"]) for r in resumed if r.get("train/loss")]
    assert steps_resumed[-1] == steps_full[-1] == 9


def test_test_mode_evaluates_a_checkpoint(data_dir, tmp_path, monkeypatch):
    """A training run tests its best checkpoint (its last with test_ckpt=last), and mode=test
    scores that checkpoint as the training run scored it."""
    import lightning as L

    tested = []
    real_test = L.Trainer.test

    def recording_test(self, *args, **kwargs):
        tested.append(kwargs.get("ckpt_path"))
        return real_test(self, *args, **kwargs)

    monkeypatch.setattr(L.Trainer, "test", recording_test)
    rows = _train(data_dir, tmp_path / "a", 2)
    best = tmp_path / "a" / "checkpoints" / "best.ckpt"
    assert tested == [str(best)]
    _train(data_dir, tmp_path / "last", 2, ["test_ckpt=last"])
    assert tested[-1] is None  # the weights in memory: the last ones
    cfg = compose_cfg(
        [f"paths.data_dir={data_dir}", *TINY, "mode=test", f"ckpt_path={best}"], tmp_path / "b"
    )
    score = run(cfg)
    assert score == pytest.approx(last_value(rows, "test/acc"), abs=1e-7)
    with pytest.raises(ValueError, match="ckpt_path"):
        run(compose_cfg(["mode=test"], tmp_path / "c"))


def test_wandb_offline_writes_a_local_run(data_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    norm = ["norm=weight_norm", "jac_reg=hutchinson"]
    cfg = compose_cfg([f"paths.data_dir={data_dir}", *TINY, *norm, "logger=many"], tmp_path)
    run(cfg)
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    # The offline run holds every record that `wandb sync` would upload: metrics, the
    # resolved config and the tags a dashboard groups by. W&B writes it in the background:
    # read it once its exit record is there.
    records = wandb_records.finished_run(runs[0])
    assert wandb_records.exit_code(records) == 0
    assert {"val/acc", "deq/fwd_nfe", "train/loss"} <= wandb_records.logged_keys(records)
    assert json.loads(wandb_records.config(records)["solver"])["max_iter"] == 4
    tags = {"solver=anderson", "grad=ift", "norm=weight_norm", "jac_reg=hutchinson"}
    assert tags <= set(wandb_records.tags(records))
    images = runs[0] / "files" / "media" / "images"
    assert wait_for(lambda: list(images.rglob("*.png")))  # the residual trace
    assert (tmp_path / "tensorboard").is_dir() and (
        tmp_path / "csv" / "version_0" / "metrics.csv"
    ).is_file()


@pytest.mark.slow
def test_ddp_on_two_cpu_processes(data_dir, tmp_path):
    out = tmp_path / "ddp"
    batch = "task.datamodule.batch_size=16"  # the global batch: 8 per process
    proc = run_cli(
        [f"paths.data_dir={data_dir}", f"hydra.run.dir={out}", *TINY, batch, "trainer=ddp_cpu"],
        tmp_path,
    )
    assert "deqlab: train done" in proc.stdout
    rows = metrics(out)
    assert any(r.get("val/acc") for r in rows) and any(r.get("deq/bwd_nfe") for r in rows)
    # 44 training images over 2 ranks of batch 8: 2 steps per epoch (the last step is 1).
    assert max(int(r["step"]) for r in rows if r.get("train/loss")) == 1
    # Logs and figures come from rank 0 alone: no second version folder from rank 1.
    assert sorted(p.name for p in (out / "csv").iterdir()) == ["version_0"]
    assert list((out / "csv" / "version_0" / "figures").glob("*.png"))


def test_init_from_starts_a_new_run_from_another_runs_weights(data_dir, tmp_path, capsys):
    """init_from: the weights only; the run starts at step 0 with its own optimizer. mode=test
    evaluates such weights directly, and a network of other widths loads only with
    init_from_strict=false, which names what it loaded, skipped and left new."""
    from hydra.utils import instantiate

    _train(data_dir, tmp_path / "a", 1)
    ckpt = tmp_path / "a" / "checkpoints" / "last.ckpt"
    trained = torch.load(ckpt, weights_only=True)["state_dict"]
    cfg = compose_cfg([f"paths.data_dir={data_dir}", *TINY, f"init_from={ckpt}"], tmp_path / "b")
    module = instantiate(cfg.task.module)
    module.setup("fit")
    for name, value in module.net.state_dict().items():
        torch.testing.assert_close(value, trained[f"net.{name}"], rtol=0, atol=0)
    tested = run(
        compose_cfg(
            [f"paths.data_dir={data_dir}", *TINY, "mode=test", f"init_from={ckpt}"], tmp_path / "c"
        )
    )
    reference = run(
        compose_cfg(
            [f"paths.data_dir={data_dir}", *TINY, "mode=test", f"ckpt_path={ckpt}"], tmp_path / "d"
        )
    )
    assert tested == reference  # the same weights, the same test accuracy

    wider = [f"paths.data_dir={data_dir}", *TINY, "task.module.net.inner=12", f"init_from={ckpt}"]
    with pytest.raises(ValueError, match=r"(?s)do not fit this network.*init_from_strict=false"):
        instantiate(compose_cfg(wider, tmp_path / "e").task.module).setup("fit")
    module = instantiate(
        compose_cfg([*wider, "init_from_strict=false"], tmp_path / "f").task.module
    )
    module.setup("fit")
    report = capsys.readouterr()
    text = report.out + report.err
    assert "skipped (not usable here): cell.conv1.weight, cell.conv2.weight" in text
    assert "new (not in the file): cell.conv1.weight, cell.conv2.weight" in text
    torch.testing.assert_close(module.net.stem[0].weight, trained["net.stem.0.weight"])


# -- on a GPU (skipped without CUDA) ---------------------------------------------------------


@pytest.mark.requires_cuda
def test_runner_on_gpu(tmp_path):
    data = write_cifar_folder(tmp_path / "data")
    overrides = [o for o in TINY if not o.startswith("trainer=")]
    cfg = compose_cfg(
        [f"paths.data_dir={data}", *overrides, "trainer=gpu", "trainer.precision=bf16-mixed"],
        tmp_path / "out",
    )
    assert run(cfg) is not None


@pytest.mark.requires_cuda
def test_runner_trains_with_captured_solves_in_bf16(tmp_path):
    data = write_cifar_folder(tmp_path / "data")
    overrides = [o for o in TINY if not o.startswith("trainer=")]
    cfg = compose_cfg(
        [f"paths.data_dir={data}", *overrides, "trainer=gpu", "trainer.precision=bf16-mixed",
         "solver.capture=true", "solver.check_every=4"],
        tmp_path / "out",
    )  # fmt: skip
    assert run(cfg) is not None
