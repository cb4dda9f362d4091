"""init=learned: the network predicts z0 from its injection (zero at first, so the first solve
is init=zeros'), an auxiliary loss pulls the prediction toward the equilibrium the solve
reached, and networks or states it cannot predict are refused by name."""

from __future__ import annotations

import pytest
import torch

from deqlab.runner.module import DEQLitModule
from deqlab.tasks.cifar.model import TutorialDEQ


class Classifier(DEQLitModule):
    def criterion(self, output, target):
        return torch.nn.functional.cross_entropy(output, target)

    def update_metrics(self, split, output, target):
        pass


def module(init: dict) -> Classifier:
    torch.manual_seed(0)
    net = TutorialDEQ(channels=8, inner=8, groups=2)
    solver = {"name": "anderson", "max_iter": 30, "tol": 1e-4}
    return Classifier(net, solver=solver, init=init)


def test_the_prediction_starts_at_zero_and_learns_toward_the_equilibrium():
    x = torch.randn(4, 3, 32, 32)
    learned, zeros = module({"name": "learned", "weight": 1.0}), module({"name": "zeros"})
    learned.train(), zeros.train()
    # the predictor is zero at first: the same start, the same solve
    (out_l,), info_l = learned(x)
    (out_z,), info_z = zeros(x)
    torch.testing.assert_close(out_l, out_z)
    assert info_l.nfe == info_z.nfe and learned.init_loss is not None
    # the auxiliary loss trains the predictor alone toward z*: its distance falls
    start = learned.net.start
    optimizer = torch.optim.Adam(start.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        learned(x)
        loss = learned.init_loss
        losses.append(float(loss.detach()))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert losses[-1] < 0.5 * losses[0]
    with torch.no_grad():  # the solve from the prediction needs fewer steps to its tolerance
        learned.eval(), zeros.eval()
        assert learned(x)[1].nfe < zeros(x)[1].nfe


def test_a_network_that_cannot_predict_its_state_is_refused_by_name():
    class Plain(torch.nn.Module):
        cell = torch.nn.Linear(2, 2)

    with pytest.raises(ValueError, match="init=learned: Plain cannot predict its state"):
        Classifier(Plain(), init={"name": "learned"})
    with pytest.raises(ValueError, match=r"init\.weight must be >= 0"):
        Classifier(TutorialDEQ(8, 8, 2), init={"name": "learned", "weight": -1.0})
