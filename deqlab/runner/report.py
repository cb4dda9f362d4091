"""``deqlab report FOLDER`` (or ``python -m deqlab.runner.report FOLDER``): compare the runs of a sweep.

Which variant trains best, and at what cost in f evaluations and time? The report reads every
run under FOLDER (a multirun's folder, or any folder of runs: a run is a folder holding
``config_resolved.yaml``) from its CSV log, which every run writes, and writes into FOLDER:

- ``report.md`` and ``report.csv``: one row per run: its overrides, status, best and final
  monitored metric, test metrics, mean forward / backward f evaluations, final forward relative
  residual, time per epoch, peak CUDA memory where logged;
- ``monitor_vs_step.png``, ``monitor_vs_time.png``: the monitored metric against training step
  and against wall-clock training time, one line per run;
- ``solver_per_epoch.png``: forward f evaluations and relative residual, mean per epoch;
- ``residual_traces.png``: the forward solve's relative residual against solver step at each
  run's last validation (median over the traced samples);
- ``budget_curve.png``: the test metric against the f evaluations spent, one point per solver
  budget (``test/<metric>@k`` against ``test/nfe@k``, from one test pass of each run).

A sweep's ``manifest.jsonl`` adds the jobs that left no run folder (rejected configs) with
their error. No account and no network are needed.
"""

from __future__ import annotations

import argparse
import csv
import math
import statistics
import sys
import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import yaml

from .files import replacing
from .manifest import read_manifest
from .refusal import InputNotFound

# overrides that say where a run reads or resumes from, not what it is
HIDDEN_OVERRIDES = ("paths.", "ckpt_path=", "hydra.")


@dataclass
class Run:
    """One run's identity and its logged metrics (rows of its CSV logs, resumes merged)."""

    folder: Path
    name: str
    monitor: str
    mode: str  # max | min
    rows: list[dict[str, float]] = field(default_factory=list)
    status: str = "completed"
    error: str | None = None

    def series(self, key: str) -> list[tuple[int, float]]:
        """(step, value) of every row that logged ``key``."""
        return [(int(r["step"]), r[key]) for r in self.rows if key in r and "step" in r]

    def values(self, key: str) -> list[float]:
        return [v for _, v in self.series(key)]

    def best(self, key: str) -> float | None:
        vals = self.values(key)
        return (max if self.mode == "max" else min)(vals) if vals else None

    def last(self, key: str) -> float | None:
        vals = self.values(key)
        return vals[-1] if vals else None

    def mean(self, key: str) -> float | None:
        vals = self.values(key)
        return statistics.fmean(vals) if vals else None


def read_log(folder: Path) -> list[dict[str, float]]:
    """The rows of ``csv/version_*/metrics.csv``, in launch order; rows a resumed launch logged
    again (from its checkpoint's step on) replace those of the launch before."""
    versions = sorted(
        (folder / "csv").glob("version_*/metrics.csv"),
        key=lambda p: int(p.parent.name.split("_")[1]),
    )
    rows: list[dict[str, float]] = []
    for path in versions:
        new = []
        text = path.read_text(errors="replace")
        lines = text.splitlines(keepends=True)
        if lines and not lines[-1].endswith("\n"):  # the last write was cut short
            warnings.warn(
                f"deqlab report: {path}, line {len(lines)}: cut short (a kill or a full disk "
                "mid-write?); skipped",
                stacklevel=2,
            )
            lines = lines[:-1]
        reader = csv.DictReader(lines)
        for r in reader:
            try:
                new.append({k: float(v) for k, v in r.items() if v not in ("", None)})
            except (TypeError, ValueError):  # a torn value: the rest of the log still counts
                warnings.warn(
                    f"deqlab report: {path}, line {reader.line_num}: not a row of numbers "
                    "(torn by a kill or a full disk?); skipped",
                    stacklevel=2,
                )
        steps = [r["step"] for r in new if "step" in r]
        if steps:
            rows = [r for r in rows if r.get("step", -1) < min(steps)]
        rows += new
    return rows


def run_name(folder: Path, config: dict[str, Any]) -> str:
    """The run's ``run_name`` (a sweep job's swept values), else its overrides, else its
    folder's name."""
    if config.get("run_name"):
        return str(config["run_name"])
    overrides = folder / ".hydra" / "overrides.yaml"
    if overrides.is_file():
        listed = yaml.safe_load(overrides.read_text()) or []
        kept = [o for o in listed if not o.startswith(HIDDEN_OVERRIDES)]
        if kept:
            return ",".join(kept)
    return folder.name


def override_parts(name: str) -> list[str]:
    """A run name's overrides, split at the commas outside brackets (``a=1,b=[1,2]``)."""
    parts, depth, start = [], 0, 0
    for i, c in enumerate(name):
        depth += (c in "[{(") - (c in "]})")
        if c == "," and depth == 0:
            parts.append(name[start:i])
            start = i + 1
    return [*parts, name[start:]]


def distinct_names(runs: list[Run]) -> None:
    """Name each run by the overrides that tell it from the others (those every run shares
    left out), so that a figure's legend says what differs; a run with none of its own (the
    baseline the others change) is named by its folder; names stay unique."""
    if len(runs) < 2:
        return
    split = [override_parts(r.name) for r in runs]
    common = set(split[0]).intersection(*split[1:])
    short = [
        ",".join(p for p in parts if p not in common) or run.folder.name
        for run, parts in zip(runs, split, strict=True)
    ]
    if all(short) and len(set(short)) == len(short):
        for run, name in zip(runs, short, strict=True):
            run.name = name


def find_runs(root: Path) -> list[Run]:
    runs = []
    for config in sorted(root.rglob("config_resolved.yaml")):
        folder = config.parent
        resolved = yaml.safe_load(config.read_text()) or {}
        task = resolved.get("task", {})
        run = Run(
            folder,
            run_name(folder, resolved),
            task.get("monitor", "val/loss"),
            task.get("monitor_mode", "min"),
        )
        run.rows = read_log(folder)
        if not any(k.startswith("test/") for r in run.rows for k in r):
            run.status = "incomplete"
        runs.append(run)
    by_folder = {r.folder.resolve(): r for r in runs}
    for job in read_manifest(root):
        folder = Path(job["output_dir"]) if job.get("output_dir") else None
        known = by_folder.get(folder.resolve()) if folder is not None else None
        if known is not None:
            known.status, known.error = job["status"], job.get("error")
        else:  # rejected before it wrote anything
            name = ",".join(o for o in job["overrides"] if not o.startswith(HIDDEN_OVERRIDES))
            runs.append(
                Run(folder or root, name, "", "min", status=job["status"], error=job.get("error"))
            )
    return runs


def _fmt(x: float | None, digits: int = 4) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return ""
    return f"{x:.{digits}g}"


def table(runs: list[Run]) -> tuple[list[str], list[list[str]]]:
    # the budget curve's points (test/acc@k, test/nfe@k) are drawn, not tabulated
    tests = sorted(
        {k for r in runs for row in r.rows for k in row if k.startswith("test/") and "@" not in k}
    )
    tests = [k for k in tests if not k.startswith("test/loss")] + [
        k for k in tests if k.startswith("test/loss")
    ]
    monitor = next((r.monitor for r in runs if r.monitor), "val/loss")
    header = [
        "run",
        "status",
        f"best {monitor}",
        f"final {monitor}",
        *tests,
        "fwd nfe",
        "bwd nfe",
        "final fwd rel residual",
        "epoch time (s)",
        "peak CUDA MB",
    ]
    body = []
    for r in runs:
        status = r.status if r.error is None else f"{r.status}: {r.error.splitlines()[0][:80]}"
        body.append(
            [
                r.name,
                status,
                _fmt(r.best(r.monitor)),
                _fmt(r.last(r.monitor)),
                *[_fmt(r.last(k)) for k in tests],
                _fmt(r.mean("deq/fwd_nfe"), 3),
                _fmt(r.mean("deq/bwd_nfe"), 3),
                _fmt(r.last("deq/fwd_rel_residual"), 3),
                _fmt(r.mean("train/epoch_time_s"), 3),
                _fmt(max(r.values("train/peak_cuda_mem_mb"), default=None), 4),
            ]
        )
    # drop columns no run logged
    keep = [i for i in range(len(header)) if i < 2 or any(row[i] for row in body)]
    return [header[i] for i in keep], [[row[i] for i in keep] for row in body]


def markdown(header: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in body]
    return "\n".join(lines)


def _elapsed_at(run: Run, step: int) -> float | None:
    """Training wall-clock time at ``step``, interpolated from ``train/elapsed_s``."""
    points = run.series("train/elapsed_s")
    if not points:
        return None
    steps, times = zip(*points, strict=True)
    return float(np.interp(step, steps, times))


def _lines(ax: Any, runs: list[Run], xy) -> bool:
    drawn = False
    for r in runs:
        points = xy(r)
        if points:
            x, y = zip(*points, strict=True)
            ax.plot(x, y, marker="o", ms=3, lw=1.2, label=r.name)
            drawn = True
    if drawn:
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    return drawn


def budget_curve(run: Run, split: str = "test") -> tuple[str, list[tuple[float, float]]]:
    """A run's last ``split/<metric>@k`` against ``split/nfe@k``: the metric's name and the
    points (f evaluations, metric), by budget k."""
    keys = sorted({k for row in run.rows for k in row if k.startswith(f"{split}/") and "@" in k})
    names = {k.split("/", 1)[1].split("@")[0] for k in keys} - {"nfe"}
    if len(names) != 1:
        return "", []
    (name,) = names
    budgets = sorted(int(k.rsplit("@", 1)[1]) for k in keys if k.startswith(f"{split}/{name}@"))
    points = [(run.last(f"{split}/nfe@{k}"), run.last(f"{split}/{name}@{k}")) for k in budgets]
    return name, [(x, y) for x, y in points if x is not None and y is not None]


def figures(runs: list[Run], out: Path) -> list[str]:
    runs = [r for r in runs if r.rows]
    monitor = next((r.monitor for r in runs if r.monitor), "val/loss")
    written = []

    def save(fig: plt.Figure, name: str) -> None:
        fig.tight_layout()
        with replacing(out / name) as tmp:
            fig.savefig(tmp, dpi=100, format="png")
        plt.close(fig)
        written.append(name)

    for name, xlabel, xy in (
        ("monitor_vs_step.png", "training step", lambda r: r.series(monitor)),
        (
            "monitor_vs_time.png",
            "training time (s)",
            lambda r: [
                (t, v) for s, v in r.series(monitor) if (t := _elapsed_at(r, s)) is not None
            ],
        ),
    ):
        fig, ax = plt.subplots(figsize=(6.4, 4))
        if _lines(ax, runs, xy):
            ax.set_xlabel(xlabel)
            ax.set_ylabel(monitor)
            save(fig, name)
        else:
            plt.close(fig)

    def per_epoch(key: str):
        def xy(r: Run) -> list[tuple[float, float]]:
            groups: dict[int, list[float]] = defaultdict(list)
            for row in r.rows:
                if key in row and "epoch" in row:
                    groups[int(row["epoch"])].append(row[key])
            return [(e, statistics.fmean(v)) for e, v in sorted(groups.items())]

        return xy

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    drawn = _lines(axes[0], runs, per_epoch("deq/fwd_nfe"))
    drawn |= _lines(axes[1], runs, per_epoch("deq/fwd_rel_residual"))
    if drawn:
        axes[0].set(xlabel="epoch", ylabel="forward f evaluations (mean)")
        axes[1].set(xlabel="epoch", ylabel="forward relative residual (mean)", yscale="log")
        save(fig, "solver_per_epoch.png")
    else:
        plt.close(fig)

    fig, ax = plt.subplots(figsize=(6.4, 4))
    drawn = False
    for r in runs:
        traces = sorted(
            r.folder.glob("csv/version_*/figures/deq_residual_trace_step*.csv"),
            key=lambda p: int(p.stem.rsplit("step", 1)[1]),
        )
        if traces:
            trace = np.atleast_2d(np.loadtxt(traces[-1], delimiter=",", ndmin=2))
            ax.semilogy(np.median(trace, axis=1), lw=1.2, label=r.name)
            drawn = True
    if drawn:
        ax.set(xlabel="solver step", ylabel="relative residual (median of samples)")
        ax.set_title("forward solve at the last validation")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
        save(fig, "residual_traces.png")
    else:
        plt.close(fig)

    curves = {r.name: budget_curve(r) for r in runs}
    fig, ax = plt.subplots(figsize=(6.4, 4))
    if _lines(ax, runs, lambda r: curves[r.name][1]):
        name = next(n for n, points in curves.values() if points)
        ax.set(xlabel="forward f evaluations (test, mean)", ylabel=f"test/{name}")
        ax.set_title("metric against solver budget (one point per eval budget)")
        save(fig, "budget_curve.png")
    else:
        plt.close(fig)
    return written


def report(folder: str | Path) -> Path:
    """Write the report of the runs under ``folder`` into it; returns ``report.md``'s path."""
    root = Path(folder)
    if not root.is_dir():
        raise InputNotFound(f"{root}: no such folder")
    runs = find_runs(root)
    distinct_names(runs)
    if not runs:
        raise InputNotFound(
            f"no runs under {root}: a run folder holds config_resolved.yaml and its CSV log "
            "(csv/version_*/metrics.csv); pass a run's folder, a sweep's, or one holding several"
        )
    header, body = table(runs)
    with replacing(root / "report.csv") as tmp, open(tmp, "w", newline="") as fh:
        csv.writer(fh).writerows([header, *body])
    pictures = figures(runs, root)
    text = [f"# Report: {root.name}", "", markdown(header, body), ""]
    text += [f"![{p}]({p})" for p in pictures]
    with replacing(root / "report.md") as tmp:
        tmp.write_text("\n".join(text) + "\n")
    return root / "report.md"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="deqlab report", description=__doc__.split("\n")[0])
    parser.add_argument("folder", help="a sweep's folder, a run's, or one holding several runs")
    args = parser.parse_args(argv)
    try:
        path = report(args.folder)
    except FileNotFoundError as e:
        sys.exit(f"deqlab report: {e}")
    print(path.read_text().split("\n![")[0])
    print(f"written: {path} (with report.csv and figures beside it)")


if __name__ == "__main__":
    main()
