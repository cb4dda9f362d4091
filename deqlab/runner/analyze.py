"""``deqlab analyze CKPT``: what the equilibrium of a trained model looks like, sample by sample.

Loads a run's checkpoint and its config (``config_resolved.yaml`` beside ``checkpoints/``),
runs the test split (``--split val``: the validation split; ``--limit N``: its first N
samples) with the budget curve and the per-sample spectral radius switched on, and writes
into ``<ckpt>_analysis/`` (or ``--out``):

- ``samples.csv``: per sample, its final relative and absolute residual, whether it
  converged, its solver steps, the spectral radius of J_f at its z* and its metric at the
  full budget (accuracy: 1 if correct; language model: the mean token NLL of the row) over
  its ``elements`` (1 image, or the row's tokens);
- ``curve.csv``: per budget k, the f evaluations spent and the metric (what an evaluation
  with ``solver.eval_max_iter=k`` scores);
- ``budget_curve.png``, ``convergence.png`` (relative residual against solver step: median,
  10th and 90th percentiles, and the samples that never converge), ``histograms.png``
  (steps, final residual, spectral radius);
- ``report.md``: the tables and plain-language findings.

Any task works whose module is a :class:`deqlab.runner.module.DEQLitModule`.
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import sys
import warnings
from dataclasses import replace
from pathlib import Path

import lightning as L
import matplotlib

matplotlib.use("Agg")  # headless, as deqlab.runner.loggers
import matplotlib.pyplot as plt
import numpy as np
import torch
from hydra.utils import instantiate

from .checkpoint import AtomicCheckpointIO, run_config
from .files import save_figure, write_text
from .module import DEQLitModule
from .quiet import quiet_lightning
from .stability import sample_steps


class Collector(L.Callback):
    """Reads each evaluation batch's solve (``DEQLitModule.kept_eval``) into per-sample
    arrays, until ``limit`` samples."""

    def __init__(self, limit: int | None):
        self.limit = limit
        self.rows: dict[str, list[np.ndarray]] = {
            k: [] for k in ("rel", "abs", "converged", "steps", "sradius", "value", "count")
        }
        self.traces: list[np.ndarray] = []
        # budget k -> [sum of the metric's elements, their count, nfe * samples, samples]
        self.curve: dict[int, list[float]] = {}
        self.seen = 0

    def _batch(self, module: DEQLitModule) -> None:
        kept = module.kept_eval
        info, values, curve = kept.info, kept.values, kept.by_budget
        if info is None or (self.limit is not None and self.seen >= self.limit):
            return
        # the solve's samples (not len(y): targets may be a tuple of tensors)
        batch = info.rel_residual.shape[0]
        keep = batch if self.limit is None else min(batch, self.limit - self.seen)
        self.seen += keep

        def per_sample(values: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
            values = values.double().reshape(batch, -1)[:keep]
            return values.sum(1).cpu().numpy(), np.full(keep, values.shape[1], dtype=float)

        value, count = per_sample(values)
        for name, col in (
            ("rel", info.rel_residual),
            ("abs", info.abs_residual),
            ("converged", info.converged),
            ("steps", sample_steps(info)),
        ):
            self.rows[name].append(col[:keep].detach().double().cpu().numpy())
        sradius = info.sradius if info.sradius is not None else torch.full((batch,), math.nan)
        self.rows["sradius"].append(sradius[:keep].detach().double().cpu().numpy())
        self.rows["value"].append(value)
        self.rows["count"].append(count)
        self.traces.append(info.trace[:, :keep].detach().double().cpu().numpy())
        for k, res in info.at_budget.items():
            v, c = per_sample(curve[k])
            acc = self.curve.setdefault(k, [0.0, 0.0, 0.0, 0.0])
            acc[0] += v.sum()
            acc[1] += c.sum()
            acc[2] += res.nfe * keep
            acc[3] += keep

    def on_test_batch_end(self, trainer, module, outputs, batch, batch_idx, *args) -> None:  # type: ignore[override]
        self._batch(module)

    def on_validation_batch_end(self, trainer, module, outputs, batch, batch_idx, *args) -> None:  # type: ignore[override]
        self._batch(module)

    def samples(self) -> dict[str, np.ndarray]:
        return {k: np.concatenate(v) for k, v in self.rows.items()}

    def trace(self, budget: int) -> np.ndarray:
        """(budget, samples) relative residuals; NaN after a batch's solve stopped."""
        padded = [
            np.pad(t, ((0, budget - len(t)), (0, 0)), constant_values=np.nan) for t in self.traces
        ]
        return np.concatenate(padded, axis=1)


def evaluate(
    ckpt: str | Path,
    split: str = "test",
    limit: int | None = None,
    grid: list[int] | None = None,
    sradius_iters: int = 10,
    data_dir: str | None = None,
    trust_config: bool = False,
) -> tuple[DEQLitModule, Collector, int]:
    """Run ``split`` of the checkpoint's task with every per-sample figure kept; returns the
    module, what was collected, and the eval budget. The run's config builds only allowed
    classes unless ``trust_config`` (:mod:`~deqlab.runner.trust`)."""
    cfg = run_config(ckpt, "deqlab analyze", trust_config)
    if data_dir is not None:
        cfg.task.datamodule.data_dir = data_dir
    datamodule = instantiate(cfg.task.datamodule)
    module = instantiate(cfg.task.module, init_from=None)
    if not isinstance(module, DEQLitModule):
        raise TypeError(
            f"deqlab analyze reads DEQLitModule checkpoints, not {type(module).__name__}"
        )
    module.fit_cfg = replace(
        module.fit_cfg, sradius_iters=sradius_iters, budget_splits=[split], budget_grid=grid or []
    )
    module.keep_eval = True
    collector = Collector(limit)
    # batches to run for `limit` samples; a datamodule without a fixed evaluation batch (one
    # graph per split) runs them all, and the collector keeps the first `limit` samples
    batch = getattr(datamodule, "eval_batch_size", None)
    batches = None if limit is None or batch is None else math.ceil(limit / batch)
    with quiet_lightning():
        trainer = L.Trainer(
            logger=False,
            callbacks=[collector],
            # a bar while it works for minutes, where someone watches (not in a log file)
            enable_progress_bar=sys.stderr.isatty(),
            enable_model_summary=False,
            plugins=[AtomicCheckpointIO()],  # loads tensors only, whatever torch defaults to
            inference_mode=False,  # the spectral radius takes vector-Jacobian products
            limit_test_batches=batches,
            limit_val_batches=batches,
        )
        run = trainer.test if split == "test" else trainer.validate
        run(module, datamodule, ckpt_path=str(ckpt), verbose=False)
    return module, collector, module.deq.solver_cfg.eval_budget()


def curve_rows(module: DEQLitModule, collector: Collector) -> list[tuple[int, float, float]]:
    """(budget, mean f evaluations, metric) for each budget of the grid."""
    out = []
    for k, (total, count, nfe, n) in sorted(collector.curve.items()):
        metric = float(module.curve_finish(torch.tensor(total / count, dtype=torch.float64)))
        out.append((k, nfe / n, metric))
    return out


def findings(
    samples: dict[str, np.ndarray],
    curve: list[tuple[int, float, float]],
    metric: str,
    split: str,
    budget: int,
    unstable_above: float,
    higher_is_better: bool = True,
    stop_mode: str = "rel",
) -> list[str]:
    """Plain-language sentences about the equilibrium, each computed from the tables."""
    n = len(samples["rel"])
    above = float((samples["rel"] > unstable_above).mean())
    out = [
        f"{above:.0%} of the {n} {split} samples end above {unstable_above:g} relative residual "
        f"at budget {budget}."
    ]
    if curve:
        full = curve[-1][2]
        near = next(k for k, _, m in curve if abs(m - full) <= 0.01 * abs(full))
        out.append(
            f"{split}/{metric} reaches within 1% of its full-budget value ({full:.4g}) at "
            f"{near} steps."
        )
        pick = max if higher_is_better else min
        best_k, _, best = pick(curve, key=lambda c: c[2])
        if best_k != curve[-1][0] and abs(best - full) > 0.01 * abs(full):
            out.append(
                f"{split}/{metric} is best at {best_k} steps ({best:.4g}), not at the full "
                "budget: more solver steps make this model worse."
            )
    never = np.flatnonzero(samples["converged"] == 0)
    if len(never):
        shown = ", ".join(str(i) for i in never[:10]) + (", ..." if len(never) > 10 else "")
        batch = stop_mode.startswith("batch")
        whose = f" (under stop_mode={stop_mode}: their batch as a whole)" if batch else ""
        out.append(f"{len(never)} samples never converge{whose} (samples {shown}).")
    else:
        out.append("Every sample converges.")
    rho = samples["sradius"][~np.isnan(samples["sradius"])]
    if len(rho):
        out.append(
            f"The spectral radius of J_f at z* has median {np.median(rho):.3g} and maximum "
            f"{rho.max():.3g}; {float((rho >= 1).mean()):.0%} of the samples have one at or above 1."
        )
    return out


def _figures(
    out: Path, samples: dict[str, np.ndarray], trace: np.ndarray, curve: list, metric: str
) -> list[str]:
    written = []
    if curve:
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot([c[1] for c in curve], [c[2] for c in curve], marker="o")
        for k, nfe, m in curve:
            ax.annotate(str(k), (nfe, m), fontsize=7)
        ax.set(xlabel="f evaluations (mean)", ylabel=metric, title="metric against budget")
        ax.grid(True, alpha=0.3)
        fig.tight_layout()
        save_figure(fig, out / "budget_curve.png", dpi=100)
        plt.close(fig)
        written.append("budget_curve.png")
    fig, ax = plt.subplots(figsize=(6, 4))
    steps = np.arange(trace.shape[0])
    # steps after every solve stopped are all NaN: numpy warns, the plot leaves a gap
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for q, style in ((50, "-"), (10, "--"), (90, "--")):
            ax.semilogy(steps, np.nanpercentile(trace, q, axis=1), style, color="k", label=f"p{q}")
    for i in np.flatnonzero(samples["converged"] == 0)[:10]:
        ax.semilogy(steps, trace[:, i], lw=0.8, alpha=0.7)
    ax.set(xlabel="solver step", ylabel="relative residual", title="convergence profiles")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, out / "convergence.png", dpi=100)
    plt.close(fig)
    written.append("convergence.png")
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
    axes[0].hist(samples["steps"], bins=30)
    axes[0].set_xlabel("solver steps")
    axes[1].hist(np.log10(np.maximum(samples["rel"], 1e-12)), bins=30)
    axes[1].set_xlabel("log10 final relative residual")
    rho = samples["sradius"][~np.isnan(samples["sradius"])]
    axes[2].hist(rho, bins=30)
    axes[2].set_xlabel("spectral radius of J_f at z*")
    for ax in axes:
        ax.set_ylabel("samples")
    fig.tight_layout()
    save_figure(fig, out / "histograms.png", dpi=100)
    plt.close(fig)
    written.append("histograms.png")
    return written


def analyze(
    ckpt: str | Path,
    out: str | Path | None = None,
    split: str = "test",
    limit: int | None = None,
    grid: list[int] | None = None,
    sradius_iters: int = 10,
    data_dir: str | None = None,
    trust_config: bool = False,
) -> Path:
    """Write the analysis of ``ckpt`` (see the module docstring); returns ``report.md``."""
    module, collector, budget = evaluate(
        ckpt, split, limit, grid, sradius_iters, data_dir, trust_config
    )
    if collector.seen == 0:
        raise ValueError(f"{ckpt}: no {split} samples were solved (unrolled pre-training?)")
    folder = (
        Path(out)
        if out is not None
        else Path(str(ckpt)).with_suffix("").parent / (Path(str(ckpt)).stem + "_analysis")
    )
    folder.mkdir(parents=True, exist_ok=True)
    samples = collector.samples()
    samples["value"] = samples["value"] / samples["count"]
    curve = curve_rows(module, collector)
    metric = module.curve_metric
    rows = []
    for i in range(len(samples["rel"])):
        rows.append(
            [
                i,
                *(repr(float(samples[k][i])) for k in ("rel", "abs")),
                int(samples["converged"][i]),
                int(samples["steps"][i]),
                repr(float(samples["sradius"][i])),
                repr(float(samples["value"][i])),
                int(samples["count"][i]),
            ]
        )
    columns = ["sample", "rel_residual", "abs_residual", "converged", "steps", "sradius"]
    write_text(folder / "samples.csv", csv_text([*columns, metric, "elements"], rows))
    write_text(
        folder / "curve.csv",
        csv_text(["budget", "nfe", metric], [[k, repr(nfe), repr(m)] for k, nfe, m in curve]),
    )
    pictures = _figures(folder, samples, collector.trace(budget), curve, f"{split}/{metric}")
    said = findings(
        samples,
        curve,
        metric,
        split,
        budget,
        module.fit_cfg.unstable_above,
        module.curve_higher_is_better,
        module.deq.solver_cfg.stop_mode,
    )
    lines = [
        f"# Analysis of {ckpt}",
        "",
        *[f"- {s}" for s in said],
        "",
        f"| budget | f evaluations | {split}/{metric} |",
        "| --- | --- | --- |",
    ]
    lines += [f"| {k} | {nfe:.3g} | {m:.4g} |" for k, nfe, m in curve]
    lines += ["", *[f"![{p}]({p})" for p in pictures], ""]
    path = folder / "report.md"
    write_text(path, "\n".join(lines))
    return path


def csv_text(header: list[str], rows: list[list]) -> str:
    """``header`` and ``rows`` as CSV text (written in one atomic step)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="deqlab analyze", description=__doc__.split("\n\n")[0])
    p.add_argument("ckpt", help="a checkpoint of a deqlab run (config_resolved.yaml beside it)")
    p.add_argument("--split", choices=("test", "val"), default="test")
    p.add_argument("--limit", type=int, default=None, help="only the first N samples")
    p.add_argument(
        "--budgets", default=None, help="the curve's budgets, e.g. 1,2,4,8 (default: powers of two)"
    )
    p.add_argument("--sradius-iters", type=int, default=10, help="power-method steps (0: off)")
    p.add_argument("--data-dir", default=None, help="the run's data, if it moved")
    p.add_argument("--out", default=None, help="output folder (default: <ckpt>_analysis beside it)")
    p.add_argument(
        "--trust-config",
        action="store_true",
        help="build whatever the run's config names (only for a run folder you trust)",
    )
    args = p.parse_args(argv)
    grid = [int(k) for k in args.budgets.split(",")] if args.budgets else None
    path = analyze(
        args.ckpt,
        args.out,
        args.split,
        args.limit,
        grid,
        args.sradius_iters,
        args.data_dir,
        args.trust_config,
    )
    print(path.read_text())
    print(f"written: {path} (with samples.csv, curve.csv and figures beside it)")
