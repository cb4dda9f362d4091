"""init=learned: the network predicts z0 from its injection (zero at first, so the first solve
is init=zeros'), an auxiliary loss pulls the prediction toward the equilibrium the solve
reached, and networks or states it cannot predict are refused by name."""

from __future__ import annotations

import pytest
import torch

from deqlab.runner.module import DEQLitModule
from deqlab.tasks.cifar.mdeq import MDEQClassifier
from deqlab.tasks.cifar.model import TutorialDEQ


class Classifier(DEQLitModule):
    def criterion(self, output, target):
        return torch.nn.functional.cross_entropy(output, target)

    def update_metrics(self, split, output, target):
        pass


def module(init: dict, net: str = "tutorial") -> Classifier:
    torch.manual_seed(0)
    if net == "tutorial":
        network = TutorialDEQ(channels=8, inner=8, groups=2)
    else:  # a two-branch multiscale state: 32x32 and 16x16
        network = MDEQClassifier(
            channels=(8, 8), head_channels=(4, 8), final_channels=16, expansion=2, groups=2
        )
    solver = {"name": "anderson", "max_iter": 30, "tol": 1e-4}
    return Classifier(network, solver=solver, init=init)


@pytest.mark.parametrize("net,size,lr", [("tutorial", 32, 1e-2), ("mdeq", 16, 3e-2)])
def test_the_prediction_starts_at_zero_and_learns_toward_the_equilibrium(net, size, lr):
    x = torch.randn(4, 3, size, size)
    learned = module({"name": "learned", "weight": 1.0}, net)
    zeros = module({"name": "zeros"}, net)
    learned.train(), zeros.train()
    # the predictor is zero at first: the same start, the same solve
    (out_l,), info_l = learned(x)
    (out_z,), info_z = zeros(x)
    torch.testing.assert_close(out_l, out_z)
    assert info_l.nfe == info_z.nfe and learned.init_loss is not None
    # the auxiliary loss trains the predictor alone toward z*: its distance falls
    start = learned.net.start
    optimizer = torch.optim.Adam(start.parameters(), lr=lr)
    losses = []
    for _ in range(30):
        learned(x)
        loss = learned.init_loss
        losses.append(float(loss.detach()))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert losses[-1] < 0.5 * losses[0]
    with torch.no_grad():
        learned.eval(), zeros.eval()
        ours, theirs = learned(x)[1], zeros(x)[1]
    if net == "tutorial":  # the solve from the prediction needs fewer steps to its tolerance
        assert ours.nfe < theirs.nfe
    else:  # this tiny multiscale cell runs to its budget: it ends closer to z*
        assert ours.nfe == theirs.nfe
        assert ours.rel_residual.mean() < 0.8 * theirs.rel_residual.mean()


def test_the_deq_transformer_predicts_each_positions_state():
    """The language model's start: a linear map of each position's injection, zero at first
    (the first solve is init=zeros'), learning toward z* until the solve from it needs fewer
    steps."""
    from deqlab.tasks.lm.module import LMModule

    from .test_lm import tiny_lm

    def lm(init: dict) -> LMModule:
        solver = {"name": "anderson", "max_iter": 40, "tol": 1e-4}
        return LMModule(tiny_lm(), mem_len=0, solver=solver, init=init)

    x = torch.randint(0, 50, (4, 12), generator=torch.Generator().manual_seed(0))
    learned, zeros = lm({"name": "learned", "weight": 1.0}), lm({"name": "zeros"})
    (out_l,), info_l = learned(x)
    (out_z,), info_z = zeros(x)
    torch.testing.assert_close(out_l, out_z)
    assert info_l.nfe == info_z.nfe
    optimizer = torch.optim.Adam(learned.net.start.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        learned(x)
        losses.append(float(learned.init_loss.detach()))
        optimizer.zero_grad()
        learned.init_loss.backward()
        optimizer.step()
    assert losses[-1] < 0.5 * losses[0]
    with torch.no_grad():
        learned.eval(), zeros.eval()
        assert learned(x)[1].nfe < zeros(x)[1].nfe


def test_a_network_that_cannot_predict_its_state_is_refused_by_name():
    class Plain(torch.nn.Module):
        cell = torch.nn.Linear(2, 2)

    with pytest.raises(ValueError, match="init=learned: Plain cannot predict its state"):
        Classifier(Plain(), init={"name": "learned"})
    with pytest.raises(ValueError, match=r"init\.weight must be >= 0"):
        Classifier(TutorialDEQ(8, 8, 2), init={"name": "learned", "weight": -1.0})


def test_a_prediction_of_the_wrong_structure_is_refused_by_name():
    learned = module({"name": "learned"}, "mdeq")
    learned.net.predict_start = lambda u: u  # one tensor for a two-part state
    with pytest.raises(
        ValueError, match=r"predict_start gave shapes \[\(4, 8, 32, 32\)\], the state"
    ):
        learned(torch.randn(4, 3, 32, 32))
