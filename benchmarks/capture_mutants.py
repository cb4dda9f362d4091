"""Hand-made mutants of ``deqlab/solvers/capture.py``, each run against the CUDA-graph tests.

    python -m benchmarks.capture_mutants          (on a GPU machine; about 20 s a mutant)

mutmut (``make mutate``) reads this file's mutants as "no test" on a CPU: the replays are
tested only where CUDA is (``requires_cuda``), and the device image has no mutmut. Each mutant
below breaks one promise of the replay (the inputs copied in, the stop read, the step count,
the recording's key, the weight-norm and autocast caches); a test must fail for each. Prints
one line per mutant, killed or SURVIVED, and exits 1 if any survived or no test ran.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGET = ROOT / "deqlab" / "solvers" / "capture.py"
TESTS = ["tests/test_capture.py", "tests/test_capture_backward.py", "-k", "captured or refuses"]
# (the dropout test among them: the masks' addresses are what a replay reads)

# (what it breaks, the line as it is, the line mutated)
MUTANTS = [
    ("z0 not copied in", "_copy_into(static_z0, z0)", "pass"),
    ("inputs not copied in", "_copy_into(static_inputs, inputs)", "pass"),
    ("stop flag inverted", "if flag is not None and flag.item():", "if flag is not None and not flag.item():"),
    ("never stops early", "if flag is not None and flag.item():", "if False:"),
    ("step count unbounded", 'steps = min(steps + every, kwargs["max_iter"])', "steps = steps + every"),
    ("result graph skipped", "rec.graphs[-1].replay()  # the result", "pass"),
    ("inputs' shapes not in the key", "_signature(inputs),", ""),
    ("train/eval mode not in the key", 'return self.replay((fn, getattr(fn, "training", None)), make, z0, args, kwargs)', "return self.replay(fn, make, z0, args, kwargs)"),
    ("weight-norm cache kept", "parametrize._cache.clear()\n                rec.begin()", "rec.begin()"),
    ("autocast cache kept", "cache_enabled=False,", "cache_enabled=True,"),
    ("trace not cut at the steps run", "trace=res.trace[:steps].clone(),", "trace=res.trace.clone(),"),
]  # fmt: skip


def run_tests() -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *TESTS],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )


def main() -> None:
    original = TARGET.read_text()
    clean = run_tests()
    if clean.returncode != 0 or " passed" not in clean.stdout:
        print(clean.stdout[-2000:])
        raise SystemExit("the unmutated tests do not pass (or none ran: no CUDA?)")
    survived = []
    try:
        for what, line, mutated in MUTANTS:
            if original.count(line) != 1:
                raise SystemExit(f"mutant {what!r}: {line!r} is not once in {TARGET.name}")
            TARGET.write_text(original.replace(line, mutated))
            killed = run_tests().returncode != 0
            print(f"{'killed  ' if killed else 'SURVIVED'} {what}", flush=True)
            if not killed:
                survived.append(what)
    finally:
        TARGET.write_text(original)
    print(f"{len(MUTANTS) - len(survived)} of {len(MUTANTS)} killed")
    raise SystemExit(1 if survived else 0)


if __name__ == "__main__":
    main()
