"""Jacobian penalty, spectral radius and fixed-point correction against exact values."""

from __future__ import annotations

import pytest
import torch

from deqlab import fp_correction, jacobian_loss, spectral_radius

from .helpers.problems import contraction


def test_jacobian_loss_matches_frobenius_norm_of_a_linear_map():
    w = torch.randn(8, 8, dtype=torch.float64)
    z = torch.randn(4, 8, dtype=torch.float64, requires_grad=True)
    est = jacobian_loss(z @ w.T, z, vecs=4000)
    exact = (w**2).sum() / 8
    assert abs(est.item() - exact.item()) / exact.item() < 0.05


def test_jacobian_loss_draws_one_probe_in_the_states_precision():
    """One probe by default, drawn in the state's dtype: with the same seed the estimate is
    ||v^T W||^2 / numel for that probe, in float64."""
    w = torch.randn(5, 5, dtype=torch.float64)
    z = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    torch.manual_seed(7)
    est = jacobian_loss(z @ w.T, z)
    torch.manual_seed(7)
    v = torch.randn(3, 5, dtype=torch.float64)
    assert est.dtype == torch.float64
    torch.testing.assert_close(est, (v @ w).pow(2).sum() / 15, rtol=1e-14, atol=0)


def test_jacobian_loss_needs_a_recorded_pair():
    z = torch.randn(2, 3)
    with pytest.raises(ValueError) as e:
        jacobian_loss(z * 2, z)
    assert str(e.value) == ("jacobian_loss needs z to require grad and fz = f(z) recorded from it")


def test_jacobian_loss_of_a_single_sample_with_a_multiscale_state():
    """||J||_F^2 / dim of f(a, b) = (2a, 3b) is (4 * 6 + 9 * 2) / 8 for one sample whose
    parts have 6 and 2 entries, whatever the probes (Hutchinson is exact here in
    expectation; many probes bring it close)."""
    a = torch.randn(1, 2, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(1, 2, dtype=torch.float64, requires_grad=True)
    torch.manual_seed(0)
    loss = jacobian_loss((2 * a, 3 * b), (a, b), vecs=4000)
    assert abs(loss.item() - (4 * 6 + 9 * 2) / 8) < 0.15


def test_spectral_radius_of_a_symmetric_map_per_sample():
    a = torch.randn(6, 6, dtype=torch.float64)
    w = (a + a.T) / 2
    scales = torch.tensor([0.5, 2.0], dtype=torch.float64)
    z = torch.randn(2, 6, dtype=torch.float64)
    rho = spectral_radius(lambda z: (z @ w.T) * scales[:, None], z, iters=300)
    expected = torch.linalg.eigvalsh(w).abs().max() * scales
    torch.testing.assert_close(rho, expected, rtol=1e-6, atol=0)


def test_spectral_radius_tuple_state():
    w = contraction(4, 0.7)
    z = (torch.randn(3, 2, dtype=torch.float64), torch.randn(3, 2, dtype=torch.float64))

    def f(z):
        out = torch.cat(z, 1) @ w.T
        return out[:, :2], out[:, 2:]

    rho = spectral_radius(f, z, iters=500)
    exact = torch.linalg.eigvals(w).abs().max().item()
    assert torch.allclose(rho, torch.full((3,), exact, dtype=torch.float64), rtol=1e-3)


@pytest.mark.parametrize(
    "weight,gamma,expected",
    [
        ("const", None, [1.0, 1.0, 1.0]),
        ("linear", 0.5, [1 - 2 / 3 * 0.5, 1 - 1 / 3 * 0.5, 1.0]),
        ("linear", None, [1 - 2 / 3 * 0.9, 1 - 1 / 3 * 0.9, 1.0]),  # TorchDEQ's default 0.9
        ("exp", 0.5, [0.25, 0.5, 1.0]),
        ("exp", None, [0.64, 0.8, 1.0]),  # TorchDEQ's default 0.8
    ],
)
def test_fp_correction_weights(weight, gamma, expected):
    """TorchDEQ's weights, unnormalized by default; normalize=True divides by their sum."""
    states = [torch.tensor(float(i)) for i in (1, 10, 100)]
    crit = lambda s, t: s - t
    loss = fp_correction(crit, states, torch.tensor(0.0), weight=weight, gamma=gamma)
    want = sum(e * s for e, s in zip(expected, (1, 10, 100)))
    assert abs(loss.item() - want) < 1e-5
    mean = fp_correction(crit, states, torch.tensor(0.0), weight, gamma, normalize=True)
    assert abs(mean.item() - want / sum(expected)) < 1e-5
    with pytest.raises(ValueError, match="weight"):
        fp_correction(lambda s, t: s, states, torch.tensor(0.0), weight="square")


def test_fp_correction_defaults_bias_and_a_single_state():
    """exp weights by default; linear's bias is added to every weight; one state is the plain
    criterion; no state is refused."""
    states = [torch.tensor(float(i)) for i in (1, 10, 100)]
    crit = lambda s, t: s - t
    zero = torch.tensor(0.0)
    assert fp_correction(crit, states, zero).item() == pytest.approx(0.64 + 8 + 100)
    biased = fp_correction(crit, states, zero, weight="linear", gamma=0.5, bias=0.25)
    want = sum((1 - (2 - i) / 3 * 0.5 + 0.25) * s for i, s in enumerate((1, 10, 100)))
    assert biased.item() == pytest.approx(want)
    assert fp_correction(crit, states[:1], zero).item() == 1.0
    with pytest.raises(ValueError, match=r"^fp_correction needs at least one state$"):
        fp_correction(crit, [], zero)


@pytest.mark.parametrize("weight", ["exp", "linear"])
def test_fp_correction_matches_torchdeq(weight):
    td_loss = pytest.importorskip("torchdeq.loss")
    states = [torch.randn(4, 3) for _ in range(4)]
    target = torch.randn(4, 3)
    crit = lambda s, t: ((s - t) ** 2).mean()
    ours = fp_correction(crit, states, target, weight=weight)
    theirs = td_loss.fp_correction(crit, (states, target), weight_func=weight)
    torch.testing.assert_close(ours, theirs)
