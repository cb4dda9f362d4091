"""Structured-config schemas for the Hydra config groups.

Each YAML file of ``solver/``, ``grad/``, ``norm/`` and ``jac_reg/`` starts from its group's
``schema`` (stored here in Hydra's ConfigStore), so an unknown key or a value of the wrong
type fails when the config is composed, naming the key, and never reaches a training run.
The schemas are the very dataclasses the engine takes, so config and code cannot drift.
"""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

from .core import SolverConfig
from .grad import GradConfig
from .lit import JacRegConfig
from .norm import NormConfig

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"

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


def compose(overrides: list[str], output_dir: str | Path, keep_hydra: bool = False) -> DictConfig:
    """The config ``python -m deqlab <overrides>`` would run, for use from Python (tests,
    benchmarks, notebooks): ``deqlab.__main__.run(compose([...], "outputs/x"))``.

    A job's config has no ``hydra`` node; ``keep_hydra`` keeps it for inspection.
    """
    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = hydra_compose(config_name="train", overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        cfg.output_dir = str(output_dir)
        if not keep_hydra:
            del cfg["hydra"]
    return cfg
