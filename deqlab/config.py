"""Structured-config schemas for the Hydra config groups.

Each YAML file of ``solver/``, ``grad/``, ``norm/`` and ``jac_reg/`` starts from its group's
``schema`` (stored here in Hydra's ConfigStore), so an unknown key or a value of the wrong
type fails when the config is composed, naming the key, and never reaches a training run.
The schemas are the very dataclasses the engine takes, so config and code cannot drift.
"""

from __future__ import annotations

from dataclasses import fields

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig

from .core import SolverConfig
from .grad import GradConfig
from .lit import JacRegConfig
from .norm import NormConfig

SCHEMAS = {"solver": SolverConfig, "grad": GradConfig, "norm": NormConfig, "jac_reg": JacRegConfig}


def register_configs() -> None:
    cs = ConfigStore.instance()
    for group, schema in SCHEMAS.items():
        cs.store(group=group, name="schema", node=schema)


def check_schemas(cfg: DictConfig) -> None:
    """Reject keys that the group schemas do not define.

    Hydra lets ``+group.key=value`` append keys even to structured nodes; this closes that
    gap before any work is done, with the same message the engine would give.
    """
    for group, schema in SCHEMAS.items():
        node = cfg.get(group)
        if node is None:
            continue
        valid = [f.name for f in fields(schema)]
        for key in node:
            if key not in valid:
                raise ValueError(f"unknown {group} key {key!r}; valid keys: {', '.join(valid)}")
