"""A published CIFAR-10 recipe trained end to end in one run, its test accuracy after every
epoch recorded beside the paper's figure.

    python -m benchmarks.reproduce --experiment cifar_tutorial --data DIR [--fast] [-- OVERRIDES]

Runs ``python -m deqlab experiment=<name>`` on the GPU (``trainer=gpu``; ``--device cpu`` for a
smoke run) as a user would, in a fresh process, and reads its CSV log. The experiments it takes
validate on the test split (``val_size: 0``, as the references do), so the validation accuracy
after each epoch is the test accuracy after that epoch. ``--fast`` adds the settings that change
how fast the recipe runs, not what it trains: every split resident on the device, both solves
replayed from CUDA graphs (the convergence test still read at every step, so the stop rules are
the experiment's). The result joins ``--out`` (benchmarks/results/cuda.json) under
``reproduction``, one entry per experiment: ``experiment``, ``epochs``, ``test_acc`` (one per
epoch), ``seconds`` (the whole command), ``epoch_train_seconds`` (each epoch's training, to set
beside the tutorial's own code: ``benchmarks.tutorial_train``), ``device``, ``commit``, the
command, and the paper's figure.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

# The papers' test accuracies, as the experiment files cite them.
PUBLISHED = {"cifar_tutorial": 0.816, "cifar_mdeq_small": 0.871}
# --fast: every split on the device, and both solves replayed from CUDA graphs
FAST = [
    "task.datamodule.on_device=true",
    "task.datamodule.num_workers=0",
    "task.datamodule.pin_memory=false",
    "solver.capture=true",
    "grad.capture=true",
]


def epoch_figures(run_dir: Path) -> tuple[list[float], list[float], float | None]:
    """The validation accuracy and training seconds of every epoch (in order) and the final
    test accuracy, from the run's latest CSV log."""
    logs = sorted(
        (run_dir / "csv").glob("version_*/metrics.csv"), key=lambda p: int(p.parent.name[8:])
    )
    if not logs:
        raise FileNotFoundError(f"no CSV log under {run_dir / 'csv'}: did the run start?")
    with open(logs[-1]) as fh:
        rows = list(csv.DictReader(fh))

    def per_epoch(key: str) -> list[float]:
        values = {int(r["epoch"]): float(r[key]) for r in rows if r.get(key)}
        return [values[e] for e in sorted(values)]

    test = [float(r["test/acc"]) for r in rows if r.get("test/acc")]
    return per_epoch("val/acc"), per_epoch("train/epoch_time_s"), test[-1] if test else None


def reproduce(
    experiment: str, data: str, out_dir: Path, device: str, fast: bool, overrides: list[str]
) -> dict[str, Any]:
    """Train ``experiment`` in a fresh process; its entry for ``reproduction``."""
    args = [
        f"experiment={experiment}",
        f"paths.data_dir={data}",
        f"hydra.run.dir={out_dir}",
        f"trainer={'gpu' if device == 'cuda' else 'cpu'}",
        "trainer.enable_progress_bar=false",
        *(FAST if fast else []),
        *overrides,
    ]
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "deqlab", *args], cwd=ROOT)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"python -m deqlab {' '.join(args)} exited {proc.returncode}")
    test_acc, epoch_seconds, final = epoch_figures(out_dir)
    return {
        "experiment": experiment,
        "epochs": len(test_acc),
        "test_acc": test_acc,
        "final_test_acc": final,
        "published_test_acc": PUBLISHED.get(experiment),
        "seconds": seconds,
        "epoch_train_seconds": epoch_seconds,
        "device": device_name(device),
        "commit": git("rev-parse", "--short", "HEAD"),
        "date": datetime.date.today().isoformat(),
        "command": "python -m deqlab "
        + " ".join(a for a in args if not a.startswith(("paths.", "hydra.run"))),
    }


def device_name(device: str) -> str:
    if device == "cuda":
        import torch

        return torch.cuda.get_device_name()
    return "cpu"


def git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()


def record(entry: dict[str, Any], out: Path) -> None:
    """Put ``entry`` under ``reproduction`` in ``out``, replacing one of its experiment."""
    results = json.loads(out.read_text()) if out.exists() else {}
    kept = [e for e in results.get("reproduction", []) if e["experiment"] != entry["experiment"]]
    results["reproduction"] = [*kept, entry]
    out.write_text(json.dumps(results, indent=1) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--experiment", required=True, choices=sorted(PUBLISHED))
    ap.add_argument("--data", required=True, help="the folder holding cifar10/")
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--fast", action="store_true", help="device-resident data, captured solves")
    ap.add_argument("--runs", default="/tmp/deqlab-reproduce", help="where the run folder goes")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "cuda.json"))
    ap.add_argument("overrides", nargs="*", help="more overrides, after --")
    args = ap.parse_args()
    out_dir = Path(args.runs) / f"{args.experiment}-{time.strftime('%Y%m%d-%H%M%S')}"
    entry = reproduce(args.experiment, args.data, out_dir, args.device, args.fast, args.overrides)
    record(entry, Path(args.out))
    accs = ", ".join(f"{a:.3f}" for a in entry["test_acc"])
    print(
        f"{entry['experiment']}: {entry['epochs']} epochs in {entry['seconds']:.0f} s on "
        f"{entry['device']}; test accuracy by epoch {accs} (published "
        f"{entry['published_test_acc']}); wrote {args.out}"
    )


if __name__ == "__main__":
    main()
