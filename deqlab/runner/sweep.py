"""The sweep manifest: ``manifest.jsonl`` in a multirun's folder, one line per job as it ends.

Each line holds the job's number, overrides, status (``completed`` or ``failed``, with the
error), the value the run returned (the task's best monitored metric) and its output folder.
Lines are appended whole, so jobs ending at the same time on a cluster's shared file system do
not overwrite each other, and a sweep cut short still says what ran. After each line the
sweep's report (:mod:`deqlab.runner.report`) is written anew, so every sweep ends with one.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig

MANIFEST = "manifest.jsonl"


def job_record(job: JobReturn) -> dict[str, Any]:
    hydra_cfg = job.hydra_cfg.hydra if job.hydra_cfg is not None else None
    failed = job.status == JobStatus.FAILED
    value = None if failed else job._return_value
    return {
        "num": None if hydra_cfg is None else hydra_cfg.job.num,
        "overrides": list(job.overrides or []),
        "status": "failed" if failed else "completed",
        "error": f"{type(job._return_value).__name__}: {job._return_value}" if failed else None,
        "value": value if isinstance(value, (int, float)) and math.isfinite(value) else None,
        "output_dir": None if hydra_cfg is None else hydra_cfg.runtime.output_dir,
    }


class SweepManifest(Callback):
    """Hydra callback (``hydra.callbacks.manifest``) writing the manifest of a multirun."""

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        hydra_cfg = HydraConfig.get()
        if hydra_cfg.mode != RunMode.MULTIRUN:
            return
        line = json.dumps(job_record(job_return)) + "\n"
        with open(Path(hydra_cfg.sweep.dir) / MANIFEST, "a") as fh:  # one write: stays whole
            fh.write(line)
        # The report is rewritten as each job ends: a sweep that fails or is cut short has
        # one for what ran. It must never fail the sweep.
        from .report import report

        try:
            report(hydra_cfg.sweep.dir)
        except Exception as e:
            warnings.warn(f"deqlab: the sweep report was not written ({e})", stacklevel=1)


def read_manifest(sweep_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(sweep_dir) / MANIFEST
    if not path.is_file():
        return []
    records = []
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if not isinstance(record, dict):  # a torn line: a kill or a full disk mid-write
            warnings.warn(
                f"deqlab: {path}, line {number}: not a job record (cut short?); skipped",
                stacklevel=2,
            )
            continue
        records.append(record)
    return records
