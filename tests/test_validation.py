"""Every refusal says what is wrong and what to do, in full: the config checks of the solver,
gradient and core groups, the state checks, and the registries' import errors. Each message
is matched whole, so a check that stops firing, fires on a valid value, or loses its words
fails here (mutation testing found these unpinned: docs/mutation.md)."""

from __future__ import annotations

import re

import pytest
import torch

from deqlab import get_solver
from deqlab.core import CoreConfig
from deqlab.grad import GradConfig
from deqlab.registry import Registry
from deqlab.solvers import SolverConfig
from deqlab.solvers.base import FlatState

from .helpers.problems import SOLVERS


def refuses(exc: type[Exception], message: str):
    return pytest.raises(exc, match="^" + re.escape(message) + "$")


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"jacobian_at": "fz"}, "grad.jacobian_at=fz evaluates J at the returned f(z*): set grad.output=fz"),
        ({"max_iter": 0}, "grad.max_iter must be a positive int, got 0"),
        ({"tol": 0.0}, "grad.tol must be > 0 (or null: exactly max_iter steps), got 0.0"),
        ({"stop_mode": "max"}, "grad.stop_mode must be one of ('abs', 'rel', 'batch_abs', 'batch_rel'), got 'max'"),
        ({"name": "phantom", "steps": []}, "grad.steps must be an int >= 1 or a list of them, got []"),
        ({"name": "phantom", "steps": [2, 0]}, "grad.steps must be an int >= 1 or a list of them, got [2, 0]"),
        ({"name": "phantom", "steps": 1.5}, "grad.steps must be an int >= 1 or a list of them, got 1.5"),
        ({"name": "phantom", "tau": 0.0}, "grad.tau must lie in (0, 1], got 0.0"),
        ({"name": "phantom", "tau": 1.5}, "grad.tau must lie in (0, 1], got 1.5"),
        ({"name": "phantom", "sup_loc": [0]}, "grad.sup_loc lists steps >= 1, got [0]"),
    ],
)  # fmt: skip
def test_grad_settings_are_refused_in_full(settings, message):
    with refuses(ValueError, message):
        GradConfig(**settings)


def test_grad_steps_per_state_must_match_the_states():
    cfg = GradConfig(name="phantom", steps=[1, 2, 3])
    assert cfg.steps_for(3) == [1, 2, 3] and GradConfig(name="phantom", steps=4).steps_for(2) == [
        4,
        4,
    ]
    message = (
        "grad.steps lists 3 step counts for 2 sampled states; give one count, or one per state"
    )
    with refuses(ValueError, message):
        cfg.steps_for(2)


def test_grad_boundaries_that_are_valid():
    assert GradConfig(name="phantom", tau=1.0, sup_loc=[1], steps=[1]).tau == 1.0
    assert GradConfig(tol=None).tol is None


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"eval_factor": 0.0}, "solver.eval_factor must be > 0, got 0.0"),
        ({"eval_factor": -1.0}, "solver.eval_factor must be > 0, got -1.0"),
        ({"tol": 0.0}, "solver.tol must be > 0 (or null: exactly max_iter steps), got 0.0"),
        ({"max_iter": 0}, "solver.max_iter must be a positive int, got 0"),
        ({"eval_max_iter": 0}, "solver.max_iter must be a positive int, got 0"),
        ({"check_every": 0}, "solver.check_every must be a positive int (steps between convergence tests), got 0"),
    ],
)  # fmt: skip
def test_solver_settings_are_refused_in_full(settings, message):
    with refuses(ValueError, message):
        SolverConfig(**settings)


def test_a_solver_call_accepts_tol_zero():
    """tol=0 is a solve that stops only at an exact fixed point (the config asks for > 0, as
    a training budget should be reachable; a direct call may ask for exactness)."""
    for name in SOLVERS:
        f = lambda z: 0.5 * torch.tanh(z) + 1.0
        res = get_solver(name)(f, torch.zeros(2, 3), max_iter=4, tol=0.0)
        assert res.nfe == 4 and not res.converged.any()


def test_core_indexing_starts_at_step_one():
    assert CoreConfig(indexing=[1, 3]).sampled() == 3
    with refuses(ValueError, "core.indexing lists increasing solver steps >= 1, got [0, 3]"):
        CoreConfig(indexing=[0, 3])
    with refuses(ValueError, "core.indexing lists increasing solver steps >= 1, got [3, 3]"):
        CoreConfig(indexing=[3, 3])
    with refuses(ValueError, "core.n_states must be >= 1 (1: the equilibrium only), got 0"):
        CoreConfig(n_states=0)


def test_state_checks_name_the_structure():
    message = (
        "a DEQ state must be a tensor or a non-empty tuple/list of tensors, got <class 'tuple'>"
    )
    with refuses(TypeError, message):
        FlatState((torch.zeros(2, 3), 3))
    with refuses(TypeError, message):
        FlatState(())
    message = "every state tensor needs the batch dimension first; got shapes [(2, 3), ()]"
    with refuses(ValueError, message):
        FlatState((torch.zeros(2, 3), torch.tensor(1.0)))
    with refuses(
        ValueError, "every state tensor needs the batch dimension first; got shapes [(2, 3), (4,)]"
    ):
        FlatState((torch.zeros(2, 3), torch.zeros(4)))
    state = FlatState((torch.zeros(2, 3), torch.zeros(2)))  # a (B,) part is a state
    assert state.sizes == [3, 1]


def test_the_flat_view_of_f_is_in_the_working_dtype():
    """A (B, D) float32 state whose f answers in bf16 (autocast) is still solved in fp32."""
    state = FlatState(torch.zeros(2, 3))
    f_flat = state.flat_fn(lambda z: (z + 1).to(torch.bfloat16))
    assert f_flat(torch.zeros(2, 3)).dtype == torch.float32


def test_registry_import_errors_name_what_was_looked_up():
    reg: Registry[object] = Registry("widget", "add your own with register_widget")
    reg.register_lazy("lazy", "no_such_module_xyz:thing")
    with pytest.raises(
        ValueError, match=r"^widget 'no_such_module_xyz:thing': cannot import module"
    ):
        reg.get("lazy")
    with pytest.raises(ValueError, match=r"^widget 'no_such_module_xyz:f': cannot import module"):
        reg.get("no_such_module_xyz:f")
    with refuses(ValueError, "widget 'math:nope': module 'math' has no 'nope'"):
        reg.get("math:nope")


def test_a_solver_option_named_options_is_not_fed_the_config_dict(restore_registries):
    """``solver.options`` holds extra keyword arguments, spread into the call; it is not itself
    an argument, even for a solver that happens to take one called ``options``."""
    from deqlab import register_solver

    def takes_options(f, z0, *, max_iter, tol, stop_mode="rel", save_at=(), options=None):
        raise AssertionError("not called")

    register_solver("takes_options", takes_options)
    assert SolverConfig(name="takes_options").solver_kwargs() == {}
    assert SolverConfig(name="takes_options", options={"options": 3}).solver_kwargs() == {
        "options": 3
    }


@pytest.mark.parametrize(("bad", "listed"), [(5, "0, 1, 2, 3, 4"), (6, "0, 1, 2, 3, 4, ...")])
def test_the_non_finite_message_lists_five_samples_then_an_ellipsis(bad, listed):
    from deqlab.solvers.checks import check_finite_start

    residual = torch.zeros(8)
    residual[:bad] = float("nan")
    message = (
        f"anderson: f returned non-finite values for {bad} of 8 samples (indices {listed}) at "
        "every iterate, starting from z0; check the input injection and the cell's weights (a "
        "learning rate too high, or missing weight/spectral normalization)."
    )
    with refuses(FloatingPointError, message):
        check_finite_start(residual, "anderson")


def test_a_solver_without_check_every_is_refused_in_full(restore_registries):
    from deqlab import register_solver

    def plain(f, z0, *, max_iter, tol, stop_mode="rel", save_at=()):
        raise AssertionError("not called")

    register_solver("plain_solver", plain)
    message = (
        "solver 'plain_solver' takes no check_every, so it can neither defer its convergence "
        "tests nor be captured; set solver.check_every=1 and solver.capture=false"
    )
    with refuses(ValueError, message):
        SolverConfig(name="plain_solver", capture=True)


def test_clip_nonemb_needs_a_clip_value(tmp_path):
    from deqlab.runner.config import ConfigError, validate

    from .helpers.runs import compose_cfg

    with pytest.raises(ConfigError) as e:
        validate(compose_cfg(["optim.clip_nonemb=true"], tmp_path))
    assert str(e.value) == (
        "optim.clip_nonemb clips the non-embedding gradients to trainer.gradient_clip_val, "
        "which is not set (the DEQ-Transformer's is 0.25)"
    )
    validate(compose_cfg(["optim.clip_nonemb=true", "trainer.gradient_clip_val=0.25"], tmp_path))


def test_an_option_the_solver_does_not_read_is_refused_not_ignored():
    """solver=broyden solver.m=8 used to compose and run with m ignored: the option is
    refused by name, with the solver that reads it; a fallback that reads it makes it valid."""
    with pytest.raises(ValueError, match=r"solver\.m=8: solver 'broyden' takes no m .*anderson"):
        SolverConfig(name="broyden", m=8)
    with pytest.raises(ValueError, match=r"solver\.memory=12: .* memory is an option of broyden"):
        SolverConfig(name="anderson", memory=12, fallback=["broyden"])  # fallback_options: yes
    with pytest.raises(ValueError, match=r"solver\.m=5: solver 'broyden' takes no m"):
        SolverConfig(name="broyden", m=5)  # in Python, even at Anderson's default
    # a composed config over another solver's group file holds that solver's defaults
    assert not hasattr(SolverConfig.from_mapping({"name": "broyden", "m": 5}), "m")
    with pytest.raises(ValueError, match=r"unknown solver key 'mm'; valid keys: name, max_iter"):
        SolverConfig.from_mapping({"name": "broyden", "mm": 5})


def test_per_solver_options_apply_only_to_their_solver():
    """An experiment's solver options under per_solver.<name> reach that solver (main or
    fallback) where its own field is at the default, and no other; a solver or an option that
    does not exist is refused by name."""
    tutorial = {"anderson": {"m": 6, "lam_mode": "absolute"}, "broyden": {"memory": 9}}
    anderson = SolverConfig(name="anderson", per_solver=tutorial)
    assert (anderson.m, anderson.lam_mode, anderson.lam) == (6, "absolute", 1e-4)
    assert SolverConfig(name="anderson", m=3, per_solver=tutorial).m == 3  # set: it wins
    assert SolverConfig(name="broyden", per_solver=tutorial).memory == 9
    assert not hasattr(SolverConfig(name="fixed_point", per_solver=tutorial), "m")
    (fallback,) = SolverConfig(
        name="anderson", per_solver=tutorial, fallback=["broyden"]
    ).fallback_configs()
    assert fallback.memory == 9
    with pytest.raises(ValueError, match=r"unknown solver 'anderzon'"):
        SolverConfig(per_solver={"anderzon": {"m": 6}})
    with pytest.raises(
        ValueError,
        match=r"solver\.per_solver\.broyden sets \['m'\], which solver 'broyden' does not",
    ):
        SolverConfig(per_solver={"broyden": {"m": 6}})


def test_backward_per_solver_options_apply_only_to_their_solver():
    from deqlab.grad import GradConfig

    options = {"broyden": {"memory": 20}, "anderson": {"m": 6}}
    assert GradConfig(solver="broyden", per_solver=options).solver_options == {"memory": 20}
    assert GradConfig(solver="anderson", per_solver=options).solver_options == {"m": 6}
    explicit = GradConfig(solver="anderson", per_solver=options, solver_options={"m": 3})
    assert explicit.solver_options == {"m": 3}  # set directly: it wins
    assert GradConfig(solver="fixed_point", per_solver=options).solver_options == {}
    with pytest.raises(ValueError, match=r"grad\.per_solver\.broyden sets \['m'\]"):
        GradConfig(per_solver={"broyden": {"m": 6}})


def test_a_solvers_schema_is_its_signature(restore_registries):
    """A solver of one's own gets a settings class from its keyword-only options: their
    annotations become the fields' types (Any where a config cannot hold one), a required
    option a required field, and its options are keywords like a built-in's."""
    from dataclasses import MISSING, fields
    from typing import Any

    from deqlab import register_solver
    from deqlab.solvers.solver_config import solver_schema

    def newton(
        f,
        z0,
        *,
        max_iter,
        tol,
        stop_mode="rel",
        save_at=(),
        restart: int,
        damping: float | None = 0.5,
        shifts: list[float] = [0.0],  # noqa: B006
        tag="x",
    ):
        raise AssertionError("not called")

    register_solver("newton", newton)
    schema = solver_schema("newton")
    own = {f.name: f for f in fields(schema)}
    assert schema.__name__ == "NewtonSolverConfig" and issubclass(schema, SolverConfig)
    assert own["restart"].default is MISSING and own["restart"].type is int
    assert (own["damping"].type, own["damping"].default) == (float | None, 0.5)
    assert own["shifts"].type is Any and own["tag"].type is Any
    cfg = SolverConfig(name="newton", restart=3)
    assert (
        type(cfg) is schema
        and cfg.shifts == [0.0]
        and cfg.shifts is not newton.__kwdefaults__["shifts"]
    )
    assert cfg.solver_kwargs() == {"restart": 3, "damping": 0.5, "shifts": [0.0], "tag": "x"}
    with pytest.raises(TypeError, match="restart"):
        SolverConfig(name="newton")
    with pytest.raises(ValueError, match=r"solver\.m=3: solver 'newton' takes no m"):
        SolverConfig(name="newton", restart=3, m=3)
    with pytest.raises(TypeError, match="keyword arguments"):
        SolverConfig("newton")
    assert schema(restart=1).name == "newton"  # the class names its solver
    with pytest.raises(ValueError, match=r"^NewtonSolverConfig is another solver's settings class"):
        schema(name="anderson", restart=1)


def test_a_gradient_mode_says_which_settings_it_does_not_read():
    """grad=phantom with ift's backward settings (an experiment's recipe, or a sweep over
    modes) runs, and says those settings have no effect; settings a mode reads say nothing."""
    import warnings

    from deqlab.grad import GradConfig, UnreadSettingWarning

    with pytest.warns(UnreadSettingWarning) as seen:
        GradConfig(name="phantom", solver="broyden", max_iter=8)
    assert str(seen[0].message) == (
        "grad=phantom does not read solver='broyden', max_iter=8 (it reads steps, tau, sup_gap, "
        "sup_loc and name, mem_gc, options): those settings have no effect"
    )
    with pytest.warns(
        UnreadSettingWarning, match=r"grad=onestep does not read steps=3 \(it reads name"
    ):
        GradConfig(name="onestep", steps=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        GradConfig(name="ift", max_iter=8, steps=2, sup_gap=1, mem_gc=True)
        GradConfig(name="phantom", steps=2, tau=0.3)


def test_solver_settings_refusals_and_conversions_in_full(restore_registries):
    """The messages of SolverConfig's refusals word for word, and what from_mapping makes of
    a composed config: plain dicts, a legacy option merged into fallback_options beside the
    ones given, the caller's name for the config in its errors."""
    from omegaconf import OmegaConf

    from deqlab import register_solver
    from deqlab.solvers.solver_config import solver_schema

    cases = [
        (
            dict(name="broyden", ls=True, check_every=2),
            "solver.ls reads its Armijo test back at every trial: set solver.check_every=1 and "
            "solver.capture=false, or solver.ls=false",
        ),
        (
            dict(name="broyden", ls=True, capture=True, check_every=1),
            "solver.ls reads its Armijo test back at every trial: set solver.check_every=1 and "
            "solver.capture=false, or solver.ls=false",
        ),
        (
            dict(fallback=["broyden"], fallback_options={"fixed_point": {"tau": 0.5}}),
            "solver.fallback_options names ['fixed_point'], which solver.fallback=['broyden'] "
            "does not list",
        ),
        (
            dict(memory=3),  # no name: Anderson's settings
            "solver.memory=3: solver 'anderson' takes no memory (its options: check_every, lam, "
            "lam_mode, m, return_final, tau); memory is an option of broyden (a fallback's "
            "options go in solver.fallback_options.<name>)",
        ),
        (
            dict(name="broyden", tau=0.5),
            "solver.tau=0.5: solver 'broyden' takes no tau (its options: check_every, "
            "keep_inverse, ls, memory, return_final); tau is an option of anderson, fixed_point "
            "(a fallback's "
            "options go in solver.fallback_options.<name>)",
        ),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError) as e:
            SolverConfig(**kwargs)
        assert str(e.value) == message
    SolverConfig(name="broyden", ls=True)  # every step tested: the line search may run

    node = OmegaConf.create(
        {
            "name": "anderson",
            "options": {},
            "fallback": ["broyden"],
            "fallback_options": {"broyden": {"ls": True}},
            "memory": 12,  # the flat schema's way to reach the fallback
        }
    )
    cfg = SolverConfig.from_mapping(node)
    assert type(cfg.options) is dict and type(cfg.fallback_options) is dict
    assert cfg.fallback_options == {"broyden": {"ls": True, "memory": 12}}
    with pytest.raises(ValueError, match=r"^unknown grad\.solver key 'mm'; valid keys: name"):
        SolverConfig.from_mapping({"name": "broyden", "mm": None}, "grad.solver")

    def newton(f, z0, *, max_iter, tol, stop_mode="rel", save_at=(), shifts=[[0.0]]):  # noqa: B006
        raise AssertionError("not called")

    register_solver("my_pkg.Solvers:newton-krylov", newton)
    schema = solver_schema("my_pkg.Solvers:newton-krylov")
    assert schema.__name__ == "MyPkgSolversNewtonKrylovSolverConfig"
    assert schema.__module__ == "deqlab.solvers.solver_config"
    assert schema.__doc__ == "The 'my_pkg.Solvers:newton-krylov' solver's settings."
    cfg = schema()
    assert cfg.shifts == [[0.0]] and cfg.shifts[0] is not newton.__kwdefaults__["shifts"][0]
