"""DEQLitModule's shared training logic on a small synthetic task, under a real Trainer."""

from __future__ import annotations

import itertools
import math
from typing import Any

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from deqlab import apply_norm
from deqlab.runner.fit import FitConfig, JacRegConfig
from deqlab.runner.module import DEQLitModule
from deqlab.runner.optim import OptimConfig


class TanhNet(nn.Module):
    """u = A x, f(z; u) = tanh(W z + u), head = linear; counts taped / untaped f calls."""

    def __init__(self, d: int = 8, classes: int = 3):
        super().__init__()
        self.inp = nn.Linear(5, d)
        self.w = nn.Linear(d, d, bias=False)
        self.w.weight.data *= 0.3
        self.out = nn.Linear(d, classes)
        self.calls = {"taped": 0, "solver": 0}

    def inject(self, x):
        u = self.inp(x)
        return u, torch.zeros_like(u)

    def cell(self, z, u):
        self.calls["taped" if torch.is_grad_enabled() else "solver"] += 1
        return torch.tanh(self.w(z) + u)

    def head(self, z):
        return self.out(z)


class Synthetic(DEQLitModule):
    def __init__(self, **kw):
        super().__init__(TanhNet(), **kw)
        self.criterion_calls = 0

    def criterion(self, output, target):
        self.criterion_calls += 1
        return F.cross_entropy(output, target)

    def update_metrics(self, split, output, target):
        self.log(f"{split}/acc", (output.argmax(1) == target).float().mean())


class Recorder(L.Callback):
    def __init__(self):
        self.rows = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        net = module.net
        self.rows.append(
            {
                "step": trainer.global_step,
                "taped": net.calls["taped"],
                "solver": net.calls["solver"],
                "nfe": [] if outputs["info"] is None else [outputs["info"].nfe],
                "lr": trainer.optimizers[0].param_groups[0]["lr"],
                "jac": outputs["info"] is not None and outputs["info"].jac_loss is not None,
            }
        )
        net.calls.update(taped=0, solver=0)


def fit(
    module: Synthetic,
    steps: int = 6,
    val: bool = False,
    callbacks: tuple[L.Callback, ...] = (),
    dtype: torch.dtype = torch.float32,
    **trainer_options: Any,
) -> tuple[L.Trainer, Recorder]:
    """Train ``module`` for ``steps`` on 48 fixed samples in batches of 8 (validating on them
    after every step with ``val``); ``trainer_options`` override the Trainer's arguments."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(48, 5, generator=g).to(dtype)
    y = torch.randint(0, 3, (48,), generator=g)
    loader = DataLoader(TensorDataset(x, y), batch_size=8)
    rec = Recorder()
    options: dict[str, Any] = {
        "max_steps": steps,
        "accelerator": "cpu",
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "limit_val_batches": 2 if val else 0,
        "val_check_interval": 1 if val else None,
        "num_sanity_val_steps": 0,
        "inference_mode": False,
        "callbacks": [rec, *callbacks],
    }
    trainer = L.Trainer(**{**options, **trainer_options})
    trainer.fit(module, loader, loader if val else None)
    return trainer, rec


def test_unrolled_pretraining_then_deq():
    module = Synthetic(
        fit={"pretrain_steps": 2, "pretrain_unroll": 3}, solver={"max_iter": 5, "tol": None}
    )
    _, rec = fit(module, steps=4)
    assert [(r["taped"], r["solver"]) for r in rec.rows[:2]] == [
        (3, 0),
        (3, 0),
    ]  # plain unrolled net
    assert [(r["taped"], r["solver"]) for r in rec.rows[2:]] == [(1, 5), (1, 5)]  # solve + ift step


def test_budget_jitter_is_random_and_reproducible():
    kw = {"fit": {"jitter": 3}, "solver": {"max_iter": 6, "tol": None}}
    _, a = fit(Synthetic(**kw), steps=6)
    _, b = fit(Synthetic(**kw), steps=6)
    budgets = [r["nfe"][0] for r in a.rows]
    assert all(3 <= n <= 9 for n in budgets) and len(set(budgets)) > 1
    assert budgets == [r["nfe"][0] for r in b.rows]


def test_budget_jitter_ranges_and_jacobian_steps_only():
    """[low, high] draws from max_iter + low .. max_iter + high (the references' one-sided
    ranges); jitter_on=jac_steps leaves the steps without the Jacobian loss at max_iter."""
    below = {"fit": {"jitter": [-2, 0]}, "solver": {"max_iter": 6, "tol": None}}
    _, rec = fit(Synthetic(**below), steps=12)
    assert {r["nfe"][0] for r in rec.rows} == {4, 5, 6}
    jac = {
        "fit": {"jitter": [-2, 1], "jitter_on": "jac_steps"},
        "solver": {"max_iter": 6, "tol": None},
        "jac_reg": {"name": "hutchinson", "weight": 1.0, "freq": 0.5},
    }
    _, rec = fit(Synthetic(**jac), steps=16)
    plain = {r["nfe"][0] for r in rec.rows if not r["jac"]}
    jittered = {r["nfe"][0] for r in rec.rows if r["jac"]}
    assert plain == {6} and jittered <= {4, 5, 6, 7} and len(jittered) > 1
    with pytest.raises(ValueError, match="low <= high"):
        FitConfig(jitter=[1, -1])


def test_fixed_point_correction_reads_every_sampled_state():
    module = Synthetic(core={"n_states": 3}, solver={"max_iter": 6, "tol": None})
    fit(module, steps=2)
    assert module.criterion_calls == 2 * 3


def test_jacobian_regularization_schedule():
    cfg = JacRegConfig(name="hutchinson", weight=0.5, incremental=10, increment=0.1, stop_epoch=3)
    assert cfg.weight_at(0, 0) == 0.5 and cfg.weight_at(25, 1) == pytest.approx(0.7)
    assert cfg.weight_at(25, 3) == 0.0
    assert JacRegConfig(name="none", weight=1.0).weight_at(0, 0) == 0.0
    # no penalty during unrolled pre-training; then the two references' ways of counting:
    # DEQ-Sequence adds 0.1 at every multiple of `incremental` past pre-training (at 10, 20
    # here), MDEQ-Vision every `incremental` steps from the DEQ phase's start (at 17, 27)
    assert cfg.weight_at(6, 0, pretrain_steps=7) == 0.0
    start = [cfg.weight_at(t, 0, 7) for t in (7, 9, 10, 19, 20)]
    assert start == pytest.approx([0.5, 0.5, 0.6, 0.6, 0.7])
    deq = JacRegConfig(name="hutchinson", weight=0.5, incremental=10, incremental_from="deq")
    assert [deq.weight_at(t, 0, 7) for t in (7, 16, 17, 27)] == pytest.approx([0.5, 0.5, 0.6, 0.7])
    with pytest.raises(ValueError, match="probability"):
        JacRegConfig(name="hutchinson", freq=2.0)


def test_jacobian_regularization_runs_on_a_share_of_steps():
    module = Synthetic(jac_reg={"name": "hutchinson", "weight": 1.0, "freq": 0.5})
    _, rec = fit(module, steps=8)
    hits = sum(r["jac"] for r in rec.rows)
    assert 0 < hits < 8


def test_spectral_radius_and_validation_statistics():
    module = Synthetic(fit={"sradius_iters": 10})
    # step metrics are logged at the steps the loggers write (deqlab.runner.step_log)
    trainer, _ = fit(module, steps=2, val=True, log_every_n_steps=1)
    m = trainer.callback_metrics
    assert 0 < float(m["deq/sradius"]) < 1  # ||W|| is small: a contraction
    assert "deq/val_fwd_nfe" in m and "deq/fwd_nfe" in m and "deq/bwd_nfe" in m


def test_warmup_then_cosine_to_min_lr():
    adam = {"_target_": "torch.optim.Adam", "_partial_": True, "lr": 0.1}
    module = Synthetic(optim={"optimizer": adam, "warmup_steps": 2, "min_lr": 0.01})
    _, rec = fit(module, steps=6)
    lrs = [r["lr"] for r in rec.rows]  # after each step's scheduler update
    assert lrs[0] == pytest.approx(0.1)  # warmup 0.05 -> 0.1
    assert all(a >= b for a, b in itertools.pairwise(lrs[1:]))
    assert lrs[-1] == pytest.approx(0.01)


def test_cosine_over_all_steps_as_the_deq_sequence_reference():
    """anneal_over=all: after the warmup the rate is the cosine of the absolute step over the
    whole run, lr (1 + cos(pi t / T)) / 2 (train_transformer.py: scheduler.step(train_step)
    on CosineAnnealingLR(optimizer, max_step)), not a cosine restarted after the warmup."""
    net = nn.Linear(2, 2)
    adam = {"_target_": "torch.optim.Adam", "_partial_": True, "lr": 1.0}
    opt, sched = OptimConfig(optimizer=adam, warmup_steps=4, anneal_over="all").build(net, 20)
    lrs = []
    for _ in range(20):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    for t in range(4, 20):
        assert lrs[t] == pytest.approx((1 + math.cos(math.pi * t / 20)) / 2)
    with pytest.raises(ValueError, match="anneal_over"):
        OptimConfig(anneal_over="some")


def test_bad_training_settings_are_named():
    with pytest.raises(ValueError, match="pretrain_unroll"):
        Synthetic(fit={"pretrain_steps": 5})
    with pytest.raises(ValueError, match="unknown fit key 'jiter'"):
        Synthetic(fit={"jiter": 2})
    with pytest.raises(ValueError, match=r"optim\.optimizer needs a _target_"):
        Synthetic(optim={"optimizer": {"lr": 0.1}})


def test_no_weight_decay_on_biases_norms_and_scales():
    from deqlab.runner.optim import parameter_groups

    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.GroupNorm(2, 4), nn.Linear(4, 2), nn.Embedding(5, 4))
    apply_norm(net[2], "weight_norm")
    decay, no_decay = parameter_groups(net, decay_all=False)
    names = {id(p): n for n, p in net.named_parameters()}
    assert sorted(names[id(p)] for p in decay["params"]) == [
        "0.weight",
        "2.parametrizations.weight.original",
        "3.weight",
    ]
    assert sorted(names[id(p)] for p in no_decay["params"]) == [
        "0.bias",
        "1.bias",
        "1.weight",
        "2.bias",
        "2.parametrizations.weight.0.scale",
    ]
    assert no_decay["weight_decay"] == 0.0
    (everything,) = parameter_groups(net, decay_all=True)
    assert len(everything["params"]) == len(names)
    sgd = {"_target_": "torch.optim.SGD", "_partial_": True, "lr": 0.1, "weight_decay": 0.5}
    opt, _ = OptimConfig(optimizer=sgd).build(net, 10)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.5, 0.0]


def test_mem_gc_recomputes_the_unrolled_pretraining_in_backward():
    """grad.mem_gc checkpoints the pre-training's unrolled cell: each of its 3 taped calls
    runs again in backward, and training takes the same steps."""
    weights = []
    for gc in (False, True):
        torch.manual_seed(0)
        module = Synthetic(
            fit={"pretrain_steps": 2, "pretrain_unroll": 3},
            solver={"max_iter": 5, "tol": None},
            grad={"name": "ift", "mem_gc": gc},
        )
        _, rec = fit(module, steps=2)
        assert [r["taped"] for r in rec.rows] == ([6, 6] if gc else [3, 3])
        weights.append(module.net.w.weight.detach().clone())
    torch.testing.assert_close(weights[0], weights[1], rtol=1e-6, atol=0)


def test_inverse_square_root_schedule_is_the_deq_sequence_references():
    """schedule=inv_sqrt: the rate at step t is lr t / w^1.5 up to warmup w, then lr / sqrt(t)
    (train_transformer.py's lr_lambda, term for term: 0 at the first step of a warmup)."""
    net = nn.Linear(2, 2)
    adam = {"_target_": "torch.optim.Adam", "_partial_": True, "lr": 1.0}
    opt, sched = OptimConfig(optimizer=adam, schedule="inv_sqrt", warmup_steps=4).build(net, 50)
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([t / 4**1.5 for t in range(5)] + [t**-0.5 for t in range(5, 10)])
    opt, sched = OptimConfig(optimizer=adam, schedule="inv_sqrt").build(net, 50)
    assert opt.param_groups[0]["lr"] == 1.0  # no warmup: 1 at t = 0, then 1 / sqrt(t)
    opt.step(), sched.step(), opt.step(), sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(2**-0.5)


def test_multistep_schedule_multiplies_the_rate_at_its_milestones():
    """schedule=multistep: lr * gamma^(milestones passed), each milestone a step after the
    warmup (the IGNN graph code halves Adam's rate once, before epoch 51)."""
    net = nn.Linear(2, 2)
    adam = {"_target_": "torch.optim.Adam", "_partial_": True, "lr": 1.0}
    cfg = OptimConfig(optimizer=adam, schedule="multistep", milestones=[3, 5], gamma=0.5)
    opt, sched = cfg.build(net, 50)
    lrs = []
    for _ in range(7):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == [1.0, 1.0, 1.0, 0.5, 0.5, 0.25, 0.25]
    for bad, message in (
        ({"milestones": []}, "needs optim.milestones"),
        ({"milestones": [5, 3]}, "increasing steps"),
        ({"milestones": [3], "gamma": 0.0}, "gamma must be > 0"),
    ):
        with pytest.raises(ValueError, match=message):
            OptimConfig(optimizer=adam, schedule="multistep", **bad)


class ValLosses(L.Callback):
    def __init__(self):
        self.seen = []

    def on_validation_end(self, trainer, module):
        if not trainer.sanity_checking:
            self.seen.append(
                (
                    float(trainer.callback_metrics["val/loss"]),
                    trainer.optimizers[0].param_groups[0]["lr"],
                )
            )


def test_plateau_schedule_steps_on_every_validation_as_torch_would():
    """schedule=plateau: after each validation (here every step) torch's ReduceLROnPlateau
    sees that validation's val/loss. Fed the same losses, a fresh one gives the same rates."""
    sgd = {"_target_": "torch.optim.SGD", "_partial_": True, "lr": 0.5}
    optim = {"optimizer": sgd, "schedule": "plateau", "plateau_factor": 0.5}
    module = Synthetic(optim=optim)
    watch = ValLosses()
    trainer, _ = fit(module, val=True, callbacks=(watch,), num_sanity_val_steps=1)
    assert len(watch.seen) == 6  # the sanity check does not count
    opt = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.5)
    replay = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=0)
    expected = []
    for loss, _ in watch.seen:
        replay.step(loss)
        expected.append(opt.param_groups[0]["lr"])
    after = [lr for _, lr in watch.seen[1:]] + [trainer.optimizers[0].param_groups[0]["lr"]]
    assert after == pytest.approx(expected)
    assert min(expected) < 0.5  # the premise: some validation did not improve
    with pytest.raises(ValueError) as e:
        OptimConfig(schedule="plateau", plateau_factor=1.0)
    assert str(e.value) == (
        "optim.plateau_factor must lie in (0, 1) and optim.plateau_patience be >= 0, got 1.0 and 0"
    )


def test_plateau_warmup_leaves_the_reduced_rate_alone():
    net = nn.Linear(2, 2)
    sgd = {"_target_": "torch.optim.SGD", "_partial_": True, "lr": 1.0}
    cfg = OptimConfig(optimizer=sgd, schedule="plateau", warmup_steps=3, plateau_factor=0.1)
    opt, ramp = cfg.build(net, 100)
    plateau = cfg.plateau(opt)
    lrs = []
    for t in range(8):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        ramp.step()
        if t == 4:
            plateau.step(1.0)  # the first validation sets the best
        if t == 5:
            plateau.step(2.0)  # worse: x 0.1
    assert lrs[:4] == pytest.approx([1 / 3, 2 / 3, 1.0, 1.0])
    assert lrs[6:] == pytest.approx([0.1, 0.1])


def test_clip_nonemb_clips_all_but_the_embeddings():
    """trainer.gradient_clip_val with optim.clip_nonemb: the non-embedding gradients' norm
    is clipped, the embedding's (and a weight tied to it) left alone; without it, Lightning's
    own clipping of every parameter."""
    module = Synthetic(optim={"clip_nonemb": True})
    module.net.emb = nn.Embedding(4, 8)
    module.net.tied = nn.Linear(8, 4, bias=False)
    module.net.tied.weight = module.net.emb.weight
    for p in module.parameters():
        p.grad = torch.full_like(p, 10.0)
    module.configure_gradient_clipping(None, 0.25, "norm")
    emb = module.net.emb.weight.grad
    assert torch.equal(emb, torch.full_like(emb, 10.0))
    others = [p.grad.flatten() for p in module.parameters() if p is not module.net.emb.weight]
    assert torch.linalg.vector_norm(torch.cat(others)).item() == pytest.approx(0.25, rel=1e-5)
    with pytest.raises(ValueError, match=r"set trainer\.gradient_clip_algorithm=norm"):
        module.configure_gradient_clipping(None, 0.25, "value")
    plain = Synthetic()
    calls = []
    plain.clip_gradients = lambda *args: calls.append(args)
    plain.configure_gradient_clipping("opt", 0.25, "norm")
    assert calls == [("opt", 0.25, "norm")]


def test_batch_chunks_train_as_the_whole_batch_in_float64():
    """fit.batch_chunk=4: each step solves and backpropagates 4 chunks of 2 samples, and the
    run takes the steps the unchunked run takes (the budget, jittered, drawn once a step),
    under gradient accumulation and clipping too."""
    runs = []
    for chunk in (1, 4):
        torch.manual_seed(0)
        module = Synthetic(
            fit={"batch_chunk": chunk, "jitter": 2}, solver={"max_iter": 8, "tol": 1e-6}
        ).double()
        _, rec = fit(
            module,
            steps=5,
            dtype=torch.float64,
            accumulate_grad_batches=2,
            gradient_clip_val=0.5,
        )
        runs.append((module, rec.rows))
    (whole, rows_whole), (chunked, rows_chunked) = runs
    for a, b in zip(whole.parameters(), chunked.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    assert len(rows_whole) == len(rows_chunked) == 10  # 5 steps of 2 accumulated batches
    with pytest.raises(ValueError, match=r"fit\.batch_chunk must be >= 1, got 0"):
        Synthetic(fit={"batch_chunk": 0})


# -- on a GPU (skipped without CUDA) ---------------------------------------------------------


@pytest.mark.requires_cuda
def test_bf16_autocast_training_step():
    from deqlab.tasks.cifar.model import TutorialDEQ
    from deqlab.tasks.cifar.module import CifarModule

    module = CifarModule(
        TutorialDEQ(16, 16, groups=4), solver={"max_iter": 10}, grad={"max_iter": 10}
    ).cuda()
    x = torch.randn(8, 3, 32, 32, device="cuda")
    y = torch.randint(0, 10, (8,), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        outputs, info = module(x)
        loss = module.criterion(outputs[-1].float(), y)
    loss.backward()
    assert torch.isfinite(loss) and len(info.backward) == 1
    assert all(torch.isfinite(p.grad).all() for p in module.parameters() if p.grad is not None)
