"""The config tree: every file composes and instantiates; mistakes fail at composition."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra.errors import ConfigCompositionException
from hydra.utils import instantiate
from omegaconf.errors import ConfigAttributeError, ValidationError

from deqlab.runner.config import CONF_DIR

from .helpers.runs import compose_cfg

GROUPS = [
    "core",
    "solver",
    "grad",
    "init",
    "norm",
    "jac_reg",
    "optim",
    "task",
    "net",
    "trainer",
    "logger",
    "callbacks",
    "paths",
    "debug",
    "hparams_search",
    "experiment",
]
OPTIONS = [(g, p.stem) for g in GROUPS for p in sorted((CONF_DIR / g).glob("*.yaml"))]
# an option that needs another choice to make sense: the network of another task, the solver
# whose iteration a gradient mode reverses
WITH = {
    ("net", "deq_transformer"): ["task=ptb"],
    ("grad", "reversible"): ["solver=reversible"],
    ("grad", "shine"): ["solver=broyden"],
    ("net", "ignn"): ["task=chains"],
    ("net", "gcn"): ["task=chains"],
    ("net", "ignn_graph"): ["task=tu"],
    ("net", "de_grad"): ["task=inverse_cifar"],
    ("net", "de_prox"): ["task=inverse_cifar"],
    ("net", "implicit_mfn"): ["task=image_fit"],
    ("net", "mfn"): ["task=image_fit"],
    ("net", "siren"): ["task=image_fit"],
    ("net", "fourier_features"): ["task=image_fit"],
    ("norm", "inf_ball"): ["task=chains"],  # a matrix's rows: the graph cell's weight
}


def test_every_group_is_composed():
    """Every config group of conf/ (but hydra's own and the schema-only `module`) is listed."""
    present = {d.name for d in CONF_DIR.iterdir() if d.is_dir()} - {"hydra", "module", "local"}
    assert present == set(GROUPS)
    assert {g for g, _ in OPTIONS} == set(GROUPS)


@pytest.mark.parametrize("group,option", OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_config_composes_and_instantiates(group, option, tmp_path):
    override = f"experiment={option}" if group == "experiment" else f"{group}={option}"
    logs = f"paths.log_dir={tmp_path}"  # where a logger (MLflow's store) may write at once
    cfg = compose_cfg([*WITH.get((group, option), []), override, logs], tmp_path)
    module = instantiate(cfg.task.module)
    if module.net is None:  # built once the data is known (e.g. a vocabulary size)
        module.attach_net(module.net_factory(n_token=1000))
    assert sum(p.numel() for p in module.parameters()) > 0
    instantiate(cfg.task.datamodule)  # touches no data until setup()
    for node in cfg.callbacks.values():
        instantiate(node)
    for node in cfg.logger.values():
        instantiate(node)
    accelerator = cfg.trainer.get("accelerator")
    if (accelerator != "gpu" or torch.cuda.is_available()) and (
        accelerator != "mps" or torch.backends.mps.is_available()
    ):
        instantiate(cfg.trainer)


def test_slurm_launcher_composes(tmp_path):
    cfg = compose_cfg(["hydra/launcher=slurm"], tmp_path, keep_hydra=True)
    assert cfg.hydra.launcher.tasks_per_node == 1
    assert "submitit" in cfg.hydra.launcher._target_


def test_misspelled_key_in_yaml_fails_at_composition(tmp_path):
    bad = tmp_path / "conf"
    import shutil

    shutil.copytree(CONF_DIR, bad)
    (bad / "solver" / "anderson.yaml").write_text(
        "defaults:\n  - schema\n  - _self_\nname: anderson\nmax_itr: 5\n"
    )
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with (
        initialize_config_dir(config_dir=str(bad), version_base="1.3"),
        pytest.raises(ConfigCompositionException) as err,
    ):
        compose(config_name="train")
    assert "max_itr" in str(err.value.__cause__ or err.value)


@pytest.mark.parametrize(
    "override,exc,match",
    [
        ("solver.max_iter=abc", ConfigCompositionException, "max_iter"),
        ("solver=newton", ConfigCompositionException, "newton"),
        # each solver's schema is its own signature's: Anderson's m is not Broyden's
        (
            "solver=broyden solver.m=8",
            ConfigCompositionException,
            "'m' not in 'BroydenSolverConfig'",
        ),
        ("grad.tau=fast", ConfigCompositionException, "tau"),
    ],
)
def test_command_line_mistakes_fail_with_a_clear_message(override, exc, match, tmp_path):
    with pytest.raises(exc) as err:
        compose_cfg(override.split(), tmp_path)
    text = f"{err.value} {err.value.__cause__}"
    assert match in text


@pytest.mark.parametrize("override", ["+solver.max_itr=5", "++grad.step=2"])
def test_appended_unknown_key_is_rejected_before_any_work(override, tmp_path):
    """Hydra's `+key=` appends even to structured nodes; the runner's schema check stops it."""
    from deqlab.runner.main import run

    cfg = compose_cfg([override], tmp_path)
    with pytest.raises(
        ValueError,
        match=r"unknown (solver|grad) key '(max_itr|step)'; valid keys: .*(max_iter|steps)",
    ):
        run(cfg)


def test_a_fallback_gets_its_own_options_from_the_command_line(tmp_path):
    cfg = compose_cfg(
        ["solver.fallback=[broyden]", "+solver.fallback_options.broyden.memory=12"], tmp_path
    )
    solver = instantiate(cfg.task.module).deq.solver_cfg
    assert (solver.name, solver.m) == ("anderson", 5)
    (broyden,) = solver.fallback_configs()
    assert (broyden.name, broyden.memory) == ("broyden", 12)


EXPERIMENTS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))


def test_every_experiment_gives_its_solvers_options_by_name():
    """`experiment=X solver=Y` composes only if X sets no solver's own option directly (the
    schema of another solver refuses it, and Hydra cannot remove it from the command line):
    every experiment keeps them under solver.per_solver.<name> / grad.per_solver.<name>."""
    import dataclasses

    import yaml

    from deqlab.solvers import SolverConfig

    shared = {f.name for f in dataclasses.fields(SolverConfig)}
    for name in EXPERIMENTS:
        cfg = yaml.safe_load((CONF_DIR / "experiment" / f"{name}.yaml").read_text()) or {}
        own = sorted(set(cfg.get("solver") or {}) - shared)
        assert not own, f"{name}: solver.{own} belong under solver.per_solver.<its name>"
        backward = (cfg.get("grad") or {}).get("solver_options")
        assert not backward, f"{name}: grad.solver_options belong under grad.per_solver.<name>"


def test_a_recipes_solver_options_reach_its_solver(tmp_path):
    from omegaconf import OmegaConf

    from deqlab.solvers import SolverConfig

    def solver(*overrides):
        cfg = compose_cfg(["experiment=cifar_tutorial", *overrides], tmp_path)
        return SolverConfig.from_mapping(OmegaConf.to_container(cfg.solver, resolve=True))

    tutorial = solver()
    assert (tutorial.m, tutorial.lam, tutorial.lam_mode, tutorial.max_iter) == (
        5,
        1e-4,
        "absolute",
        25,
    )
    assert solver("solver.m=3").m == 3
    broyden = solver("solver=broyden")
    assert (broyden.memory, broyden.max_iter, broyden.stop_mode) == (30, 25, "batch_rel")
    cfg = compose_cfg(["experiment=cifar_mdeq_small", "grad.solver=anderson"], tmp_path)
    assert instantiate(cfg.task.module).deq.grad_cfg.solver_options == {}  # not Broyden's
    cfg = compose_cfg(["experiment=cifar_tutorial"], tmp_path)
    backward = instantiate(cfg.task.module).deq.grad_cfg
    assert backward.solver_options == {
        "m": 5,
        "lam": 1e-4,
        "lam_mode": "absolute",
        "tau": 1.0,
        "return_final": True,
    }


def test_schema_rejects_a_bad_value_at_assignment(tmp_path):
    cfg = compose_cfg([], tmp_path)
    with pytest.raises(ValidationError):
        cfg.solver.max_iter = "many"
    with pytest.raises(ConfigAttributeError):
        cfg.grad.stepz = 3


def test_module_receives_the_composed_engine_settings(tmp_path):
    cfg = compose_cfg(
        ["solver=broyden", "solver.max_iter=7", "grad=phantom", "norm=weight_norm"], tmp_path
    )
    module = instantiate(cfg.task.module)
    assert module.deq.solver_cfg.name == "broyden" and module.deq.solver_cfg.max_iter == 7
    assert module.deq.grad_cfg.name == "phantom"
    from torch.nn.utils import parametrize

    assert parametrize.is_parametrized(module.net.cell.conv1)


def test_experiment_files_hold_only_differences():
    """An experiment starts with `# @package _global_` and is short; it never redefines a
    whole group node (it selects group options with `override` instead)."""
    for path in sorted((CONF_DIR / "experiment").glob("*.yaml")):
        text = Path(path).read_text()
        assert "# @package _global_" in text, path
        assert "_target_" not in text, f"{path} redefines a node instead of overriding it"


SCHEMA_OPTIONS = [
    (group, p.stem)
    for group in ("core", "solver", "grad", "norm", "jac_reg", "init", "optim")
    for p in sorted((CONF_DIR / group).glob("*.yaml"))
]


@pytest.mark.parametrize(
    "group,option", SCHEMA_OPTIONS, ids=[f"{g}={o}" for g, o in SCHEMA_OPTIONS]
)
def test_every_option_file_agrees_with_its_schema(group, option, tmp_path):
    """`group=option` on the command line builds the same settings as the Python API given the
    option's name alone (the optimizer's class for optim): one source for every default."""
    import dataclasses

    from omegaconf import OmegaConf

    from deqlab.core import to_config
    from deqlab.runner.config import SCHEMAS

    schema = SCHEMAS[group]
    node = OmegaConf.to_container(compose_cfg([f"{group}={option}"], tmp_path)[group], resolve=True)
    if group == "optim":
        python = schema(optimizer=node["optimizer"])
    else:
        key = "kind" if group == "norm" else "name"
        python = to_config(schema, {key: node[key]}, group)
    assert dataclasses.asdict(to_config(schema, node, group)) == dataclasses.asdict(python)
