"""The Hydra callback that writes a multirun's manifest (:mod:`deqlab.runner.manifest`).

Lines are appended whole, so jobs ending at the same time on a cluster's shared file system do
not overwrite each other, and a sweep cut short still says what ran. After each line the
sweep's report (:mod:`deqlab.runner.report`) is written anew, so every sweep ends with one.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig

from .manifest import MANIFEST, job_record
from .report import report


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
        try:
            report(hydra_cfg.sweep.dir)
        except Exception as e:
            warnings.warn(f"deqlab: the sweep report was not written ({e})", stacklevel=1)
