"""From a sweep to an answer: job folders and W&B runs named after the swept values, the
sweep's manifest, ``deqlab report``'s table and figures, the Optuna search, W&B login
detection and the dashboard definition."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from deqlab.runner import loggers
from deqlab.runner.main import run
from deqlab.runner.manifest import read_manifest
from deqlab.runner.report import report

from .helpers import wandb_records
from .helpers.runs import TINY, compose_cfg, run_cli, write_cifar_folder

FIGURES = (
    "monitor_vs_step.png",
    "monitor_vs_time.png",
    "solver_per_epoch.png",
    "residual_traces.png",
    "budget_curve.png",
)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return write_cifar_folder(tmp_path_factory.mktemp("data"))


@pytest.mark.slow
def test_two_job_sweep_ends_in_a_report(data_dir, tmp_path):
    sweep = tmp_path / "sweep"
    run_cli(
        [
            "-m",
            "solver=anderson,broyden",
            "grad=ift",
            f"paths.data_dir={data_dir}",
            f"hydra.sweep.dir={sweep}",
            "logger=wandb",
            *TINY,
        ],
        tmp_path,
    )
    jobs = sorted(p.name for p in sweep.iterdir() if p.is_dir())
    assert jobs == ["0_solver=anderson", "1_solver=broyden"]  # only the swept key names a job
    assert "name: broyden" in (sweep / jobs[1] / "config_resolved.yaml").read_text()
    manifest = read_manifest(sweep)
    assert [(j["num"], j["status"]) for j in manifest] == [(0, "completed"), (1, "completed")]
    assert all(0 <= j["value"] <= 1 and Path(j["output_dir"]).name in jobs for j in manifest)

    for job in jobs:  # each job its own W&B run, named after it, grouped by the sweep
        (run_dir,) = (sweep / job / "wandb").glob("offline-run-*")
        records = wandb_records.finished_run(run_dir)
        info = wandb_records.run_info(records)
        assert info.display_name == job.split("_", 1)[1] and info.run_group == sweep.name
        summaries = wandb_records.summaries(records)
        assert summaries["val/acc"] == {"max"} and summaries["val/loss"] == {"min"}

    path = sweep / "report.md"  # written by the sweep itself as each job ended
    with open(sweep / "report.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["run"] for r in rows] == ["solver=anderson", "solver=broyden"]
    for row, job in zip(rows, manifest, strict=True):
        assert row["status"] == "completed"
        assert float(row["best val/acc"]) == pytest.approx(job["value"], abs=1e-4)
        assert 0 <= float(row["test/acc"]) <= 1 and 1 <= float(row["fwd nfe"]) <= 4
        assert float(row["bwd nfe"]) >= 1 and float(row["epoch time (s)"]) > 0
    text = path.read_text()
    assert "| solver=anderson | completed |" in text
    for figure in FIGURES:
        assert (sweep / figure).stat().st_size > 1000, figure
        assert f"({figure})" in text


@pytest.mark.slow
def test_optuna_search_runs_its_trials(data_dir, tmp_path):
    sweep = tmp_path / "search"
    run_cli(
        [
            "-m",
            "hparams_search=cifar_optuna",
            "hydra.sweeper.n_trials=2",
            f"paths.data_dir={data_dir}",
            f"hydra.sweep.dir={sweep}",
            *TINY,
        ],
        tmp_path,
    )
    manifest = read_manifest(sweep)
    assert len(manifest) == 2 and all(j["status"] == "completed" for j in manifest)
    for job in manifest:  # a trial is named after its sampled values of the search space
        name = Path(job["output_dir"]).name
        for key in ("solver=", "grad=", "optim.optimizer.lr=", "jac_reg.weight="):
            assert key in name, name
    results = (sweep / "optimization_results.yaml").read_text()
    best = max(j["value"] for j in manifest)
    assert f"best_value: {best}" in results


def test_report_of_a_single_run_and_of_a_folder_without_runs(data_dir, tmp_path):
    run(compose_cfg([f"paths.data_dir={data_dir}", *TINY], tmp_path / "runs" / "one"))
    report(tmp_path / "runs")
    with open(tmp_path / "runs" / "report.csv") as fh:
        (row,) = list(csv.DictReader(fh))
    assert row["status"] == "completed" and 0 <= float(row["best val/acc"]) <= 1
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no runs under .*empty"):
        report(tmp_path / "empty")


def test_report_lists_jobs_rejected_before_they_wrote_anything(tmp_path):
    line = {"num": 0, "overrides": ["solver.tol=-1"], "status": "failed", "value": None}
    line |= {"error": "ConfigError: solver.tol must be > 0", "output_dir": str(tmp_path / "0_x")}
    (tmp_path / "manifest.jsonl").write_text(json.dumps(line) + "\n")
    report(tmp_path)
    text = (tmp_path / "report.md").read_text()
    assert "| solver.tol=-1 | failed: ConfigError: solver.tol must be > 0 |" in text


def test_wandb_is_online_for_a_user_who_ran_wandb_login(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_BASE_URL", raising=False)
    netrc = tmp_path / ".netrc"
    monkeypatch.setenv("NETRC", str(netrc))
    assert loggers.wandb_mode() == "offline"  # no credentials anywhere: offline, no prompt
    netrc.write_text("machine api.wandb.ai\n  login user\n  password " + "k" * 40 + "\n")
    netrc.chmod(0o600)
    assert loggers.wandb_credentials() and loggers.wandb_mode() == "online"  # `wandb login`
    monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.example.org")
    assert loggers.wandb_mode() == "offline"  # a key for another host does not count
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    assert loggers.wandb_mode() == "online"
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert loggers.wandb_mode() == "offline"  # an explicit mode wins


def test_dashboard_workspace_has_the_deqlab_panels():
    pytest.importorskip("wandb_workspaces")
    from deqlab.runner.dashboard import build_workspace

    workspace = build_workspace("deqlab", "me", monitor="val/ppl")
    assert (workspace.project, workspace.entity) == ("deqlab", "me")
    panels = {s.name: s.panels for s in workspace.sections}
    assert list(panels) == [
        "Which variant trains best",
        "Solver cost",
        "Residual traces",
        "Optimization",
    ]
    best = panels["Which variant trains best"]
    assert all(p.y == ["val/ppl"] for p in best)
    assert {p.groupby.name for p in best} == {"solver.name", "grad.name"}
    assert {p.x for p in best} == {"Step", "RelativeTime(Wall)"}
    ys = {y for p in panels["Solver cost"] for y in p.y}
    assert {"deq/fwd_nfe", "deq/bwd_nfe", "deq/fwd_rel_residual", "deq/bwd_rel_residual"} <= ys
    assert panels["Residual traces"][0].media_keys == ["deq/residual_trace"]
    assert {y for p in panels["Optimization"] for y in p.y} == {"train/loss", "train/lr"}


def test_deqlab_command_dispatches_report(data_dir, tmp_path, monkeypatch, capsys):
    from deqlab.runner import cli

    run(compose_cfg([f"paths.data_dir={data_dir}", *TINY], tmp_path / "one"))
    monkeypatch.setattr("sys.argv", ["deqlab", "report", str(tmp_path)])
    cli.main()
    out = capsys.readouterr().out
    assert "| completed |" in out and f"written: {tmp_path / 'report.md'}" in out
    monkeypatch.setattr("sys.argv", ["deqlab", "report", str(tmp_path / "nothing")])
    with pytest.raises(SystemExit, match=r"deqlab report: .*nothing: no such folder"):
        cli.main()


def test_log_model_without_a_login_fails_by_name(data_dir, tmp_path, monkeypatch):
    # uploading checkpoints needs an online run; offline, say so instead of dropping it
    monkeypatch.setenv("WANDB_MODE", "offline")
    args = [f"paths.data_dir={data_dir}", *TINY, "logger=wandb", "logger.wandb.log_model=true"]
    with pytest.raises(Exception, match=r"log_model=true uploads the checkpoints.*wandb login"):
        run(compose_cfg(args, tmp_path))


def test_python_m_deqlab_is_the_deqlab_command(data_dir, tmp_path):
    """`python -m deqlab report FOLDER` is `deqlab report FOLDER`; `--help` names deqlab and
    lists real options only (no schema), with the subcommands."""
    from .helpers.runs import run_cli

    run(compose_cfg([f"paths.data_dir={data_dir}", *TINY], tmp_path / "one"))
    proc = run_cli(["report", str(tmp_path)], tmp_path)
    assert "| completed |" in proc.stdout and (tmp_path / "report.md").is_file()
    help_text = run_cli(["--help"], tmp_path).stdout
    ours = help_text.split("== Hydra's flags ==")[0]  # Hydra's own flags follow
    assert ours.startswith("deqlab: train and test") and "deqlab report FOLDER" in ours
    assert "solver: anderson, broyden, fixed_point, gmres, newton_krylov, reversible\n" in ours
    assert "deqlab analyze CKPT" in ours
    assert "schema" not in ours and "__main__" not in ours


def test_report_names_runs_by_what_tells_them_apart():
    """Runs started by hand carry every override in their name: the report keeps only the
    ones that differ (commas inside a list do not split); a run with no override of its own
    (the baseline) is named by its folder, and names that would collide stay as they were."""
    from deqlab.runner.report import Run, distinct_names, override_parts

    assert override_parts("a=1,b=[1,2],c={x: 1, y: 2}") == ["a=1", "b=[1,2]", "c={x: 1, y: 2}"]
    shared = "mode=test,solver.eval_max_iter=101,task.module.fit.budget_grid=[1,2,4]"
    runs = [Run(Path(n), f"experiment={n},{shared}", "m", "max") for n in ("deq", "unrolled")]
    distinct_names(runs)
    assert [r.name for r in runs] == ["experiment=deq", "experiment=unrolled"]
    base = [Run(Path("cached"), "e=x", "m", "max"), Run(Path("cold"), "e=x,init=zeros", "m", "max")]
    distinct_names(base)
    assert [r.name for r in base] == ["cached", "init=zeros"]
    same = [
        Run(Path("runs/a"), "solver=anderson", "m", "max"),
        Run(Path("b/a"), "solver=anderson", "m", "max"),
    ]
    distinct_names(same)
    assert [r.name for r in same] == ["solver=anderson", "solver=anderson"]
