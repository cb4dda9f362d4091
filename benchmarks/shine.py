"""SHINE against the exact implicit gradient on a published CIFAR model: the parameter
gradient's relative error and cosine, and the backward pass's seconds.

The model as its experiment file builds it (``cifar_tutorial``; untrained, a batch of 32
random CIFAR-sized images), with a Broyden forward solve at the experiment's budget,
tolerance and stop rule, so that SHINE has its inverse estimate (the tutorial's own solver is
Anderson: ``solver=broyden`` keeps its budget). The reference gradient is ift's with an
Anderson backward solve to 1e-8; measured beside it: the experiment's own backward, SHINE with
1, 3 and 10 backward steps (its estimate, then fixed-point refinement), and the Jacobian-free
gradient.

``cifar_mdeq_small`` is not measured: untrained, its equilibrium does not exist to measure
against (after its 19 Broyden steps the relative residual is 0.26, and no backward solve
converges: GMRES ends at 0.37 after 200 steps), so every gradient's "error" would be noise.
It needs a trained checkpoint.
"""

from __future__ import annotations

import time
import warnings
from typing import Any

import torch
import torch.nn.functional as F

EXPERIMENTS = {"cifar_tutorial": ["solver=broyden"]}
EXACT = "exact (ift, anderson to 1e-8)"
PLAIN = ["grad.solver_options={}", "grad.jacobian_at=z"]  # not the experiment's solver's
EXACT_IFT = ["grad=ift", "grad.solver=anderson", "grad.max_iter=200", "grad.tol=1e-8"]
SHINE = ["grad=shine", "grad.solver=fixed_point", "grad.tol=null", *PLAIN]
GRADS = {
    EXACT: [*EXACT_IFT, "grad.stop_mode=rel", *PLAIN],
    "the experiment's own backward": [],
    "shine, estimate only": [*SHINE, "grad.max_iter=1"],
    "shine + 2 steps": [*SHINE, "grad.max_iter=3"],
    "shine + 9 steps": [*SHINE, "grad.max_iter=10"],
    "jacobian-free (onestep)": ["grad=onestep"],
}


def shine(device: torch.device, repeats: int = 3) -> list[dict[str, Any]]:
    import hydra.utils

    from deqlab.runner.config import compose

    rows = []
    for experiment, solver in EXPERIMENTS.items():
        torch.manual_seed(0)
        images = torch.randn(32, 3, 32, 32, device=device)
        labels = torch.randint(0, 10, (32,), device=device)

        def step(module: Any) -> tuple[torch.Tensor, float, int]:
            outputs, info = module(images)
            loss = F.cross_entropy(outputs[-1], labels)
            params = [p for p in module.parameters() if p.requires_grad]
            start = time.perf_counter()
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            seconds = time.perf_counter() - start
            flat = [g.flatten() for g in grads if g is not None]
            return torch.cat(flat), seconds, info.backward[0].nfe if info.backward else 0

        def build(overrides: list[str]) -> Any:
            base = [f"experiment={experiment}", *solver, "task.module.fit.pretrain_steps=0"]
            cfg = compose([*base, *overrides], "/tmp/deqlab-bench")
            torch.manual_seed(0)  # the same weights for every gradient
            with warnings.catch_warnings():  # onestep reads none of the backward settings
                warnings.simplefilter("ignore")
                return hydra.utils.instantiate(cfg.task.module).to(device).train()

        exact = step(build(GRADS[EXACT]))[0]
        for name, overrides in GRADS.items():
            module = build(overrides)
            runs = [step(module) for _ in range(repeats + 1)][1:]  # the first warms up
            g, _, nfe = runs[0]
            rows.append(
                {
                    "bench": "shine",
                    "model": experiment,
                    "gradient": name,
                    "rel_error": round(float((g - exact).norm() / exact.norm()), 4),
                    "cosine": round(float(F.cosine_similarity(g, exact, dim=0)), 5),
                    "backward_nfe": nfe,
                    "backward_s": round(sorted(r[1] for r in runs)[len(runs) // 2], 4),
                }
            )
    return rows
