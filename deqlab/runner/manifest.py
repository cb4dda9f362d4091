"""The sweep manifest's format: ``manifest.jsonl`` in a multirun's folder, one JSON line per
job as it ends, with the job's number, overrides, status (``completed`` or ``failed``, with the
error), the value the run returned (the task's best monitored metric) and its output folder.

Written by :class:`deqlab.runner.sweep.SweepManifest`; read by the sweep report
(:mod:`deqlab.runner.report`).
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus

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
