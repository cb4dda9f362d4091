"""deqlab analyze: the report of a checkpoint's equilibrium, every figure checked against a
direct computation (the training run's own test pass, a direct solve of the first batch)."""

from __future__ import annotations

import csv
import re

import pytest
import torch
from hydra.utils import instantiate

from deqlab.runner.analyze import analyze
from deqlab.runner.checkpoint import read_checkpoint, run_config
from deqlab.runner.main import run

from .helpers.runs import (
    TINY,
    TINY_LM,
    compose_cfg,
    last_value,
    metrics,
    run_cli,
    write_cifar_folder,
    write_ptb_folder,
)


def read_csv(path):
    with open(path) as fh:
        return list(csv.DictReader(fh))


def check_curve(folder, rows, metric):
    """curve.csv is the training run's test/<metric>@k and test/nfe@k."""
    curve = read_csv(folder / "curve.csv")
    assert len(curve) >= 3
    for point in curve:
        k = point["budget"]
        assert float(point[metric]) == pytest.approx(
            last_value(rows, f"test/{metric}@{k}"), rel=1e-5
        )
        assert float(point["nfe"]) == pytest.approx(last_value(rows, f"test/nfe@{k}"), rel=1e-6)


def check_findings(folder, samples, threshold=0.05):
    text = (folder / "report.md").read_text()
    share = sum(float(s["rel_residual"]) > threshold for s in samples) / len(samples)
    assert f"{share:.0%} of the {len(samples)} test samples end above {threshold:g}" in text
    never = sum(s["converged"] == "0" for s in samples)
    assert (f"{never} samples never converge" in text) == (never > 0)
    for name in ("budget_curve.png", "convergence.png", "histograms.png"):
        assert (folder / name).stat().st_size > 1000
        assert f"]({name})" in text


def test_cifar_checkpoint(tmp_path):
    data = write_cifar_folder(tmp_path / "data")
    common = [f"paths.data_dir={data}", *TINY, "solver.tol=0.05", "test_ckpt=last"]
    run(compose_cfg([*common, "solver.eval_max_iter=8"], tmp_path / "run"))
    rows = metrics(tmp_path / "run")
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    report = analyze(ckpt, sradius_iters=3)
    folder = report.parent
    assert folder == tmp_path / "run" / "checkpoints" / "last_analysis"
    check_curve(folder, rows, "acc")
    samples = read_csv(folder / "samples.csv")
    assert len(samples) == 20  # the whole test split
    check_findings(folder, samples)
    assert all(float(s["sradius"]) > 0 for s in samples)

    # a direct solve of the first test batch gives the same per-sample figures
    cfg = run_config(ckpt, "test")
    dm = instantiate(cfg.task.datamodule)
    dm.prepare_data()
    dm.setup("test")
    module = instantiate(cfg.task.module, init_from=None)
    module.load_state_dict(read_checkpoint(ckpt)["state_dict"])
    x, y = next(iter(dm.test_dataloader()))
    with torch.no_grad():
        outputs, info = module.eval()(x)
    for i in range(len(y)):
        s = samples[i]
        assert float(s["rel_residual"]) == pytest.approx(float(info.rel_residual[i]), rel=1e-6)
        assert int(s["converged"]) == int(info.converged[i])
        assert float(s["acc"]) == float(outputs[-1][i].argmax() == y[i])
    acc = sum(float(s["acc"]) for s in samples) / len(samples)
    assert acc == pytest.approx(last_value(rows, "test/acc"), abs=1e-6)

    # --limit: the first samples only, the curve over them
    limited = analyze(ckpt, out=tmp_path / "seven", limit=7, grid=[1, 3, 8], sradius_iters=0)
    seven = read_csv(limited.parent / "samples.csv")
    assert [s["rel_residual"] for s in seven] == [s["rel_residual"] for s in samples[:7]]
    curve = read_csv(limited.parent / "curve.csv")
    assert [c["budget"] for c in curve] == ["1", "3", "8"]
    assert float(curve[-1]["acc"]) == pytest.approx(sum(float(s["acc"]) for s in seven) / 7)
    assert "spectral radius" not in limited.read_text()

    # the command prints what the user acts on: not Lightning's notes about restoring a
    # checkpoint into an evaluation Trainer, its accelerators or its tips
    proc = run_cli(["analyze", str(ckpt), "--limit", "7", "--out", str(tmp_path / "cli")], tmp_path)
    for note in (
        "Be aware",
        "dirpath has changed",
        "LeafSpec",
        "GPU available",
        "Tip",
        "Restoring",
    ):
        assert note not in proc.stderr, proc.stderr
    assert "# Analysis of" in proc.stdout


@pytest.mark.slow
def test_language_model_checkpoint(tmp_path):
    data = write_ptb_folder(tmp_path / "data")
    run(compose_cfg([f"paths.data_dir={data}", *TINY_LM, "test_ckpt=last"], tmp_path / "run"))
    rows = metrics(tmp_path / "run")
    report = analyze(tmp_path / "run" / "checkpoints" / "last.ckpt", sradius_iters=2)
    check_curve(report.parent, rows, "ppl")
    samples = read_csv(report.parent / "samples.csv")
    check_findings(report.parent, samples)
    tokens = sum(int(s["elements"]) for s in samples)  # per row: its mean token NLL
    nll = sum(float(s["ppl"]) * int(s["elements"]) for s in samples) / tokens
    assert nll == pytest.approx(last_value(rows, "test/nll"), rel=1e-5)
    assert re.search(r"test/ppl reaches within 1% of its full-budget value", report.read_text())


def test_a_checkpoint_without_its_run_is_refused(tmp_path):
    (tmp_path / "x.ckpt").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="deqlab analyze reads the run's config"):
        analyze(tmp_path / "x.ckpt")
    proc = run_cli(["analyze", str(tmp_path / "x.ckpt")], tmp_path, check=False)
    assert proc.returncode == 1
    assert proc.stderr.startswith("deqlab: ") and "deqlab analyze reads the run's config" in (
        proc.stderr
    )
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr  # no traceback
