"""Installed, not only cloned: the wheel built from this repository, installed into a fresh
virtual environment, trains from a folder that is not the repository, with the user's own
configs and own network."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from .helpers.runs import ROOT, TINY_LM, write_cifar_folder, write_ptb_folder

pytestmark = pytest.mark.slow

USER_CELL = '''
import torch
from torch import nn


class TinyDEQ(nn.Module):
    """A user's own DEQ: the inject / cell / head contract of deqlab's DEQLitModule."""

    def __init__(self, width: int = 4, **unused):
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, padding=1)
        self.mix = nn.Conv2d(width, width, 3, padding=1)
        self.out = nn.Linear(width, 10)

    def inject(self, x):
        u = self.stem(x)
        return u, torch.zeros_like(u)

    def cell(self, z, u):
        return torch.tanh(0.5 * self.mix(z) + u)

    def head(self, z):
        return self.out(z.mean((2, 3)))
'''

USER_EXPERIMENT = """# @package _global_
defaults:
  - override /trainer: cpu
task:
  datamodule: {batch_size: 8, eval_batch_size: 16, val_size: 16, num_workers: 0}
  module:
    net: {_target_: mypkg.cells.TinyDEQ, width: 6}
solver: {max_iter: 4}
"""


def sh(*args: str | Path, cwd: Path, env: dict[str, str] | None = None) -> str:
    proc = subprocess.run(
        [str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, (
        f"{args}: exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    )
    return proc.stdout


def test_wheel_installs_and_runs_from_any_folder(tmp_path):
    dist = tmp_path / "dist"
    sh(
        sys.executable,
        "-m",
        "pip",
        "wheel",
        ROOT,
        "--no-deps",
        "--no-build-isolation",
        "-w",
        dist,
        "-q",
        cwd=tmp_path,
    )
    (wheel,) = dist.glob("deqlab-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tasks = sorted(p.parent.name for p in (ROOT / "tasks").glob("*/__init__.py"))
    assert tasks == ["cifar", "graph", "inr", "inverse", "lm"]
    assert "deqlab/conf/train.yaml" in names and "deqlab/runner/main.py" in names
    for task in tasks:  # every task package goes in, found without a hand-written list
        assert f"deqlab/tasks/{task}/module.py" in names, task
    assert not [n for n in names if n.split("/")[0] in ("tasks", "benchmarks", "conf", "tests")]
    conf = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "conf").rglob("*.yaml"))
    assert conf == sorted(n.removeprefix("deqlab/") for n in names if n.endswith(".yaml"))
    # PEP 639 metadata (the table form `license = {text = ...}` is deprecated in setuptools)
    metadata = next(n for n in names if n.endswith(".dist-info/METADATA"))
    lines = zipfile.ZipFile(wheel).read(metadata).decode().splitlines()
    assert "License-Expression: MIT" in lines and "License-File: LICENSE" in lines

    # A fresh environment: the wheel, and this environment's dependencies (no network) through
    # a path entry, which does not bring the repository's editable install along.
    venv = tmp_path / "venv"
    sh(sys.executable, "-m", "venv", venv, cwd=tmp_path)
    python = venv / "bin" / "python"
    site = Path(
        sh(
            python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])", cwd=tmp_path
        ).strip()
    )
    (site / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    clean = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # no repository copy
    sh(
        python,
        "-m",
        "pip",
        "install",
        "--no-deps",
        "--no-index",
        "-q",
        wheel,
        cwd=tmp_path,
        env=clean,
    )

    work = tmp_path / "elsewhere"
    write_cifar_folder(work / "data")
    (work / "mypkg").mkdir()
    (work / "mypkg" / "__init__.py").write_text("")
    (work / "mypkg" / "cells.py").write_text(USER_CELL)
    (work / "my_conf" / "experiment").mkdir(parents=True)
    (work / "my_conf" / "experiment" / "mine.yaml").write_text(USER_EXPERIMENT)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["WANDB_MODE"] = "offline"
    where = sh(python, "-c", "import deqlab; print(deqlab.__file__)", cwd=work, env=env)
    assert str(site) in where  # the installed copy, not the repository's

    out = sh(
        venv / "bin" / "deqlab",
        "experiment=cifar_cpu",
        "debug=fdr",
        "paths.data_dir=data",
        "task.datamodule.val_size=16",
        "task.datamodule.batch_size=8",
        "~callbacks.progress",
        cwd=work,
        env=env,
    )
    assert "deqlab: train done" in out
    assert list((work / "outputs" / "runs").iterdir())  # results land where the user is
    write_ptb_folder(work / "data")  # and a tiny job of the other task
    out = sh(
        venv / "bin" / "deqlab", *TINY_LM, "debug=fdr", "paths.data_dir=data", cwd=work, env=env
    )
    assert "deqlab: train done" in out

    env["PYTHONPATH"] = str(work)  # the user's own package
    out = sh(
        venv / "bin" / "deqlab",
        "hydra.searchpath=[file://my_conf]",
        "experiment=mine",
        "paths.data_dir=data",
        "trainer.max_epochs=1",
        "~callbacks.progress",
        "hydra.run.dir=mine",
        cwd=work,
        env=env,
    )
    assert "deqlab: train done" in out
    assert "_target_: mypkg.cells.TinyDEQ" in (work / "mine" / "config_resolved.yaml").read_text()
