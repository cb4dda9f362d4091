"""The registries behind solver.name, grad.name and core.name: registration, lazy entries,
import paths and their errors; and a user's gradient mode, from register_grad to the states
a DEQ returns."""

from __future__ import annotations

import pytest
import torch

from deqlab import DEQ, register_grad
from deqlab.grad import GRAD_MODES, GradConfig
from deqlab.registry import Registry, load_object

from .helpers.problems import contraction


def checked_registry() -> tuple[Registry[object], list]:
    seen: list = []
    return Registry(
        "widget", "add one with register_widget", lambda n, o: seen.append((n, o))
    ), seen


def test_register_checks_and_stores_an_entry():
    reg, seen = checked_registry()
    obj = object()
    assert reg.register("w", obj) is obj
    assert seen == [("w", obj)] and reg.get("w") is obj and "w" in reg
    assert "v" not in reg


def test_a_lazy_entry_is_imported_checked_and_kept_on_first_use():
    reg, seen = checked_registry()
    reg.register_lazy("mean", "torch:mean")
    assert "mean" in reg and seen == []  # nothing imported yet
    assert reg.get("mean") is torch.mean and seen == [("mean", torch.mean)]
    assert reg.get("mean") is torch.mean and len(seen) == 1  # kept, checked once
    assert "mean" in reg


def test_an_import_path_is_loaded_checked_and_remembered():
    reg, seen = checked_registry()
    assert "torch.nn:Linear" not in reg
    assert reg.get("torch.nn:Linear") is torch.nn.Linear
    assert reg.get("torch.nn:Linear") is torch.nn.Linear
    assert seen == [("torch.nn:Linear", torch.nn.Linear)]  # checked once
    assert "torch.nn:Linear" in reg


def test_an_unknown_name_lists_the_known_ones_and_says_how_to_add_one():
    reg, _ = checked_registry()
    reg.register("b", 1)
    reg.register_lazy("a", "torch:mean")
    with pytest.raises(ValueError) as err:
        reg.get("c")
    assert str(err.value) == (
        "unknown widget 'c'; known: a, b (add one with register_widget, or name one by import "
        "path, package.module:attribute)"
    )


def test_load_object_walks_dotted_attributes():
    assert load_object("torch.nn:Linear.forward", "x") is torch.nn.Linear.forward


@pytest.mark.parametrize(
    "path,message",
    [
        ("torch.nn", "widget import path 'torch.nn' must read package.module:attribute"),
        (":Linear", "widget import path ':Linear' must read package.module:attribute"),
        ("torch.nn:", "widget import path 'torch.nn:' must read package.module:attribute"),
        ("torch.nn:Nope", "widget 'torch.nn:Nope': module 'torch.nn' has no 'Nope'"),
        ("torch.nn:Linear.nope", "widget 'torch.nn:Linear.nope': module 'torch.nn' has no"),
        ("no_such_module_x:f", "widget 'no_such_module_x:f': cannot import module"),
        ("a:b:c", "widget 'a:b:c': cannot import module 'a'"),
    ],
)
def test_bad_import_paths_are_named(path, message):
    with pytest.raises(ValueError) as err:
        load_object(path, "widget")
    assert str(err.value).startswith(message)


def test_a_registered_grad_mode_gets_its_defaults_options_and_flags(restore_registries):
    """register_grad: the mode's defaults fill the fields a config leaves unset, its options
    reach it, z requires grad only when the mode says so, and a mode valid only at the
    equilibrium leaves the earlier sampled states to phantom."""
    calls = []

    def scaled(f, z, fz, cfg, steps, on_backward):
        calls.append((z.requires_grad, steps, cfg.tau))
        return [fz * cfg.options["scale"]]

    mode = register_grad("test_scaled", scaled, defaults={"steps": 3, "tau": 0.25})
    assert GRAD_MODES.get("test_scaled") is mode and mode.fn is scaled
    assert not mode.needs_z_grad and not mode.at_equilibrium
    cfg = GradConfig(name="test_scaled")
    assert (cfg.steps, cfg.tau) == (3, 0.25)
    assert (GradConfig(name="test_scaled", steps=2, tau=1.0).steps, cfg.tau) == (2, 0.25)

    w = contraction(5, 0.5)
    x = torch.randn(2, 5, dtype=torch.float64)
    f = lambda z: torch.tanh(z @ w.T + x)
    solver = {"name": "fixed_point", "max_iter": 8, "tol": None}
    grad = {"name": "test_scaled", "options": {"scale": 2.0}}
    z, info = DEQ(solver, grad, n_states=2)(f, torch.zeros_like(x))
    assert calls == [(False, 3, 0.25), (False, 3, 0.25)]  # both sampled states
    assert len(info.states) == 2
    torch.testing.assert_close(z, 2.0 * f(info.z))

    calls.clear()
    register_grad("test_scaled_eq", scaled, needs_z_grad=True, at_equilibrium=True)
    grad = {"name": "test_scaled_eq", "options": {"scale": 2.0}}
    DEQ(solver, grad, n_states=2)(f, torch.zeros_like(x))
    assert calls == [(True, 1, 1.0)]  # the earlier state went to phantom
