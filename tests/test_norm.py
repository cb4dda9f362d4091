"""Weight / spectral normalization through torch.nn.utils.parametrize."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from deqlab import DEQ, apply_norm, remove_norm
from deqlab.norm import WeightNorm

from .helpers.problems import ConvCell


class MyConv(nn.Conv2d):
    pass


def test_weight_norm_keeps_function_and_reaches_every_layer():
    model = nn.Sequential(nn.Linear(4, 5), MyConv(2, 3, 3), nn.ConvTranspose2d(3, 2, 3), nn.ReLU())
    before = [m.weight.detach().clone() for m in model if hasattr(m, "weight")]
    apply_norm(model, "weight_norm")
    for m, w in zip([m for m in model if hasattr(m, "weight")], before):
        assert parametrize.is_parametrized(m, "weight")
        torch.testing.assert_close(m.weight, w)


def test_weight_norm_of_a_transposed_conv_is_per_output_channel():
    """ConvTranspose stores its weight as (in, out, kh, kw): the output channel is dim 1, so
    the scale has one entry per output channel and sets that channel's weight norm."""
    layer = apply_norm(nn.ConvTranspose2d(3, 5, 3), "weight_norm")
    p = layer.parametrizations.weight[0]
    assert p.scale.shape == (1, 5, 1, 1)
    with torch.no_grad():
        p.scale.copy_(torch.arange(1.0, 6.0).reshape(1, 5, 1, 1))
    norms = layer.weight.detach().transpose(0, 1).flatten(1).norm(dim=1)
    torch.testing.assert_close(norms, torch.arange(1.0, 6.0))


def test_spectral_norm_of_a_float64_layer_estimates_in_float64():
    """The power iteration's vectors take the weight's dtype, so a float64 layer is
    normalized to float64 accuracy."""
    lin = nn.Linear(12, 7).double()
    apply_norm(lin, "spectral_norm", power_iters=200)
    p = lin.parametrizations.weight[0]
    assert p.u.dtype == p.v.dtype == torch.float64
    _ = lin.weight  # one training-mode access: 200 more power steps
    sigma = torch.linalg.matrix_norm(lin.weight.detach(), 2)
    assert abs(sigma.item() - 1.0) < 1e-10


def test_weight_norm_scale_is_learnable_or_fixed():
    lin = apply_norm(nn.Linear(6, 3), "weight_norm")
    p = lin.parametrizations.weight[0]
    assert isinstance(p.scale, nn.Parameter)
    lin.weight.sum().backward()
    assert p.scale.grad is not None
    fixed = apply_norm(nn.Linear(6, 3), "weight_norm", learn_scale=False)
    assert not any("scale" in n for n, _ in fixed.named_parameters())


def row_norms(w):
    return w.norm(dim=1)


def operator_norm(w):
    return torch.linalg.matrix_norm(w, 2).reshape(1)


@pytest.mark.parametrize(
    "kind,norm", [("weight_norm", row_norms), ("spectral_norm", operator_norm)]
)
def test_torchdeqs_no_scale_target_norm_and_clip(kind, norm):
    """TorchDEQ's meaning: no_scale fixes the norm at target_norm; clip caps s / n(V)."""
    lin = apply_norm(nn.Linear(20, 8), kind, no_scale=True, target_norm=0.5, power_iters=50)
    got = norm(lin.weight.detach())
    torch.testing.assert_close(got, torch.full_like(got, 0.5), rtol=1e-3, atol=1e-4)
    assert not any("scale" in n for n, _ in lin.named_parameters())
    # clip: the factor s / n(V) = 3 / n(V) is capped at 0.01, so n(W) = 0.01 n(V)
    big = apply_norm(
        nn.Linear(20, 8),
        kind,
        no_scale=True,
        target_norm=3.0,
        clip=True,
        clip_value=0.01,
        power_iters=50,
    )
    v = big.parametrizations.weight.original.detach()
    torch.testing.assert_close(norm(big.weight.detach()), 0.01 * norm(v), rtol=1e-3, atol=1e-6)


def test_spectral_norm_bounds_the_operator_norm():
    lin = nn.Linear(20, 30)
    lin.weight.data *= 10
    apply_norm(lin, "spectral_norm", power_iters=5)
    for _ in range(40):  # each training-mode access runs power_iters more steps
        _ = lin.weight
    sigma = torch.linalg.matrix_norm(lin.weight.detach(), 2)
    assert abs(sigma.item() - 1.0) < 1e-3


def test_exclude_and_nothing_to_normalize():
    model = nn.Sequential()
    model.add_module("cell", nn.Linear(3, 3))
    model.add_module("head", nn.Linear(3, 2))
    apply_norm(model, "weight_norm", exclude=["head"])
    assert parametrize.is_parametrized(model.cell) and not parametrize.is_parametrized(model.head)
    with pytest.raises(ValueError, match="no Linear/Conv"):
        apply_norm(nn.ReLU(), "weight_norm")
    with pytest.raises(ValueError, match="unknown norm kind"):
        apply_norm(nn.Linear(2, 2), "batch_norm")
    with pytest.raises(ValueError, match="already has"):
        apply_norm(model, "weight_norm")


@pytest.mark.parametrize("kind", ["weight_norm", "spectral_norm"])
def test_normalized_weight_computed_once_per_solve(kind, monkeypatch):
    cell = apply_norm(ConvCell(), kind)
    calls = 0
    original = type(cell.conv1.parametrizations.weight[0]).forward

    def counting(self, w):
        nonlocal calls
        calls += 1
        return original(self, w)

    monkeypatch.setattr(type(cell.conv1.parametrizations.weight[0]), "forward", counting)
    x = torch.randn(2, 4, 5, 5)
    deq = DEQ(solver={"max_iter": 15, "tol": 1e-6}, grad={"name": "phantom", "steps": 3})
    z, info = deq(lambda z: cell(z, x), torch.zeros_like(x))
    z.sum().backward()
    # two layers x (one cache for the tape-free solve + one for the recorded steps)
    assert info.nfe > 5 and calls == 4
    assert cell.conv1.parametrizations.weight.original.grad is not None


@pytest.mark.parametrize("kind", ["weight_norm", "spectral_norm"])
def test_remove_norm_bakes_weights(kind):
    cell = apply_norm(ConvCell(), kind)
    cell.eval()
    x = torch.randn(1, 4, 5, 5)
    before = cell(x, x)
    remove_norm(cell)
    assert not parametrize.is_parametrized(cell.conv1)
    torch.testing.assert_close(cell(x, x), before)


def test_weight_norm_gradient_matches_its_closed_form():
    """W = s v / ||v|| per row: dL/dv = s (C - (C . v^) v^) / ||v|| and dL/ds = C . v^ for
    L = <C, W>, v^ = v / ||v||, checked against autograd through the parametrization (a norm
    detached from the graph gets dL/dv wrong) and by gradcheck."""
    torch.manual_seed(0)
    v = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    p = WeightNorm(v.detach(), 0).double()
    with torch.no_grad():
        p.scale.mul_(torch.tensor([[0.5], [2.0], [3.0]], dtype=torch.float64))
    c = torch.randn(3, 4, dtype=torch.float64)
    (p(v) * c).sum().backward()
    n = v.detach().norm(dim=1, keepdim=True)
    unit = v.detach() / n
    want_v = p.scale.detach() * (c - (c * unit).sum(1, keepdim=True) * unit) / n
    torch.testing.assert_close(v.grad, want_v, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(p.scale.grad, (c * unit).sum(1, keepdim=True), rtol=1e-12, atol=0)
    assert torch.autograd.gradcheck(lambda v_: p(v_), (v.detach().requires_grad_(),))


def test_frozen_scale_keeps_the_layers_function_and_its_row_norms():
    """learn_scale=False: the layer computes what it did before normalization, and however V
    is trained, the rows of W keep their initial norms (the scale is a buffer, not trained)."""
    torch.manual_seed(0)
    lin = nn.Linear(6, 3)
    x = torch.randn(5, 6)
    before, norms = lin(x).detach(), lin.weight.detach().norm(dim=1)
    apply_norm(lin, "weight_norm", learn_scale=False)
    torch.testing.assert_close(lin(x), before)
    opt = torch.optim.SGD(lin.parameters(), lr=0.5)
    for _ in range(3):
        opt.zero_grad()
        (lin(x) ** 2).sum().backward()
        opt.step()
    assert not torch.allclose(lin(x), before)  # it trained
    torch.testing.assert_close(lin.weight.detach().norm(dim=1), norms)


@pytest.mark.parametrize("bad", [{"target_norm": 0.0}, {"clip_value": 0.0}, {"target_norm": -1.0}])
def test_scale_bounds_are_checked_one_at_a_time(bad):
    with pytest.raises(ValueError) as e:
        apply_norm(nn.Linear(2, 2), "weight_norm", **bad)
    assert str(e.value) == "norm.target_norm and norm.clip_value must be > 0"


def test_apply_norms_defaults_are_weight_norm_and_the_configs():
    """Behaviour, not signatures: apply_norm without options normalizes as the norm config's
    defaults do (weight norm; the scale, clip and power-iteration settings)."""
    from deqlab.norm import NormConfig

    cfg = NormConfig()
    assert isinstance(apply_norm(nn.Linear(3, 3)).parametrizations.weight[0], WeightNorm)
    x = torch.randn(2, 6)
    cases = [
        ("weight_norm", {"no_scale": True}, ("target_norm",)),
        ("spectral_norm", {"clip": True}, ("clip_value", "power_iters")),
    ]
    for kind, on, defaulted in cases:
        torch.manual_seed(0)
        base = nn.Linear(6, 6)
        with torch.no_grad():
            base.weight.mul_(4.0)  # a spectral norm above the clip value
        a, b = copy.deepcopy(base), copy.deepcopy(base)
        torch.manual_seed(1)
        apply_norm(a, kind, **on)
        torch.manual_seed(1)
        apply_norm(b, kind, **on, **{k: getattr(cfg, k) for k in defaulted})
        for _ in range(3):  # training-mode forwards run the power iteration
            torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)


def test_exclude_is_by_submodule_not_by_name_prefix():
    model = nn.Module()
    model.block = nn.Sequential(nn.Linear(3, 3))
    model.blocks = nn.Sequential(nn.Linear(3, 3))
    apply_norm(model, "weight_norm", exclude=["block"])
    assert not parametrize.is_parametrized(model.block[0])  # block.0: inside `block`
    assert parametrize.is_parametrized(model.blocks[0])  # blocks.0: another submodule


class Halve(nn.Module):
    def forward(self, b):
        return b / 2


def test_other_parametrizations_of_a_layer_are_left_alone():
    """A layer whose bias (not weight) is parametrized is normalized, and baked back."""
    layer = nn.Linear(3, 3)
    parametrize.register_parametrization(layer, "bias", Halve())
    apply_norm(layer, "weight_norm")
    assert isinstance(layer.parametrizations.weight[0], WeightNorm)
    remove_norm(layer)
    assert not parametrize.is_parametrized(layer, "weight")
    assert parametrize.is_parametrized(layer, "bias")
    only_bias = nn.Linear(3, 3)
    parametrize.register_parametrization(only_bias, "bias", Halve())
    remove_norm(only_bias)  # nothing of ours to remove
    assert parametrize.is_parametrized(only_bias, "bias")


@pytest.mark.parametrize("kind", ["weight_norm", "spectral_norm"])
def test_remove_norm_bakes_the_trained_weight_not_the_raw_one(kind):
    """After the scale and V have moved away from their initial values, the baked weight is
    s V / n(V), the layer's current function, not V."""
    layer = apply_norm(nn.Linear(4, 4, bias=False), kind)
    with torch.no_grad():
        layer.parametrizations.weight[0].scale.mul_(3.0)
        layer.parametrizations.weight.original.mul_(0.5)
    layer.eval()
    x = torch.randn(2, 4)
    before = layer(x)
    remove_norm(layer)
    torch.testing.assert_close(layer(x), before)


def test_exclude_takes_fnmatch_patterns():
    """A pattern names submodules as a name does (the module and what lies inside it)."""
    model = nn.Module()
    model.layers = nn.ModuleList(
        nn.ModuleDict({"attn": nn.Linear(3, 3), "ffn": nn.Linear(3, 3)}) for _ in range(2)
    )
    model.head = nn.Linear(3, 2)
    apply_norm(model, "weight_norm", exclude=["layers.*.attn", "hea?"])
    normalized = {n for n, m in model.named_modules() if parametrize.is_parametrized(m)}
    assert normalized == {"layers.0.ffn", "layers.1.ffn"}


def test_registered_module_parameters_are_normalized():
    """register_norm_module reaches parameters that are not a Linear/Conv weight: attention's
    in_proj_weight, per output row (q, k and v units alike); its out_proj is a Linear."""
    from deqlab import register_norm_module
    from deqlab.norm import NORM_MODULES

    torch.manual_seed(0)
    attn = nn.MultiheadAttention(8, 2)
    x = torch.randn(5, 3, 8)
    before = attn(x, x, x)[0]
    saved = dict(NORM_MODULES)
    try:
        register_norm_module(nn.MultiheadAttention, "in_proj_weight")
        apply_norm(attn, "weight_norm")
    finally:
        NORM_MODULES.clear()
        NORM_MODULES.update(saved)
    chain = attn.parametrizations.in_proj_weight
    assert isinstance(chain[0], WeightNorm) and chain[0].scale.shape == (24, 1)
    assert isinstance(attn.out_proj.parametrizations.weight[0], WeightNorm)
    torch.testing.assert_close(attn(x, x, x)[0], before)  # the function at applying it
    with torch.no_grad():
        chain.original.mul_(2.0)  # V scaled: W = s V / ||V|| does not move
    torch.testing.assert_close(attn(x, x, x)[0], before)
    remove_norm(attn)
    assert not parametrize.is_parametrized(attn)
    with pytest.raises(ValueError) as e:
        register_norm_module(nn.Bilinear, ["weight", "bias"], [0])
    assert str(e.value) == (
        "register_norm_module: one dim per parameter name, got names=['weight', 'bias'] and "
        "dims=[0]"
    )


class RowMaxNorm(nn.Module):
    """W = V / max|V| per row: a user's norm kind."""

    def __init__(self, weight, out_dim):
        super().__init__()
        self.out_dim = out_dim

    def forward(self, v):
        dims = [d for d in range(v.dim()) if d != self.out_dim]
        return v / v.abs().amax(dim=dims, keepdim=True)


def test_a_registered_norm_kind_is_applied_and_removed_like_the_built_in_ones():
    from deqlab import register_norm
    from deqlab.norm import NORMS, NormConfig

    register_norm("row_max", lambda w, out_dim, cfg: RowMaxNorm(w, out_dim))
    try:
        conv = apply_norm(nn.Conv2d(2, 3, 3), "row_max")
        assert conv.weight.detach().flatten(1).abs().amax(1).tolist() == [1.0, 1.0, 1.0]
        assert NormConfig(kind="row_max").kind == "row_max"
        remove_norm(conv)
        assert not parametrize.is_parametrized(conv)
    finally:
        NORMS.entries.pop("row_max")
    with pytest.raises(ValueError) as e:
        NormConfig(kind="row_max")
    assert str(e.value).startswith(
        "unknown norm kind 'row_max'; known: inf_ball, spectral_norm, weight_norm"
    )


def test_apply_norms_keyword_defaults_are_the_configs():
    """apply_norm(cell, kind) in Python and norm=<kind> on the command line agree: one set of
    defaults."""
    import dataclasses
    import inspect

    from deqlab.norm import NormConfig

    config = {f.name: f.default for f in dataclasses.fields(NormConfig)}
    keywords = {
        name: p.default
        for name, p in inspect.signature(apply_norm).parameters.items()
        if p.kind is inspect.Parameter.KEYWORD_ONLY and name != "exclude"
    }
    assert keywords == {k: config[k] for k in keywords} and len(keywords) == 6


def test_norm_module_registration_and_an_empty_module_are_refused_by_name():
    from deqlab import register_norm_module
    from deqlab.norm import NORM_MODULES

    layer = nn.Linear(2, 2)
    with pytest.raises(TypeError) as e:
        register_norm_module(layer)  # an instance, not the class
    assert str(e.value) == f"register_norm_module: {layer!r} is not an nn.Module class"
    with pytest.raises(TypeError, match=r"is not an nn\.Module class"):
        register_norm_module(int)
    saved = dict(NORM_MODULES)
    try:
        register_norm_module(nn.Bilinear)  # its `weight`, output units first
        assert NORM_MODULES[nn.Bilinear] == (("weight",), (0,))
    finally:
        NORM_MODULES.clear()
        NORM_MODULES.update(saved)
    with pytest.raises(ValueError) as e:
        apply_norm(nn.Sequential(nn.ReLU()), "spectral_norm")
    assert str(e.value) == (
        "apply_norm('spectral_norm') found no Linear/Conv layer to normalize in Sequential "
        "(after exclude=[]; other layers: deqlab.register_norm_module)"
    )
