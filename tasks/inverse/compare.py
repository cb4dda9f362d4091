"""``python -m deqlab.tasks.inverse.compare DEQ.ckpt UNROLLED.ckpt --out DIR``: the same test
images reconstructed five ways, scored and shown side by side.

The rows of ``DIR/compare.md`` (and ``compare.csv``): the measurement itself, a classical
reconstruction, the unrolled network and the DEQ, each with the mean PSNR and SSIM over the
test split. The classical one is Tikhonov (Wiener-type) deconvolution, deepinv's exact
``prox_l2`` from zero: x = (A^T A + I / gamma)^-1 A^T y, with gamma chosen on the validation
split from a grid. ``DIR/grid.png`` shows a few test images: measurement / classical /
unrolled / DEQ / ground truth. Both checkpoints must come from runs of the same task and
operator; their configs are read as ``deqlab analyze`` reads them (allow-listed classes
only unless ``--trust-config``).
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from torchmetrics.functional import structural_similarity_index_measure

from deqlab.runner.checkpoint import read_checkpoint, run_config

from .module import psnr

GAMMAS = (1.0, 3.0, 10.0, 30.0, 100.0, 300.0, 1000.0)


def _load(ckpt: str | Path, trust: bool) -> tuple[Any, Any]:
    cfg = run_config(ckpt, "deqlab.tasks.inverse.compare", trust)
    module = instantiate(cfg.task.module, init_from=None)
    module.load_state_dict(read_checkpoint(ckpt)["state_dict"])
    return module.eval(), cfg


def _batches(datamodule: Any, split: str) -> list[tuple[torch.Tensor, Any]]:
    loader = datamodule.val_dataloader() if split == "val" else datamodule.test_dataloader()
    return list(loader)


def compare(
    deq_ckpt: str | Path, unrolled_ckpt: str | Path, out: str | Path, trust: bool = False
) -> Path:
    """Write ``compare.md``, ``compare.csv`` and ``grid.png`` into ``out``; returns the report."""
    deq, cfg = _load(deq_ckpt, trust)
    unrolled, other = _load(unrolled_ckpt, trust)
    if dict(cfg.task.operator) != dict(other.task.operator):
        raise ValueError(
            f"the runs measured differently: {dict(cfg.task.operator)} against "
            f"{dict(other.task.operator)}; compare runs of the same operator"
        )
    datamodule = instantiate(cfg.task.datamodule)
    datamodule.setup("test")
    physics = deq.net.cell.physics

    def tikhonov(y: torch.Tensor, gamma: float) -> torch.Tensor:
        return physics.prox_l2(torch.zeros_like(physics.A_adjoint(y)), y, gamma)

    val = _batches(datamodule, "val")
    scores = {g: torch.cat([psnr(tikhonov(y, g), t.clean) for y, t in val]).mean() for g in GAMMAS}
    gamma = max(scores, key=lambda g: float(scores[g]))
    methods = {
        "measurement": lambda y, t: t.baseline,
        f"Tikhonov (gamma={gamma:g})": lambda y, t: tikhonov(y, gamma),
        "unrolled": lambda y, t: unrolled(y)[0][-1],
        "DEQ": lambda y, t: deq(y)[0][-1],
    }
    totals = {name: [[], []] for name in methods}
    shown: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for i, (y, target) in enumerate(_batches(datamodule, "test")):
            for name, method in methods.items():
                image = method(y, target).clamp(0, 1)
                totals[name][0].append(psnr(image, target.clean))
                ssim = structural_similarity_index_measure(
                    image, target.clean, data_range=1.0, reduction="none"
                )
                totals[name][1].append(ssim)
                if i == 0:
                    shown[name] = image[:6]
            if i == 0:
                shown["ground truth"] = target.clean[:6]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = [
        (name, float(torch.cat(p).mean()), float(torch.cat(s).mean()))
        for name, (p, s) in totals.items()
    ]
    with open(out / "compare.csv", "w", newline="") as fh:
        csv.writer(fh).writerows([("method", "psnr", "ssim"), *rows])
    lines = ["| method | PSNR (dB) | SSIM |", "| --- | --- | --- |"]
    lines += [f"| {name} | {p:.2f} | {s:.3f} |" for name, p, s in rows]
    (out / "compare.md").write_text(
        f"Test split of {cfg.task.datamodule._target_}, operator {dict(cfg.task.operator)}.\n\n"
        + "\n".join(lines)
        + "\n\n![grid](grid.png)\n"
    )
    _grid(shown, out / "grid.png")
    return out / "compare.md"


def _grid(shown: dict[str, torch.Tensor], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(shown)
    count = shown[names[0]].shape[0]
    fig, axes = plt.subplots(count, len(names), figsize=(1.6 * len(names), 1.6 * count))
    for col, name in enumerate(names):
        for row in range(count):
            ax = axes[row, col]
            ax.imshow(shown[name][row].permute(1, 2, 0).cpu().numpy())
            ax.set_xticks([]), ax.set_yticks([])
            if row == 0:
                ax.set_title(name, fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m deqlab.tasks.inverse.compare")
    parser.add_argument("deq", help="the DEQ run's checkpoint")
    parser.add_argument("unrolled", help="the unrolled run's checkpoint")
    parser.add_argument("--out", required=True, help="folder for compare.md and grid.png")
    parser.add_argument("--trust-config", action="store_true")
    args = parser.parse_args(argv)
    report = compare(args.deq, args.unrolled, args.out, args.trust_config)
    sys.stdout.write(report.read_text())


if __name__ == "__main__":
    main()
