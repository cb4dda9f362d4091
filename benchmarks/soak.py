"""Soak: the resident memory of a long training run through the runner, and its growth.

python -m benchmarks.soak --task cifar --steps 1500        # real CIFAR-10 under $DEQLAB_DATA
python -m benchmarks.soak --task lm --steps 1500           # Penn Treebank
python -m benchmarks.soak --task cifar --steps 300 -- trainer.max_epochs=2   # extra overrides

Starts ``python -m deqlab`` (a real run, its own process) with a callback that records the
process's resident set size (RSS, from /proc) every ``--every`` steps, then prints the RSS after
warm-up and at the end, and the growth per 1,000 steps after warm-up (least squares), and writes
``benchmarks/results/soak_<task>.json`` and ``soak_<task>.png``. A run that keeps memory should
grow by well under 50 MB per 1,000 steps once warm. Linux only (/proc).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from lightning.pytorch.callbacks import Callback

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = RESULTS.parent.parent

# The issue's own reproduction (CIFAR: a 1,000-image training pool, validated every third epoch
# on two batches) and a language model of the same length.
TASKS = {
    "cifar": [
        "experiment=cifar_cpu",
        "task.datamodule.subset=2000",
        "++trainer.check_val_every_n_epoch=3",
        "++trainer.limit_val_batches=2",
        "++trainer.max_epochs=1000",
    ],
    "lm": [
        "experiment=ptb_deq_transformer_cpu",
        "++trainer.val_check_interval=500",
        "++trainer.limit_val_batches=4",
        "++trainer.max_epochs=1000",
    ],
}


def rss_mb() -> float:
    """This process's resident set size in MB."""
    with open("/proc/self/statm") as fh:
        resident = int(fh.read().split()[1])
    return resident * os.sysconf("SC_PAGE_SIZE") / 2**20


class RSSProbe(Callback):
    """Appends ``{"step", "rss_mb", "s"}`` to ``path`` every ``every`` training steps; with
    ``types``, also the Python object types whose counts grew most since the previous line."""

    def __init__(self, path: str, every: int = 25, types: bool = False) -> None:
        self.path, self.every, self.types = Path(path), every, types
        self.start = time.monotonic()
        self.counts: Counter = Counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step % self.every:
            return
        row = {
            "step": step,
            "rss_mb": round(rss_mb(), 1),
            "s": round(time.monotonic() - self.start, 1),
        }
        if self.types:
            counts = Counter(type(o).__name__ for o in gc.get_objects())
            row["grew"] = (counts - self.counts).most_common(8)
            self.counts = counts
        with open(self.path, "a") as fh:
            fh.write(json.dumps(row) + "\n")


def growth_per_1000(rows: list[dict], warmup: int) -> float:
    """Least-squares slope of RSS against step after ``warmup`` steps, in MB per 1,000 steps."""
    pts = [(r["step"], r["rss_mb"]) for r in rows if r["step"] >= warmup]
    if len(pts) < 2:
        return float("nan")
    n = len(pts)
    mx = sum(s for s, _ in pts) / n
    my = sum(m for _, m in pts) / n
    var = sum((s - mx) ** 2 for s, _ in pts)
    return 1000 * sum((s - mx) * (m - my) for s, m in pts) / var if var else float("nan")


def plot(rows: list[dict], task: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.plot([r["step"] for r in rows], [r["rss_mb"] for r in rows], marker=".")
    ax.set_xlabel("training step")
    ax.set_ylabel("resident memory (MB)")
    ax.set_title(f"soak: {task}")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--task", choices=TASKS, default="cifar")
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--every", type=int, default=25)
    ap.add_argument("--warmup", type=int, default=300, help="steps before growth is measured")
    ap.add_argument("--types", action="store_true", help="log the Python object types that grow")
    ap.add_argument("--data-dir", default=os.environ.get("DEQLAB_DATA", "data"))
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "rss.jsonl"
        cmd = [
            sys.executable,
            "-m",
            "deqlab",
            *TASKS[args.task],
            f"paths.data_dir={args.data_dir}",
            f"++trainer.max_steps={args.steps}",
            f"hydra.run.dir={Path(tmp) / 'run'}",
            "+callbacks.rss._target_=benchmarks.soak.RSSProbe",
            f"+callbacks.rss.path={log}",
            f"+callbacks.rss.every={args.every}",
            f"+callbacks.rss.types={args.types}",
            *args.overrides,
        ]
        env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
        proc = subprocess.run(cmd, env=env, cwd=tmp, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"the run failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
        rows = [json.loads(line) for line in log.read_text().splitlines()]

    warm = next((r for r in rows if r["step"] >= args.warmup), rows[-1])
    result = {
        "task": args.task,
        "steps": rows[-1]["step"],
        "warmup": args.warmup,
        "rss_after_warmup_mb": warm["rss_mb"],
        "rss_final_mb": rows[-1]["rss_mb"],
        "growth_mb_per_1000_steps": round(growth_per_1000(rows, args.warmup), 1),
        "command": " ".join(["python -m benchmarks.soak", *sys.argv[1:]]),
        "rows": rows,
    }
    for r in rows:
        print(json.dumps(r))
    print(
        f"\n{args.task}: RSS {warm['rss_mb']:.0f} MB at step {warm['step']}, "
        f"{rows[-1]['rss_mb']:.0f} MB at step {rows[-1]['step']}: "
        f"{result['growth_mb_per_1000_steps']:+.1f} MB per 1,000 steps after warm-up"
    )
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"soak_{args.task}.json").write_text(json.dumps(result, indent=1) + "\n")
    plot(rows, args.task, RESULTS / f"soak_{args.task}.png")


if __name__ == "__main__":
    main()
