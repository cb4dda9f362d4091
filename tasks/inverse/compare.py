"""``python -m deqlab.tasks.inverse.compare DEQ.ckpt UNROLLED.ckpt --out DIR``: the same test
images reconstructed five ways, scored and shown side by side.

The rows of ``DIR/compare.md`` (and ``compare.csv``): the measurement itself, two classical
reconstructions, the unrolled network and the DEQ, each with the mean PSNR and SSIM over the
test split. The classical ones, each with its weight chosen on the validation split from a
grid:

- Tikhonov (Wiener-type) deconvolution, deepinv's ``prox_l2`` from zero:
  x = (A^T A + I / gamma)^-1 A^T y;
- total variation, argmin_x ||A x - y||^2 / 2 + lambda TV(x), by deepinv's proximal gradient
  (``optim_builder("PGD")`` with ``TVPrior``, step 1, 50 iterations from A^T y).

``DIR/grid.png`` shows a few test images: measurement / classical / unrolled / DEQ / ground
truth. Both checkpoints must come from runs of the same task and
operator; their configs are read as ``deqlab analyze`` reads them (allow-listed classes
only unless ``--trust-config``).

``--photos`` adds the same comparison on real photographs that scikit-image ships (offline),
center-cropped to 256 x 256, measured through the same operator at that size with the same
weights: ``photos.md`` and ``photos.png``.
"""

from __future__ import annotations

import argparse
import copy
import csv
import sys
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from torchmetrics.functional import structural_similarity_index_measure

from deqlab.runner.checkpoint import read_checkpoint, run_config

from .module import psnr
from .operators import make_physics

GAMMAS = (1.0, 3.0, 10.0, 30.0, 100.0, 300.0, 1000.0)
LAMBDAS = (0.0001, 0.0003, 0.001, 0.003, 0.01)
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry")


def _load(ckpt: str | Path, trust: bool) -> tuple[Any, Any]:
    cfg = run_config(ckpt, "deqlab.tasks.inverse.compare", trust)
    module = instantiate(cfg.task.module, init_from=None)
    module.load_state_dict(read_checkpoint(ckpt)["state_dict"])
    return module.eval(), cfg


def _batches(datamodule: Any, split: str) -> list[tuple[torch.Tensor, Any]]:
    loader = datamodule.val_dataloader() if split == "val" else datamodule.test_dataloader()
    return list(loader)


def compare(
    deq_ckpt: str | Path,
    unrolled_ckpt: str | Path,
    out: str | Path,
    trust: bool = False,
    photos: bool = False,
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
    val = _batches(datamodule, "val")
    gamma = _best(lambda y, g: tikhonov(physics, y, g), GAMMAS, val)
    lam = _best(lambda y, w: total_variation(physics, y, w), LAMBDAS, val)
    methods = _methods(deq, unrolled, gamma, lam)
    rows, shown = _score(methods, _batches(datamodule, "test"), 6)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    where = f"Test split of {cfg.task.datamodule._target_}, operator {dict(cfg.task.operator)}."
    _write(out, "compare", where, rows, shown)
    if photos:
        _photos(deq, unrolled, dict(cfg.task.operator), (gamma, lam), int(cfg.seed), out)
    return out / "compare.md"


def tikhonov(physics: Any, y: torch.Tensor, gamma: float) -> torch.Tensor:
    """(A^T A + I / gamma)^-1 A^T y: deepinv's exact ``prox_l2`` from zero."""
    return physics.prox_l2(torch.zeros_like(physics.A_adjoint(y)), y, gamma)


def total_variation(physics: Any, y: torch.Tensor, lam: float) -> torch.Tensor:
    """argmin_x ||A x - y||^2 / 2 + lam TV(x): deepinv's proximal gradient with its TV prior
    (50 steps of size 1, A's norm being 1; each TV prox 20 inner iterations)."""
    from deepinv.optim import TVPrior, optim_builder
    from deepinv.optim.data_fidelity import L2

    model = optim_builder(
        iteration="PGD",
        prior=TVPrior(n_it_max=20),
        data_fidelity=L2(),
        params_algo={"stepsize": 1.0, "lambda": lam},
        max_iter=50,
        early_stop=False,
    )
    with torch.no_grad():
        return model(y, physics)


def _best(method: Any, weights: tuple[float, ...], batches: list[Any]) -> float:
    """The weight of ``method(y, weight)`` with the best mean PSNR over ``batches``."""
    scores = {
        w: float(torch.cat([psnr(method(y, w), t.clean) for y, t in batches]).mean())
        for w in weights
    }
    return max(scores, key=scores.__getitem__)


def _methods(deq: Any, unrolled: Any, gamma: float, lam: float) -> dict[str, Any]:
    """The five reconstructions compared: (y, target) -> image."""
    physics = deq.net.cell.physics
    return {
        "measurement": lambda y, t: t.baseline,
        f"Tikhonov (gamma={gamma:g})": lambda y, t: tikhonov(physics, y, gamma),
        f"total variation (lambda={lam:g})": lambda y, t: total_variation(physics, y, lam),
        "unrolled": lambda y, t: unrolled(y)[0][-1],
        "DEQ": lambda y, t: deq(y)[0][-1],
    }


def _score(
    methods: dict[str, Any], batches: Any, show: int
) -> tuple[list[tuple[str, float, float]], dict[str, torch.Tensor]]:
    """Mean PSNR and SSIM of each method over the batches, and the first images of each."""
    totals: dict[str, list[list[torch.Tensor]]] = {name: [[], []] for name in methods}
    shown: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for i, (y, target) in enumerate(batches):
            for name, method in methods.items():
                image = method(y, target).clamp(0, 1)
                totals[name][0].append(psnr(image, target.clean))
                ssim = structural_similarity_index_measure(
                    image, target.clean, data_range=1.0, reduction="none"
                )
                totals[name][1].append(ssim.reshape(-1))
                if i == 0:
                    shown[name] = image[:show]
            if i == 0:
                shown["ground truth"] = target.clean[:show]
    rows = [
        (name, float(torch.cat(p).mean()), float(torch.cat(s).mean()))
        for name, (p, s) in totals.items()
    ]
    return rows, shown


def _write(
    out: Path,
    stem: str,
    where: str,
    rows: list[tuple[str, float, float]],
    shown: dict[str, torch.Tensor],
) -> None:
    with open(out / f"{stem}.csv", "w", newline="") as fh:
        csv.writer(fh).writerows([("method", "psnr", "ssim"), *rows])
    lines = ["| method | PSNR (dB) | SSIM |", "| --- | --- | --- |"]
    lines += [f"| {name} | {p:.2f} | {s:.3f} |" for name, p, s in rows]
    picture = "grid.png" if stem == "compare" else f"{stem}.png"
    text = f"{where}\n\n" + "\n".join(lines) + f"\n\n![{stem}]({picture})\n"
    (out / f"{stem}.md").write_text(text)
    _grid(shown, out / picture)


def _photos(
    deq: Any,
    unrolled: Any,
    operator: dict[str, Any],
    weights: tuple[float, float],
    seed: int,
    out: Path,
) -> None:
    """The comparison on scikit-image's photographs, 256 x 256, with the trained weights."""
    import numpy as np
    import skimage.data

    from .data import Target, simplest

    size = (3, 256, 256)
    crops = []
    for name in PHOTOS:
        image = getattr(skimage.data, name)()
        top, left = (image.shape[0] - 256) // 2, (image.shape[1] - 256) // 2
        crops.append(np.ascontiguousarray(image[top : top + 256, left : left + 256, :3]))
    clean = torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).float() / 255
    physics = make_physics(image_size=size, **operator)
    y = physics(clean, seed=seed)
    target = Target(clean, simplest(operator["kind"], y, operator.get("factor", 2)))

    def at_size(module: Any) -> Any:
        resized = copy.deepcopy(module)
        resized.net.cell.physics = make_physics(image_size=size, noise=False, **operator)
        resized.net.image_size = size
        return resized

    methods = _methods(at_size(deq), at_size(unrolled), *weights)
    rows, shown = _score(methods, [(y, target)], len(PHOTOS))
    where = f"scikit-image's {', '.join(PHOTOS)}, 256 x 256 crops, operator {operator}."
    _write(out, "photos", where, rows, shown)


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
    parser.add_argument("--photos", action="store_true", help="also scikit-image's photographs")
    args = parser.parse_args(argv)
    report = compare(args.deq, args.unrolled, args.out, args.trust_config, args.photos)
    sys.stdout.write(report.read_text())


if __name__ == "__main__":
    main()
