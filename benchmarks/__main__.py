"""`python -m benchmarks [--repeats N] [--only NAME ...] [--device cpu|cuda] [--bf16] [--compile]`

Runs the suite on the GPU when one is present (else the CPU), prints one table per benchmark
and writes ``benchmarks/results/<device>.json`` and ``convergence_<device>.png``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
from collections.abc import Callable
from pathlib import Path

import torch

from . import (
    convergence,
    end_to_end,
    graph_sparse,
    inr_memory,
    inverse_memory,
    lm_memory,
    memory,
    model_step,
    shine,
    solver_overhead,
    solver_table,
    training_step,
    tutorial_recipe,
)

RESULTS = Path(__file__).resolve().parent / "results"


def _convergence(device: torch.device, args: argparse.Namespace) -> list[dict]:
    rows, traces = convergence.convergence(device)
    tag = "cuda" if device.type == "cuda" else "cpu"
    convergence.plot_convergence(traces, str(RESULTS / f"convergence_{tag}.png"))
    return rows


def _training_step(device: torch.device, args: argparse.Namespace) -> list[dict]:
    rows = training_step.training_step(device, args.repeats)
    if args.bf16:
        rows += training_step.training_step(device, args.repeats, dtype=torch.bfloat16)
    return rows


# Each benchmark: its rows, measured side by side in this process (one file per benchmark).
BENCHES: dict[str, Callable[[torch.device, argparse.Namespace], list[dict]]] = {
    "solver_overhead": lambda device, args: solver_overhead.solver_overhead(
        device, args.repeats, compile=args.compile
    ),
    "convergence": _convergence,
    "training_step": _training_step,
    "model_step": lambda device, args: model_step.model_step(device, args.repeats),
    "memory": lambda device, args: memory.memory(device),
    "graph_sparse": lambda device, args: graph_sparse.graph_sparse(device, args.repeats),
    "inverse_memory": lambda device, args: inverse_memory.inverse_memory(device, args.repeats),
    "inr_memory": lambda device, args: inr_memory.inr_memory(device, args.repeats),
    "lm_memory": lambda device, args: lm_memory.lm_memory(device),
    "solver_table": lambda device, args: solver_table.solver_table(device, args.repeats),
    "shine": lambda device, args: shine.shine(device, args.repeats),
    "end_to_end": lambda device, args: end_to_end.end_to_end(device, args.data),
    "tutorial_recipe": lambda device, args: tutorial_recipe.tutorial_recipe(
        device, args.data, args.recipe_steps
    ),
}


def fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    if isinstance(v, list):
        return "[" + ", ".join(fmt(x) for x in v) + "]"
    return "-" if v is None else str(v)


def print_table(rows: list[dict]) -> None:
    if not rows:
        return
    keys = [k for k in rows[0] if k != "bench"]
    for r in rows[1:]:
        keys += [k for k in r if k not in keys and k != "bench"]
    table = [keys] + [[fmt(r.get(k)) for k in keys] for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(keys))]
    print(f"\n== {rows[0]['bench']} ==")
    for i, row in enumerate(table):
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)))
        if i == 0:
            print("  ".join("-" * w for w in widths))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--only", nargs="*", choices=BENCHES, default=list(BENCHES))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument(
        "--bf16", action="store_true", help="also time the training step under bf16 autocast"
    )
    ap.add_argument(
        "--compile",
        action="store_true",
        help="also time fixed-iteration solves under torch.compile (about a minute each to compile)",
    )
    ap.add_argument(
        "--data",
        default=os.environ.get("DEQLAB_DATA", "data"),
        help="data_dir for end_to_end and tutorial_recipe (needs cifar10/ and ptb/)",
    )
    ap.add_argument(
        "--recipe-steps",
        type=int,
        default=20,
        help="training steps of each side of tutorial_recipe (the tutorial trains 25,000)",
    )
    args = ap.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    name = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or platform.machine()
    )
    meta = {
        "device": name,
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "command": "python -m benchmarks "
        + " ".join(f"--only {b}" for b in args.only)
        + f" --repeats {args.repeats}"
        + (" --compile" if args.compile else "")
        + (" --bf16" if args.bf16 else "")
        + (f" --recipe-steps {args.recipe_steps}" if "tutorial_recipe" in args.only else ""),
    }
    print(
        f"deqlab benchmarks on {device.type} ({name}), torch {torch.__version__}, {meta['threads']} threads"
    )
    tag = "cuda" if device.type == "cuda" else "cpu"
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"{tag}.json"
    # Merge into earlier results for this device: a run of some benchmarks replaces only
    # those, each keeping the meta (machine, date, command) of the run that measured it.
    results: dict = json.loads(out.read_text()) if out.exists() else {}
    results.setdefault("meta", {})

    def save() -> None:  # after every benchmark: a later one that fails loses nothing
        out.write_text(json.dumps(results, indent=1))

    for bench in args.only:
        results["meta"][bench] = meta
    for bench in args.only:
        results[bench] = BENCHES[bench](device, args)
        print_table(results[bench])
        save()
    save()
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
