"""The config tree's schemas, validation and resolvers.

Each YAML file of the engine's groups (``core/``, ``solver/``, ``grad/``, ``init/``,
``norm/``, ``jac_reg/``, ``optim/``) starts from its group's ``schema``, stored from the one
table :data:`SCHEMAS` in Hydra's ConfigStore, so an unknown key or a value of the wrong type
fails when the config is composed, naming the key, and never reaches a training run. The
schemas are the very dataclasses the engine takes (each defined beside the code that reads
it, each rule checked once, in its ``__post_init__``), so config and code cannot drift.
"""

from __future__ import annotations

import hashlib
import secrets
import sys
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.types import RunMode
from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf, open_dict

from ..core import CoreConfig
from ..grad import GradConfig
from ..initial_state import InitConfig
from ..norm import NormConfig
from ..settings import to_config
from ..solvers import SOLVERS, SolverConfig
from ..solvers.solver_config import solver_schema
from .extras import ExtrasConfig
from .fit import FitConfig, JacRegConfig
from .optim import OptimConfig
from .refusal import Refusal

# The config tree: the repository's top-level conf/ in a clone, deqlab/conf in an installed
# wheel (pyproject.toml maps one onto the other).
_HERE = Path(__file__).resolve().parent.parent  # deqlab/
CONF_DIR = next(
    (d for d in (_HERE / "conf", _HERE.parent / "conf") if (d / "train.yaml").is_file()),
    _HERE / "conf",
)

SCHEMAS = {
    "core": CoreConfig,
    "solver": SolverConfig,
    "grad": GradConfig,
    "norm": NormConfig,
    "jac_reg": JacRegConfig,
    "init": InitConfig,
    "optim": OptimConfig,
}


# Config nodes that become engine dataclasses; building them runs every value check.
VALIDATED = {**SCHEMAS, "task.module.fit": FitConfig, "extras": ExtrasConfig}


class Mode(str, Enum):
    """train: fit, then test a checkpoint; test: evaluate ``ckpt_path`` on the test split;
    eval: on the validation split, then the test split."""

    train = "train"
    test = "test"
    eval = "eval"

    def __str__(self) -> str:
        return self.value


class TestCheckpoint(str, Enum):
    """Which checkpoint a training run tests: best (by the task's monitor) or last."""

    best = "best"
    last = "last"

    def __str__(self) -> str:
        return self.value


@dataclass
class RootConfig:
    """The primary config's own keys, typed (``mode=trian`` fails at composition); the
    groups are typed by their own schemas."""

    seed: int = 0
    compile: bool = False
    ckpt_path: str | None = None
    init_from: str | None = None
    init_from_strict: bool = True
    overwrite: bool = False
    mode: Mode = Mode.train
    test_ckpt: TestCheckpoint = TestCheckpoint.best
    run_name: str = ""
    tags: list[str] = field(default_factory=list)
    extras: ExtrasConfig = field(default_factory=ExtrasConfig)
    task: Any = None
    core: Any = None
    solver: Any = None
    grad: Any = None
    init: Any = None
    norm: Any = None
    jac_reg: Any = None
    optim: Any = None
    trainer: Any = None
    logger: Any = None
    callbacks: Any = None
    paths: Any = None


# Distinguishes runs started in the same second: part of every run and sweep folder's name.
RUN_ID = secrets.token_hex(3)


class ConfigError(Refusal, ValueError):
    """A config value that cannot run; raised before any data, model or logger is built."""


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=RootConfig)
    for group, schema in SCHEMAS.items():
        cs.store(group=group, name="schema", node=schema)
    # each solver's own schema, from its signature: solver=broyden solver.m=8 fails here
    for name in SOLVERS.entries:
        cs.store(group="solver", name=f"{name}_schema", node=solver_schema(name))
    OmegaConf.register_new_resolver("run_id", lambda: RUN_ID, replace=True)
    OmegaConf.register_new_resolver("slurm_folder", _slurm_folder, replace=True)
    OmegaConf.register_new_resolver("path_safe", path_safe, replace=True)
    OmegaConf.register_new_resolver("job_name", job_name, replace=True)
    OmegaConf.register_new_resolver("run_group", run_group, replace=True)
    OmegaConf.register_new_resolver("deqlab_help", help_text, replace=True)


def _slurm_folder(default: str) -> str:
    from .cluster import slurm_folder  # Lightning's SLURM detection, imported when a run starts

    return slurm_folder(default)


# Groups that are not choices: the shared module block and Hydra's own.
INTERNAL_GROUPS = ("module", "hydra")


def help_text() -> str:
    """``deqlab --help``: the commands, every config group with its options (the schemas,
    which only type the files, left out), the composed config and Hydra's flags."""
    groups = []
    for folder in sorted(p for p in CONF_DIR.iterdir() if p.is_dir()):
        options = sorted(f.stem for f in folder.glob("*.yaml"))
        if folder.name not in INTERNAL_GROUPS and options:
            groups.append(f"  {folder.name}: {', '.join(options)}")
    return "\n".join(
        [
            "deqlab: train and test Deep Equilibrium models.",
            "",
            "  deqlab [group=option ...] [key=value ...]   train (mode=train), or evaluate a",
            "                                              checkpoint (mode=test, mode=eval)",
            "  deqlab -m group=a,b ...                     a sweep, one job per combination",
            "  deqlab report FOLDER                        compare the runs of a sweep",
            "  deqlab dashboard --project P --entity E     the W&B workspace",
            "  deqlab generate CKPT --prompt '...'         sample from a language model",
            "  deqlab analyze CKPT [--limit N]             inside a model's equilibrium",
            "",
            "(python -m deqlab ... is the same command.)",
            "",
            "== Config groups (group=option) ==",
            *groups,
            "",
            "== Config (override any key: key=value) ==",
            "$CONFIG",
            "== Hydra's flags ==",
            "$FLAGS_HELP",
        ]
    )


def _hydra() -> DictConfig | None:
    return HydraConfig.get() if HydraConfig.initialized() else None


def job_name() -> str:
    """What tells a sweep's job from the others: its values of the swept keys, as
    ``grad=phantom,solver=broyden`` (keys swept on the command line or in
    ``hydra.sweeper.params``, e.g. an Optuna search space). A single run, or a job whose
    sweep is not known (a job started by a cluster launcher), gets all its overrides
    (``paths.*`` and ``ckpt_path`` aside); no overrides give ''."""
    hydra_cfg = _hydra()
    if hydra_cfg is None:
        return ""
    parser = OverridesParser.create()
    overrides = [
        o
        for o in parser.parse_overrides(list(hydra_cfg.overrides.task))
        if o.key_or_group != "ckpt_path" and not o.key_or_group.startswith("paths.")
    ]
    swept = set(hydra_cfg.sweeper.get("params") or {})
    if hydra_cfg.mode == RunMode.MULTIRUN:
        # a local multirun runs its jobs in the process whose command line holds the sweep
        for arg in sys.argv[1:]:
            if arg.startswith("-") or not ("=" in arg or arg.startswith("~")):
                continue  # a flag (-m, --config-name ...) or its value
            try:
                (override,) = parser.parse_overrides([arg])
            except Exception:  # not an override: another program's arguments
                continue
            if override.is_sweep_override():
                swept.add(override.key_or_group)
    kept = [o for o in overrides if o.key_or_group in swept] or overrides
    return ",".join(sorted(o.input_line.lstrip("+") for o in kept))


def run_group(task: str) -> str:
    """The sweep's folder name for a multirun's jobs, else ``task``."""
    hydra_cfg = _hydra()
    if hydra_cfg is not None and hydra_cfg.mode == RunMode.MULTIRUN:
        return Path(hydra_cfg.sweep.dir).name
    return task


def path_safe(name: str, limit: int = 120) -> str:
    """``name`` as one folder name: no path separators, at most ``limit`` characters (a long
    name keeps its start and gets a short hash of the whole, so names stay distinct)."""
    name = name.replace("/", "_").replace("\\", "_")
    if len(name) <= limit:
        return name
    digest = hashlib.sha1(name.encode()).hexdigest()[:8]
    return f"{name[: limit - 9]}-{digest}"


def validate(cfg: DictConfig) -> None:
    """Check every value the engine and the runner will read, raising :class:`ConfigError`
    with the key and the rule; nothing is built and no data is read."""
    # Building each schema's dataclass from its node rejects unknown keys by name, including
    # those appended with +group.key=value (which Hydra lets through structured nodes).
    try:
        for key, schema in VALIDATED.items():
            node = OmegaConf.select(cfg, key)
            if node is not None and "_target_" not in node:  # a user's class checks its own
                to_config(schema, OmegaConf.to_container(node, resolve=True), key)
    except (ValueError, TypeError) as e:
        raise ConfigError(str(e)) from None
    if OmegaConf.select(cfg, "task.datamodule.val_size") == 0 and cfg.test_ckpt == "best":
        raise ConfigError(
            "task.datamodule.val_size=0 validates on the test split, so the best checkpoint "
            "would be chosen by test accuracy: set test_ckpt=last"
        )
    if OmegaConf.select(cfg, "optim.clip_nonemb") and not cfg.trainer.get("gradient_clip_val"):
        raise ConfigError(
            "optim.clip_nonemb clips the non-embedding gradients to trainer.gradient_clip_val, "
            "which is not set (the DEQ-Transformer's is 0.25)"
        )
    for switch in ("solver.capture", "grad.capture"):
        if cfg.get("compile") and OmegaConf.select(cfg, switch):
            raise ConfigError(
                f"compile=true and {switch}=true both compile the solve's kernels: choose one "
                "(torch.compile's mode=reduce-overhead records CUDA graphs of its own)"
            )
    if cfg.mode != "train" and not (cfg.ckpt_path or cfg.get("init_from")):
        raise ConfigError(
            f"mode={cfg.mode} evaluates a checkpoint: pass ckpt_path=<file.ckpt> "
            "(or init_from=<weights>)"
        )
    if cfg.mode == "train" and cfg.test_ckpt == "best" and not _keeps_best(cfg.callbacks):
        raise ConfigError(
            "test_ckpt=best tests the best checkpoint, but no callback keeps one (a "
            "ModelCheckpoint with a monitor, callbacks.checkpoint in callbacks=default): add "
            "callbacks=[...,checkpoints] or set test_ckpt=last"
        )


def _keeps_best(callbacks: DictConfig | None) -> bool:
    """Whether a configured callback is a ModelCheckpoint that monitors a metric."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    for node in (callbacks or {}).values():
        target = node.get("_target_") if OmegaConf.is_dict(node) else None
        if target and node.get("monitor"):
            cls = get_class(target)
            if isinstance(cls, type) and issubclass(cls, ModelCheckpoint):
                return True
    return False


def compose(overrides: list[str], output_dir: str | Path, keep_hydra: bool = False) -> DictConfig:
    """The config ``python -m deqlab <overrides>`` would run, for use from Python (tests,
    benchmarks, notebooks): ``deqlab.runner.main.run(compose([...], "outputs/x"))``.

    A job's config has no ``hydra`` node; ``keep_hydra`` keeps it for inspection.
    """
    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = hydra_compose(config_name="train", overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
        if not keep_hydra:
            del cfg["hydra"]
    return cfg
