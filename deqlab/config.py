"""Structured-config schemas for the Hydra config groups.

Each YAML file of ``solver/``, ``grad/``, ``norm/`` and ``jac_reg/`` starts from its group's
``schema`` (stored here in Hydra's ConfigStore), so an unknown key or a value of the wrong
type fails when the config is composed, naming the key, and never reaches a training run.
The schemas are the very dataclasses the engine takes, so config and code cannot drift.
"""

from __future__ import annotations

from hydra.core.config_store import ConfigStore

from .core import SolverConfig
from .grad import GradConfig
from .lit import JacRegConfig
from .norm import NormConfig

SCHEMAS = {"solver": SolverConfig, "grad": GradConfig, "norm": NormConfig, "jac_reg": JacRegConfig}


def register_configs() -> None:
    cs = ConfigStore.instance()
    for group, schema in SCHEMAS.items():
        cs.store(group=group, name="schema", node=schema)
