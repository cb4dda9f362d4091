"""Variational dropout: one mask per batch, held through the solve."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from deqlab import (
    DEQ,
    VariationalDropout,
    VariationalDropout2d,
    VariationalTokenDropout,
    reset_dropout,
)


def test_mask_is_held_until_reset():
    d = VariationalDropout(0.5)
    x = torch.ones(4, 10)
    a, b = d(x), d(x)
    assert torch.equal(a, b)
    assert set(a.unique().tolist()) <= {0.0, 2.0}
    reset_dropout(nn.Sequential(d))
    assert not torch.equal(d(x), a)


def test_mask_held_through_a_deq_solve():
    drop = VariationalDropout(0.3)
    lin = nn.Linear(8, 8)
    lin.weight.data *= 0.1
    x = torch.randn(3, 8)
    masks = []

    def f(z):
        out = drop(torch.tanh(lin(z) + x))
        masks.append(drop.mask)
        return out

    _z, info = DEQ(grad={"name": "phantom", "steps": 2})(f, torch.zeros_like(x))
    assert info.nfe > 2 and all(m is masks[0] for m in masks)


def test_shared_dims_and_eval():
    d2 = VariationalDropout2d(0.5)
    y = d2(torch.ones(2, 6, 4, 4))
    assert d2.mask.shape == (2, 6, 1, 1)
    assert torch.equal(y, y[:, :, :1, :1].expand_as(y))
    tok = VariationalTokenDropout(0.5)
    tok(torch.ones(2, 7, 3))
    assert tok.mask.shape == (2, 7, 1)
    d2.eval()
    x = torch.randn(2, 6, 4, 4)
    assert d2(x) is x
    with pytest.raises(ValueError, match=r"^VariationalDropout2d shares its mask over dim 3"):
        VariationalDropout2d(0.5)(torch.ones(2, 3, 4))
    with pytest.raises(ValueError, match="probability"):
        VariationalDropout(1.0)


def test_p_zero_is_the_identity_and_draws_no_random_numbers():
    """A training-mode layer with p == 0 (the default) returns its input itself: no mask, no
    draw from the generator, so adding such a layer leaves a seeded run unchanged."""
    d = VariationalDropout()
    assert d.training and d.p == 0
    x = torch.randn(3, 5)
    before = torch.get_rng_state()
    assert d(x) is x and d.mask is None
    assert torch.equal(torch.get_rng_state(), before)


def test_mask_follows_input_dtype_and_shape():
    d = VariationalDropout(0.5)
    d(torch.ones(2, 3))
    d(torch.ones(2, 3, dtype=torch.float64))
    assert d.mask.dtype == torch.float64
    d(torch.ones(5, 3, dtype=torch.float64))  # a smaller/larger batch draws a new mask
    assert d.mask.shape == (5, 3)


@pytest.mark.requires_cuda
def test_mask_on_the_inputs_device():
    d = VariationalDropout(0.5).cuda()
    d(torch.ones(2, 3, device="cuda"))
    assert d.mask.device.type == "cuda"


def test_reset_redraws_each_kept_mask_in_place():
    """A solve replayed from CUDA graphs reads a mask at its address: a new batch's mask is
    drawn into the same storage, one per kind of input, with the values a fresh draw gives."""
    d = VariationalDropout2d(0.5)
    d(torch.ones(4, 8, 3, 3))
    d(torch.ones(2, 8, 3, 3))  # a smaller last batch keeps a mask of its own
    kept = {kind: (m.data_ptr(), m.clone()) for kind, m in d.masks.items()}
    torch.manual_seed(3)
    reset_dropout(d)
    assert len(d.masks) == 2
    for kind, m in d.masks.items():
        assert m.data_ptr() == kept[kind][0] and not torch.equal(m, kept[kind][1])
    torch.manual_seed(3)
    fresh = [torch.empty(kind[0]).bernoulli_(0.5) / 0.5 for kind in d.masks]
    assert all(torch.equal(a, b) for a, b in zip(d.masks.values(), fresh))


def test_masks_follow_the_layer_and_their_kinds_travel_in_a_checkpoint():
    from deqlab.dropout import mask_kinds, restore_mask_kinds

    net = nn.Sequential(nn.Linear(3, 3), VariationalDropout(0.5), VariationalTokenDropout(0.3))
    net[1](torch.ones(2, 3))
    net[2](torch.ones(2, 5, 3))
    net[2](torch.ones(1, 5, 3))
    before = net[1].mask.clone()
    net.double()
    ((kind, mask),) = net[1].masks.items()
    assert kind[1] == torch.float64 and torch.equal(mask, before.double())
    kinds = mask_kinds(net)
    assert kinds == {
        "1": [([2, 3], "float64")],
        "2": [([2, 5, 1], "float64"), ([1, 5, 1], "float64")],
    }
    other = nn.Sequential(nn.Linear(3, 3), VariationalDropout(0.5), VariationalTokenDropout(0.3))
    restore_mask_kinds(other, kinds)
    assert mask_kinds(other) == kinds  # the same kinds, in the same order
    torch.manual_seed(0)
    reset_dropout(net)
    torch.manual_seed(0)
    reset_dropout(other)
    for a, b in zip(net.modules(), other.modules()):
        if isinstance(a, VariationalDropout):
            assert all(torch.equal(x, y) for x, y in zip(a.masks.values(), b.masks.values()))
