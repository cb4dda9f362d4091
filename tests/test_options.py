"""The runner's switches a lightning-hydra-template user reaches for: the callbacks group,
mode=eval, the paths group and conf/local, extras (warnings, threads, tags), the debug
configs and the MLflow logger."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from deqlab.grad import DivergenceWarning
from deqlab.runner.config import CONF_DIR, ConfigError
from deqlab.runner.extras import EnforceTags, ExtrasConfig, run_extras
from deqlab.runner.main import run

from .helpers.runs import ROOT, TINY, compose_cfg, last_value, metrics, write_cifar_folder


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return write_cifar_folder(tmp_path_factory.mktemp("data"))


# TINY without its `~callbacks.progress`, which fails where callbacks=<list> has no bar
QUIET = [o for o in TINY if o != "~callbacks.progress"] + ["trainer.enable_progress_bar=false"]


def tiny(data_dir: Path, *extra: str) -> list[str]:
    return [f"paths.data_dir={data_dir}", *QUIET, *extra]


# --- callbacks ---------------------------------------------------------------------------


def test_callbacks_none_trains_and_tests_the_last_weights(data_dir, tmp_path):
    cfg = compose_cfg(tiny(data_dir, "callbacks=none", "test_ckpt=last"), tmp_path)
    assert dict(cfg.callbacks) == {}
    assert run(cfg) is not None  # the last validation's val/acc
    assert not (tmp_path / "checkpoints").exists()
    assert last_value(metrics(tmp_path), "test/acc") >= 0


def test_testing_the_best_checkpoint_needs_a_callback_that_keeps_it(tmp_path):
    for dropped in (["callbacks=none"], ["~callbacks.checkpoint"]):
        with pytest.raises(ConfigError) as e:
            run(compose_cfg([*QUIET, *dropped], tmp_path / "x"))
        assert str(e.value) == (
            "test_ckpt=best tests the best checkpoint, but no callback keeps one (a "
            "ModelCheckpoint with a monitor, callbacks.checkpoint in callbacks=default): add "
            "callbacks=[...,checkpoints] or set test_ckpt=last"
        )
        assert not (tmp_path / "x").exists()


def test_callback_parts_compose_as_a_list(tmp_path):
    cfg = compose_cfg(["callbacks=[default,early_stopping,lr_monitor]"], tmp_path)
    assert set(cfg.callbacks) == {
        "checkpoint",
        "last_checkpoint",
        "preemption",
        "release_memory",
        "progress",
        "model_summary",
        "early_stopping",
        "lr_monitor",
    }
    assert cfg.callbacks.early_stopping.monitor == "val/acc"
    assert cfg.callbacks.early_stopping.mode == "max"
    only = compose_cfg(["callbacks=[checkpoints,lr_monitor]"], tmp_path)
    assert set(only.callbacks) == {"checkpoint", "last_checkpoint", "lr_monitor"}


def test_early_stopping_ends_a_run_that_stops_improving(data_dir, tmp_path):
    """min_delta larger than any accuracy gain: the first validation sets the best, the second
    does not beat it, and with patience 1 the run stops after 2 of its 6 epochs."""
    cfg = compose_cfg(
        tiny(
            data_dir,
            "callbacks=[default,early_stopping]",
            "callbacks.early_stopping.patience=1",
            "callbacks.early_stopping.min_delta=2",
            "trainer.max_epochs=6",
        ),
        tmp_path,
    )
    run(cfg)
    epochs = {int(r["epoch"]) for r in metrics(tmp_path) if r.get("val/acc")}
    assert epochs == {0, 1}


def test_lr_monitor_logs_every_parameter_group(data_dir, tmp_path):
    """Two groups (weights with decay, biases and norms without), under optim/lr."""
    run(compose_cfg(tiny(data_dir, "callbacks=[default,lr_monitor]", "test_ckpt=last"), tmp_path))
    rows = metrics(tmp_path)
    for group in ("optim/lr/pg1", "optim/lr/pg2"):
        assert last_value(rows, group) == pytest.approx(last_value(rows, "train/lr"))


def test_progress_bar_switched_off_from_the_trainer(data_dir, tmp_path):
    """trainer.enable_progress_bar=false drops the progress callback (Lightning refuses a
    progress-bar callback with the bar switched off)."""
    with_bar = [o for o in TINY if o != "~callbacks.progress"]  # TINY drops the callback
    cfg = compose_cfg(
        [f"paths.data_dir={data_dir}", *with_bar, "trainer.enable_progress_bar=false"], tmp_path
    )
    assert cfg.callbacks.progress is not None
    assert run(cfg) is not None


# --- mode=eval ---------------------------------------------------------------------------


def test_eval_mode_scores_a_checkpoint_on_both_splits(data_dir, tmp_path, capsys):
    """mode=eval validates and tests ckpt_path: its val/acc is the checkpoint's monitored
    score, its test/acc the one the training run reported for that checkpoint."""
    best = run(compose_cfg(tiny(data_dir, "trainer.max_epochs=2"), tmp_path / "a"))
    trained_test = last_value(metrics(tmp_path / "a"), "test/acc")
    ckpt = tmp_path / "a" / "checkpoints" / "best.ckpt"
    capsys.readouterr()
    score = run(compose_cfg(tiny(data_dir, "mode=eval", f"ckpt_path={ckpt}"), tmp_path / "b"))
    assert score == pytest.approx(best, abs=1e-7)
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("deqlab: eval done; ")
    reported = dict(kv.split("=") for kv in line.split("; ")[1].split(", "))
    assert {"val/acc", "val/loss", "test/acc", "test/loss"} <= set(reported)
    assert float(reported["val/acc"]) == pytest.approx(best, abs=1e-4)
    assert float(reported["test/acc"]) == pytest.approx(trained_test, abs=1e-4)
    with pytest.raises(ConfigError, match=r"^mode=eval evaluates a checkpoint: pass ckpt_path="):
        run(compose_cfg(["mode=eval"], tmp_path / "c"))


# --- paths and conf/local ------------------------------------------------------------------


def test_paths_come_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("DEQLAB_DATA", "/datasets")
    monkeypatch.setenv("DEQLAB_LOGS", "/scratch/logs")
    cfg = compose_cfg([], tmp_path, keep_hydra=True)
    assert cfg.paths.data_dir == "/datasets"
    assert cfg.task.datamodule.data_dir == "/datasets"
    assert cfg.hydra.run.dir.startswith("/scratch/logs/runs/")
    assert cfg.paths.output_dir == str(tmp_path)
    monkeypatch.delenv("DEQLAB_DATA")
    monkeypatch.delenv("DEQLAB_LOGS")
    cfg = compose_cfg(["paths.data_dir=/mine"], tmp_path, keep_hydra=True)
    assert cfg.task.datamodule.data_dir == "/mine"
    assert cfg.hydra.run.dir.startswith("outputs/runs/")


def test_conf_local_holds_this_machines_settings(tmp_path):
    """conf/local/default.yaml, when present, overrides the defaults (not the command line)."""
    conf = tmp_path / "conf"
    shutil.copytree(CONF_DIR, conf)
    (conf / "local").mkdir(exist_ok=True)
    (conf / "local" / "default.yaml").write_text(
        "# @package _global_\npaths:\n  data_dir: /cluster/data\ntrainer:\n  max_epochs: 3\n"
    )
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["trainer.max_epochs=5"])
    assert cfg.paths.data_dir == "/cluster/data"
    assert cfg.trainer.max_epochs == 5
    ignored = subprocess.run(
        ["git", "check-ignore", "-q", "conf/local/default.yaml"], cwd=ROOT, check=False
    )
    if (ROOT / ".git").exists():
        assert ignored.returncode == 0, "conf/local/ must be git-ignored"


# --- extras ------------------------------------------------------------------------------


def test_ignore_warnings_silences_all_but_divergence():
    threads = torch.get_num_threads()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with run_extras(ExtrasConfig(ignore_warnings=True, num_threads=1)):
            assert torch.get_num_threads() == 1
            warnings.warn("a library's deprecation", UserWarning, stacklevel=1)
            warnings.warn("the solve diverged", DivergenceWarning, stacklevel=1)
        warnings.warn("after the run", UserWarning, stacklevel=1)
    assert [str(w.message) for w in seen] == ["the solve diverged", "after the run"]
    assert torch.get_num_threads() == threads
    with pytest.raises(ValueError) as e:
        ExtrasConfig(num_threads=0)
    assert str(e.value) == "extras.num_threads must be >= 1 or null, got 0"


def test_bad_extras_fail_before_the_run(tmp_path):
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException, match="ignore_warning"):
        compose_cfg(["extras.ignore_warning=true"], tmp_path)
    with pytest.raises(ConfigError) as e:  # a value checked by the schema's own rule
        run(compose_cfg([*QUIET, "extras.num_threads=0"], tmp_path / "x"))
    assert str(e.value) == "extras.num_threads must be >= 1 or null, got 0"
    assert not (tmp_path / "x").exists()


def sweep_config(tmp_path, *overrides: str):
    cfg = compose_cfg(["extras.enforce_tags=true", *overrides], tmp_path, keep_hydra=True)
    OmegaConf.set_readonly(cfg.hydra, True)  # as Hydra hands it to callbacks
    return cfg


def test_a_sweep_without_tags_asks_for_them(tmp_path, monkeypatch):
    cfg = sweep_config(tmp_path)
    monkeypatch.setattr(sys.stdin, "isatty", lambda: True)
    answers = iter(["", " ablation, it's broyden "])
    monkeypatch.setattr("builtins.input", lambda prompt: next(answers))
    EnforceTags().on_multirun_start(cfg)
    assert cfg.hydra.overrides.task[-1] == "tags=['ablation','it\\'s broyden']"
    job = compose_cfg(list(cfg.hydra.overrides.task), tmp_path)
    assert list(job.tags) == ["ablation", "it's broyden"]
    tagged = sweep_config(tmp_path, "tags=[a]")
    before = list(tagged.hydra.overrides.task)
    EnforceTags().on_multirun_start(tagged)  # has tags: nothing asked, nothing added
    assert list(tagged.hydra.overrides.task) == before


def test_a_batch_sweep_without_tags_fails_before_its_first_job(data_dir, tmp_path):
    sweep = tmp_path / "sweep"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "deqlab",
            "-m",
            "solver=anderson,broyden",
            "extras.enforce_tags=true",
            f"hydra.sweep.dir={sweep}",
            *tiny(data_dir),
        ],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "WANDB_MODE": "offline"},
        timeout=300,
    )
    assert proc.returncode == 1
    assert proc.stderr.strip().endswith(
        "deqlab: extras.enforce_tags: this sweep has no tags and nobody to ask for them: pass "
        "tags=[what,it,is,for] (or extras.enforce_tags=false)"
    )
    assert not list(sweep.glob("0_*"))  # no job started


# --- debug, trainer=mps ------------------------------------------------------------------


def test_debug_limit_runs_a_few_batches_with_anomaly_detection(data_dir, tmp_path, monkeypatch):
    import lightning as L

    seen = {}
    real_fit = L.Trainer.fit

    def fit(self, *args, **kwargs):
        seen["anomaly"] = self._detect_anomaly
        seen["threads"] = torch.get_num_threads()
        return real_fit(self, *args, **kwargs)

    monkeypatch.setattr(L.Trainer, "fit", fit)
    cfg = compose_cfg(tiny(data_dir, "debug=limit"), tmp_path)
    assert cfg.trainer.deterministic is True
    assert cfg.trainer.max_epochs == 1  # TINY's trainer.max_epochs=1 wins over debug's 2
    run(cfg)
    rows = metrics(tmp_path)
    assert max(int(r["step"]) for r in rows if r.get("train/loss")) == 3 - 1  # of 6 batches
    assert seen == {"anomaly": True, "threads": 1}
    assert (tmp_path / "checkpoints" / "best.ckpt").is_file()


def test_mps_trainer_asks_for_the_mps_accelerator(tmp_path):
    cfg = compose_cfg(["trainer=mps"], tmp_path)
    assert cfg.trainer.accelerator == "mps" and cfg.trainer.devices == 1


# --- MLflow --------------------------------------------------------------------------------


def test_mlflow_logger_writes_a_local_store_run(data_dir, tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    logs = tmp_path / "logs"
    cfg = compose_cfg(
        tiny(data_dir, "logger=mlflow", f"paths.log_dir={logs}", "tags=[smoke,cpu]"),
        tmp_path / "run",
    )
    best = run(cfg)
    client = MlflowClient(tracking_uri=f"sqlite:///{logs / 'mlflow.db'}")
    (experiment,) = [e for e in client.search_experiments() if e.name == "deqlab"]
    (found,) = client.search_runs([experiment.experiment_id])
    assert found.info.status == "FINISHED"
    assert found.data.tags["solver"] == "anderson"
    assert found.data.tags["tags"] == "smoke,cpu"
    history = client.get_metric_history(found.info.run_id, "val/acc")
    assert max(m.value for m in history) == pytest.approx(best, abs=1e-6)
    assert found.data.params["solver/name"] == "anderson"
    figures = [a.path for a in client.list_artifacts(found.info.run_id, "deq")]
    assert any(p.startswith("deq/residual_trace_step") for p in figures), figures


# --- compile ---------------------------------------------------------------------------------


def test_compile_true_compiles_the_cell_in_place(data_dir, tmp_path):
    """compile=true: torch.compile of the cell (here with the eager backend, which traces but
    generates no code), in place, so a checkpoint's keys do not change; the run trains."""
    from hydra.utils import instantiate

    eager = "+task.module.compile_options.backend=eager"
    cfg = compose_cfg(tiny(data_dir, "compile=true", eager), tmp_path)
    module = instantiate(cfg.task.module)
    plain = instantiate(compose_cfg(tiny(data_dir), tmp_path).task.module)
    assert module.net.cell._compiled_call_impl is not None
    assert plain.net.cell._compiled_call_impl is None
    assert module.state_dict().keys() == plain.state_dict().keys()
    assert run(cfg) is not None
    with pytest.raises(ConfigError) as e:
        run(compose_cfg(tiny(data_dir, "compile=true", "solver.capture=true"), tmp_path / "x"))
    assert str(e.value).startswith("compile=true and solver.capture=true both compile")


@pytest.mark.slow
def test_compile_with_inductor_solves_and_differentiates_as_the_eager_cell(data_dir, tmp_path):
    """Inductor's generated kernels on the CPU: in float64 the equilibrium and its implicit
    gradient agree with the eager cell's to the solves' tolerance (ift's backward takes repeated products through
    one graph, which compiling must allow), and a run trains. Adam then magnifies rounding
    over the epoch, so its validation loss agrees only to 1e-2."""
    import copy

    from deqlab import DEQ

    from .helpers.problems import ConvCell

    torch.manual_seed(0)
    eager = ConvCell().double()
    compiled = copy.deepcopy(eager)
    from deqlab.runner.module import compile_cell

    compile_cell(compiled)
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    results = []
    for cell in (eager, compiled):
        deq = DEQ(solver={"max_iter": 60, "tol": 1e-11}, grad={"name": "ift", "tol": 1e-11})
        z, _ = deq(lambda z, cell=cell: cell(z, x), torch.zeros_like(x))
        results.append((z, torch.autograd.grad((z**2).sum(), list(cell.parameters()))))
    (za, ga), (zb, gb) = results
    torch.testing.assert_close(zb, za, rtol=1e-8, atol=1e-9)
    for a, b in zip(ga, gb, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-7, atol=1e-9)
    for i, extra in enumerate([(), ("compile=true",)]):
        assert run(compose_cfg(tiny(data_dir, *extra), tmp_path / str(i))) is not None
    losses = [last_value(metrics(tmp_path / str(i)), "val/loss") for i in range(2)]
    assert losses[1] == pytest.approx(losses[0], rel=1e-2)
