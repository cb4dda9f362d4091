"""The published experiments train as the reference code trains.

Numbers recorded once from the reference code (tests/parity/record.py runs locuslab/deq at
1fb7059: DEQ-Sequence and MDEQ-Vision) are compared with deqlab's models built from the
experiment files themselves, shrunk to tiny widths: the same weights (through deqlab's
converters, as ``init_from`` loads a released model) give the same losses, logits and gradient
of every parameter in float64 at the reference's fixed iteration counts, and the same 20-step
loss curves through Lightning with the experiment's optimizer, schedule and clipping. At the
published widths, every layer's effective weights start at the reference's scale, and every
dropout site shares its mask over the same axes. The tutorial is compared live with its
transcription (benchmarks/baseline.py).

What the recorded runs fix (the rest comes from the experiment file): tiny widths; the
iteration counts, run in full (``tol: null``; the reference's solvers were given ``eps=-1``);
dropout 0 where numbers are compared; a constant learning rate for the DEQ-Transformer's curve.
"""

from __future__ import annotations

import contextlib
import itertools
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra.utils import instantiate
from torch import nn
from torch.utils.data import DataLoader

import deqlab.core
from benchmarks.baseline import tutorial_anderson, tutorial_sequential
from deqlab.runner.config import compose
from deqlab.tasks.cifar.convert import _layer_map, from_locuslab_mdeq
from deqlab.tasks.lm.convert import LAYERS, from_locuslab_deq

from .helpers.problems import ConvCell

FIXTURES = Path(__file__).parent / "parity" / "fixtures"
STEPS = 20


def fixture(name: str) -> dict:
    return torch.load(FIXTURES / f"{name}.pt", weights_only=True)


@contextlib.contextmanager
def float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def assert_grads_close(net: nn.Module, want: dict[str, torch.Tensor], rel: float) -> None:
    """Every parameter's gradient within ``rel`` of the largest gradient entry: the scale the
    comparison is made at (a parameter whose gradient is nearly zero has no own scale)."""
    got = {k: p.grad for k, p in net.named_parameters()}
    assert set(got) == set(want), sorted(set(got) ^ set(want))
    scale = max(g.abs().max() for g in want.values())
    for k, g in want.items():
        err = (got[k] - g).abs().max() / scale
        assert err < rel, (k, err.item())


def seeded_jacobian(monkeypatch, seed: int) -> None:
    """Seed the generator right before each Hutchinson estimate, as the recording did, so
    both sides draw the same probe vectors."""
    original = deqlab.core.jacobian_loss
    count = iter(range(seed, seed + 10_000))

    def seeded(*args, **kwargs):
        torch.manual_seed(next(count))
        return original(*args, **kwargs)

    monkeypatch.setattr(deqlab.core, "jacobian_loss", seeded)


class Recorder(L.Callback):
    """Each step's task loss (without the Jacobian term, as the reference's curves) and
    learning rate."""

    def __init__(self):
        self.loss, self.lr = [], []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.lr.append(trainer.optimizers[0].param_groups[0]["lr"])

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.loss.append(outputs["task_loss"].item())


def train(cfg, module, loader, datamodule=None) -> Recorder:
    rec = Recorder()
    trainer = L.Trainer(
        max_steps=STEPS,
        accelerator="cpu",
        precision="64-true",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        gradient_clip_val=cfg.trainer.get("gradient_clip_val"),
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=[rec],
    )
    with float64():
        if datamodule is None:
            trainer.fit(module, train_dataloaders=loader)
        else:
            trainer.fit(module, datamodule=datamodule)
    return rec


# -- the DEQ-Transformer (DEQ-Sequence) ------------------------------------------------------

LM_EXPERIMENTS = {
    "postln": "wt103_deq_transformer_medium",
    "preln": "wt103_deq_transformer_medium_preln_reg",
}


def lm_overrides(fx: dict, *extra: str) -> list[str]:
    c = fx["config"]
    return [
        f"task.module.net.d_model={c['d_model']}",
        f"task.module.net.n_head={c['n_head']}",
        f"task.module.net.d_head={c['d_head']}",
        f"task.module.net.d_inner={c['d_inner']}",
        f"task.module.net.cutoffs={c['cutoffs']}",
        f"task.module.net.div_val={c['div_val']}",
        "task.module.net.dropout=0.0",
        "task.module.net.emb_dropout=0.0",
        "task.module.net.dropatt=0.0",
        f"task.module.mem_len={c['mem_len']}",
        # the reference's iteration counts, run in full
        f"solver.max_iter={c['f_thres']}",
        "solver.tol=null",
        f"grad.max_iter={c['b_thres'] + 1}",
        "grad.tol=null",
        f"grad.per_solver.broyden.memory={c['b_thres']}",
        "jac_reg=none",
        "task.module.fit.jitter=0",
        *extra,
    ]


def lm_module(name: str, tmp_path, *extra: str):
    fx = fixture(f"deq_transformer_{name}")
    cfg = compose([f"experiment={LM_EXPERIMENTS[name]}", *lm_overrides(fx, *extra)], tmp_path)
    return fx, cfg, instantiate(cfg.task.module)


def by_band(nll: torch.Tensor, target: torch.Tensor, edges: list[int]) -> torch.Tensor:
    """Token NLLs (flattened as the reference flattens its (length, batch) targets) grouped by
    vocabulary band, in order: how the reference's adaptive softmax returns them."""
    flat, y = nll.t().reshape(-1), target.t().reshape(-1)
    return torch.cat([flat[(y >= lo) & (y < hi)] for lo, hi in itertools.pairwise(edges)])


@pytest.mark.parametrize("name", ["postln", "preln"])
def test_deq_transformer_forward_and_gradients_equal_the_references(name, tmp_path):
    fx, _, module = lm_module(name, tmp_path, "task.module.fit.pretrain_steps=0")
    with float64():
        module.attach_net(module.net_factory(n_token=fx["config"]["n_token"]))
    net = module.net
    net.load_state_dict(net.convert_reference_state(fx["weights"]), strict=True)
    module.train()
    edges = [0, *fx["config"]["cutoffs"], fx["config"]["n_token"]]
    for tokens, nll_ref, loss_ref, grads_ref, mems_ref in zip(
        fx["segments"], fx["nll"], fx["loss"], fx["grads"], fx["mems"]
    ):
        module.zero_grad()
        x, y = tokens[:-1].t(), tokens[1:].t()  # (batch, length)
        outputs, _ = module(x)
        nll = net.nll(outputs[-1], y)
        nll.mean().backward()
        assert abs(nll.mean().item() - loss_ref) < 1e-10 * abs(loss_ref)
        torch.testing.assert_close(
            by_band(nll.detach(), y, edges), nll_ref.reshape(-1), rtol=1e-8, atol=1e-10
        )
        assert_grads_close(net, from_locuslab_deq(grads_ref, net, check_ties=False), 1e-8)
        states, injections = module._mem["train"]
        torch.testing.assert_close(states, mems_ref[0].permute(1, 0, 2), rtol=1e-7, atol=1e-9)
        torch.testing.assert_close(injections, mems_ref[1].permute(1, 0, 2), rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("name", ["postln", "preln"])
def test_deq_transformer_stop_rules_equal_the_references(name, tmp_path):
    """With the experiment's own tolerances (1e-3 on the whole batch's relative residual,
    forward and backward), the solves stop where the reference's do: same loss, gradients."""
    fx = fixture(f"deq_transformer_{name}")
    c = fx["config"]
    cfg = compose(
        [
            f"experiment={LM_EXPERIMENTS[name]}",
            *[o for o in lm_overrides(fx) if not o.startswith(("solver.tol", "grad.tol"))],
            "task.module.fit.pretrain_steps=0",
        ],
        tmp_path,
    )
    assert cfg.solver.tol == cfg.grad.tol == 1e-3 and cfg.solver.stop_mode == "batch_rel"
    module = instantiate(cfg.task.module)
    with float64():
        module.attach_net(module.net_factory(n_token=c["n_token"]))
    net = module.net
    net.load_state_dict(net.convert_reference_state(fx["weights"]), strict=True)
    module.train()
    tokens = fx["segments"][0]
    outputs, info = module(tokens[:-1].t())
    loss = net.nll(outputs[-1], tokens[1:].t()).mean()
    loss.backward()
    assert info.nfe < c["f_thres"] and info.backward[0].nfe < c["b_thres"] + 1  # stopped early
    assert abs(loss.item() - fx["stopped"]["loss"]) < 1e-10 * abs(loss.item())
    assert_grads_close(net, from_locuslab_deq(fx["stopped"]["grads"], net, check_ties=False), 1e-8)


class Vocabulary(list):
    """What LMModule.setup reads of a corpus: its size and its words in id order."""

    @property
    def itos(self) -> list[str]:
        return self


class FixedBatches(L.LightningDataModule):
    """The recorded batches, in order, and a vocabulary of the recorded size."""

    def __init__(self, batches, n_token: int):
        super().__init__()
        self.batches = batches
        self.corpus = Vocabulary(f"w{i}" for i in range(n_token))

    def train_dataloader(self):
        return DataLoader(self.batches, batch_size=None)


@pytest.mark.parametrize("name", ["postln", "preln"])
def test_deq_transformer_trains_step_for_step_as_the_reference(name, tmp_path):
    """20 steps of Adam, clipping at the experiment's 0.25, memory carried between segments,
    3 unrolled pre-training steps, from the reference's initial weights loaded by init_from."""
    fx = fixture(f"deq_transformer_{name}")
    dyn = fx["dynamics"]
    initial = tmp_path / "reference_initial.pt"
    torch.save(dyn["initial"], initial)
    _, cfg, module = lm_module(
        name,
        tmp_path,
        f"init_from={initial}",
        f"task.module.fit.pretrain_steps={fx['config']['pretrain_steps']}",
        f"task.module.fit.pretrain_unroll={fx['config']['pretrain_unroll']}",
        f"optim.optimizer.lr={fx['config']['lr']}",
        "optim.schedule=constant",
        "optim.warmup_steps=0",
    )
    assert cfg.trainer.gradient_clip_val == fx["config"]["clip"]
    rec = train(cfg, module, None, FixedBatches(dyn["batches"], fx["config"]["n_token"]))
    assert rec.lr == pytest.approx(dyn["lr"])
    torch.testing.assert_close(
        torch.tensor(rec.loss, dtype=torch.float64),
        torch.tensor(dyn["loss"], dtype=torch.float64),
        rtol=1e-6,
        atol=0,
    )


def test_deq_transformer_starts_at_the_references_scale(tmp_path):
    """Every layer's effective weights at init, at the published widths (d_model 700, d_inner
    48,000; a 2,000-word vocabulary, which no weight's scale depends on), within 10% of the
    reference's: the cell's weight-normalized layers at PyTorch's default, the rest N(0, 0.01)."""
    ref = fixture("deq_transformer_init")
    w = ref["widths"]
    cfg = compose(
        [
            "experiment=wt103_deq_transformer_medium",
            f"task.module.net.cutoffs={w['cutoffs']}",
        ],
        tmp_path,
    )
    module = instantiate(cfg.task.module)
    module.attach_net(module.net_factory(n_token=w["n_token"]))
    net = dict(module.net.named_modules())
    names = {f"{r}.{leaf}": f"{o}.{leaf}" for r, o in LAYERS.items() for leaf in ("weight", "bias")}
    for i in range(len(w["cutoffs"]) + 1):
        names[f"word_emb.emb_layers.{i}.weight"] = f"embed.emb.{i}.weight"
        names[f"word_emb.emb_projs.{i}.weight"] = f"embed.proj.{i}.weight"
        names[f"crit.out_projs.{i}.weight"] = (
            "softmax.head_proj" if i == 0 else f"softmax.tail_proj.{i - 1}"
        )
    names |= {f"func.dec_attn.{b}": f"cell.attn.{b}" for b in ("r_w_bias", "r_r_bias")}
    names["crit.cluster_weight"] = "softmax.cluster.weight"
    params = dict(module.net.named_parameters())
    for ref_name, ref_std in ref["std"].items():
        ours = names[ref_name]
        if ours in params:
            t = params[ours]
        else:  # a layer's (normalized) weight or its bias
            layer, leaf = ours.rsplit(".", 1)
            t = getattr(net[layer], leaf)
        std = t.detach().double().std().item()
        assert abs(std - ref_std) <= 0.1 * ref_std, (ref_name, std, ref_std)


def shared(mask: torch.Tensor, axes: tuple[str, ...]) -> list[str]:
    return sorted(a for a, n in zip(axes, mask.shape) if n == 1)


def test_deq_transformer_dropout_masks_are_shared_as_the_references(tmp_path):
    ref = fixture("deq_transformer_dropout")["shared_axes"]
    cfg = compose(["experiment=wt103_deq_transformer_medium_reg", "task.module.net.d_model=16",
                   "task.module.net.n_head=2", "task.module.net.d_head=8",
                   "task.module.net.d_inner=32", "task.module.net.cutoffs=[20,40]",
                   "task.module.net.dropout=0.5", "task.module.net.emb_dropout=0.5",
                   "task.module.net.dropatt=0.5"], tmp_path)  # fmt: skip
    module = instantiate(cfg.task.module)
    module.attach_net(module.net_factory(n_token=60))
    net = module.net.train()
    b, q, k, d, inner = 3, 5, 9, 16, 32
    sites = {
        "embedding": (net.emb_drop, (b, q, d), ("batch", "position", "feature")),
        "output": (net.out_drop, (b, q, d), ("batch", "position", "feature")),
        "positional": (net.pos_drop, (1, k, d), ("batch", "position", "feature")),
        "attention_output": (net.cell.drop, (b, q, d), ("batch", "position", "feature")),
        "attention_probs": (net.cell.attn.dropatt, (b, 2, q, k), ("batch", "head", "query", "key")),
        "ff_hidden": (net.cell.ff_drop, (b, q, inner), ("batch", "position", "feature")),
        "ff_output": (net.cell.ff_out_drop, (b, q, d), ("batch", "position", "feature")),
    }
    assert set(sites) == set(ref)
    for site, (drop, shape, axes) in sites.items():
        drop.reset()
        drop(torch.ones(shape))
        assert shared(drop.mask, axes) == ref[site], site


# -- MDEQ (MDEQ-Vision) ------------------------------------------------------------------------

MDEQ = {
    "small": ("cifar_mdeq_small", [4, 8], [2, 4], 6, 7),
    "large_jr": ("cifar_mdeq_large_jr", [4, 8, 8], [2, 4, 4], 6, 5),
}


def mdeq_module(name: str, tmp_path, *extra: str):
    experiment, channels, heads, f_thres, b_thres = MDEQ[name]
    overrides = [
        f"task.module.net.channels={channels}",
        f"task.module.net.head_channels={heads}",
        "task.module.net.final_channels=8",
        "task.module.net.groups=2",
        "task.module.net.expansion=2",
        "task.module.net.dropout=0.0",
        "task.module.fit.pretrain_unroll=3",
        "task.module.fit.jitter=0",
        f"solver.max_iter={f_thres + 1}",
        "solver.tol=null",
        f"solver.per_solver.broyden.memory={f_thres}",
        f"grad.max_iter={b_thres + 1}",
        "grad.tol=null",
        f"grad.per_solver.broyden.memory={b_thres}",
        *extra,
    ]
    cfg = compose([f"experiment={experiment}", *overrides], tmp_path)
    with float64():
        module = instantiate(cfg.task.module)
    return cfg, module


@pytest.mark.parametrize("name", ["small", "large_jr"])
@pytest.mark.parametrize("mode", ["deq", "unrolled"])
def test_mdeq_forward_and_gradients_equal_the_references(name, mode, tmp_path, monkeypatch):
    fx = fixture(f"mdeq_{name}")
    pretrain = 10**9 if mode == "unrolled" else 0
    cfg, module = mdeq_module(name, tmp_path, f"task.module.fit.pretrain_steps={pretrain}")
    net = module.net
    net.load_state_dict(net.convert_reference_state(fx["weights"]), strict=True)
    module.train()
    jr = cfg.jac_reg.name == "hutchinson" and mode == "deq"
    seeded_jacobian(monkeypatch, 1000)
    outputs, info = module(fx["x"], jac_vecs=cfg.jac_reg.vecs if jr else 0)
    loss = module.criterion(outputs[-1], fx["y"])
    total = loss + cfg.jac_reg.weight * info.jac_loss if jr else loss
    total.backward()
    want = fx[mode]
    torch.testing.assert_close(outputs[-1].detach(), want["logits"], rtol=1e-9, atol=1e-11)
    assert abs(loss.item() - want["loss"]) < 1e-10
    if jr:
        assert abs(info.jac_loss.item() - want["jac_loss"]) < 1e-9 * want["jac_loss"]
    assert_grads_close(net, from_locuslab_mdeq(want["grads"], net), 1e-8)
    ours = net.state_dict()
    after = from_locuslab_mdeq({**fx["weights"], **want["bn_running"]}, net)
    for key in (k for k in after if "running" in k):
        torch.testing.assert_close(ours[key], after[key], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", ["small", "large_jr"])
def test_mdeq_stop_rules_equal_the_references(name, tmp_path):
    """With the experiment's own tolerances (1e-3, batch-wide relative residual)."""
    fx = fixture(f"mdeq_{name}")
    cfg, module = mdeq_module(
        name, tmp_path, "task.module.fit.pretrain_steps=0", "solver.tol=1e-3", "grad.tol=1e-3"
    )
    assert cfg.solver.stop_mode == cfg.grad.stop_mode == "batch_rel"
    net = module.net
    net.load_state_dict(net.convert_reference_state(fx["weights"]), strict=True)
    module.train()
    outputs, _ = module(fx["x"])
    module.criterion(outputs[-1], fx["y"]).backward()
    want = fx["stopped"]
    torch.testing.assert_close(outputs[-1].detach(), want["logits"], rtol=1e-9, atol=1e-11)
    assert_grads_close(net, from_locuslab_mdeq(want["grads"], net), 1e-8)


@pytest.mark.parametrize("name", ["small", "large_jr"])
def test_mdeq_trains_step_for_step_as_the_reference(name, tmp_path, monkeypatch):
    """20 steps from the reference's initial weights (init_from): Adam with the experiment's
    weight decay, its cosine schedule to 1e-6 over the run, 4 unrolled pre-training steps, then
    DEQ steps (with the Jacobian loss at the experiment's weight on every step for the JR
    recipe, at frequency 1 here)."""
    fx = fixture(f"mdeq_{name}")
    dyn = fx["dynamics"]
    initial = tmp_path / "reference_initial.pt"
    torch.save(dyn["initial"], initial)
    extra = ["jac_reg.freq=1.0"] if name == "large_jr" else []
    cfg, module = mdeq_module(
        name, tmp_path, f"init_from={initial}", "task.module.fit.pretrain_steps=4", *extra
    )
    seeded_jacobian(monkeypatch, 2000)
    rec = train(cfg, module, DataLoader(dyn["batches"], batch_size=None))
    assert rec.lr == pytest.approx(dyn["lr"], rel=1e-12)
    torch.testing.assert_close(
        torch.tensor(rec.loss, dtype=torch.float64),
        torch.tensor(dyn["loss"], dtype=torch.float64),
        rtol=1e-6,
        atol=0,
    )


@pytest.mark.parametrize(
    "name,experiment", [("small", "cifar_mdeq_small"), ("large", "cifar_mdeq_large_jr")]
)
def test_mdeq_starts_at_the_references_scale(name, experiment, tmp_path):
    """At the published widths, every conv's and linear layer's effective weights (and conv
    biases) within 10% of the reference's: the weight-normalized block and post-fuse convs at
    PyTorch's default, every other conv at N(0, 0.01), the classifier at the default (tensors
    of 100 entries or more: a smaller sample's std varies by more than 10% by chance)."""
    ref = fixture("mdeq_init")["std"][name]
    cfg = compose([f"experiment={experiment}"], tmp_path)
    net = instantiate(cfg.task.module).net
    names = _layer_map(net)
    modules = dict(net.named_modules())
    for key, ref_std in ref.items():
        layer, leaf = key.rsplit(".", 1)
        t = getattr(modules[names[layer]], leaf)
        if t.numel() < 100:  # the classifier's 10 biases: a sample std says nothing at 10%
            continue
        std = t.detach().double().std().item()
        assert abs(std - ref_std) <= 0.1 * ref_std, (key, std, ref_std)


def test_mdeq_dropout_masks_are_shared_as_the_references(tmp_path):
    ref = fixture("mdeq_dropout")["shared_axes"]
    cfg = compose(["experiment=cifar_mdeq_small"], tmp_path)
    net = instantiate(cfg.task.module).net.train()
    drop = net.cell.branches[0][0].drop
    drop(torch.ones(2, 24, 32, 32))
    assert shared(drop.mask, ("batch", "channel", "height", "width")) == ref["block"]


# -- the implicit-layers tutorial (live, against benchmarks/baseline.py) ----------------------


def tutorial_reference(chan: int, inner: int, groups: int, std: float = 0.01) -> nn.Module:
    """The chapter's model around its DEQFixedPoint, as the chapter writes it (its cell's
    convs at N(0, std); the chapter's 0.01 converges in a few steps on a tiny cell)."""
    f = ConvCell(chan, inner, groups)
    for conv in (f.conv1, f.conv2):
        conv.weight.data.normal_(0, std)
    return tutorial_sequential(f, chan)


TUTORIAL_TINY = [
    "task.module.net.channels=8",
    "task.module.net.inner=12",
    "task.module.net.groups=4",
]


def test_tutorial_recipe_forward_and_gradients_equal_the_tutorials(tmp_path):
    """The experiment's solver and gradient settings as they stand (tol 1e-2, 25 steps):
    the same logits and gradients as the tutorial's model on the same weights and images."""
    torch.manual_seed(0)
    with float64():
        ref = tutorial_reference(8, 12, 4).train()
        cfg = compose(["experiment=cifar_tutorial", *TUTORIAL_TINY], tmp_path)
        module = instantiate(cfg.task.module).train()
    net = module.net
    net.load_state_dict(net.convert_reference_state(ref.state_dict()), strict=True)
    x, y = torch.rand(6, 3, 32, 32, dtype=torch.float64), torch.randint(0, 10, (6,))
    ref_logits = ref(x)
    nn.functional.cross_entropy(ref_logits, y).backward()
    outputs, _ = module(x)
    module.criterion(outputs[-1], y).backward()
    torch.testing.assert_close(outputs[-1], ref_logits, rtol=1e-9, atol=1e-11)
    want = net.convert_reference_state({k: p.grad for k, p in ref.named_parameters()})
    assert_grads_close(net, want, 1e-8)


def test_tutorial_recipe_trains_step_for_step_as_the_tutorial(tmp_path):
    torch.manual_seed(0)
    with float64():
        ref = tutorial_reference(8, 12, 4).train()
    initial = tmp_path / "tutorial_initial.pt"
    torch.save(ref.state_dict(), initial)
    g = torch.Generator().manual_seed(1)
    batches = [
        (torch.rand(4, 3, 32, 32, generator=g, dtype=torch.float64), torch.randint(0, 10, (4,), generator=g))
        for _ in range(STEPS)
    ]  # fmt: skip
    # the chapter's loop: Adam(lr 1e-3), CosineAnnealingLR(T_max = all steps, eta_min 1e-6)
    opt = torch.optim.Adam(ref.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, STEPS, eta_min=1e-6)
    want = []
    for x, y in batches:
        opt.zero_grad()
        loss = nn.functional.cross_entropy(ref(x), y)
        loss.backward()
        opt.step()
        sched.step()
        want.append(loss.item())
    cfg = compose(["experiment=cifar_tutorial", *TUTORIAL_TINY, f"init_from={initial}"], tmp_path)
    with float64():
        module = instantiate(cfg.task.module)
    rec = train(cfg, module, DataLoader(batches, batch_size=None))
    torch.testing.assert_close(
        torch.tensor(rec.loss, dtype=torch.float64),
        torch.tensor(want, dtype=torch.float64),
        rtol=1e-6,
        atol=0,
    )


def test_tutorial_recipe_solves_with_the_tutorials_anderson(tmp_path):
    """The experiment's solver, as configured, returns what the tutorial's anderson returns
    (m, lam added as it is, beta, tol on the whole batch, the last iterate) on a map whose
    solve stalls and wanders (z = 2 sin z + c), so the last iterate is not the best."""
    cfg = compose(["experiment=cifar_tutorial"], tmp_path)
    deq = instantiate(cfg.task.module).deq.eval()
    c = torch.randn(4, 3, 5, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    f = lambda z: 2.0 * torch.sin(z) + c
    with torch.no_grad():
        ours, info = deq(f, torch.zeros_like(c))
        theirs, res = tutorial_anderson(
            f, torch.zeros_like(c), m=5, lam=1e-4, max_iter=25, tol=1e-2
        )
    assert info.nfe == 25 and min(res) < 0.8 * res[-1]  # ran out its budget, past its best
    # 25 steps of a stalled solve amplify rounding to ~1e-10; best and last differ by ~0.1
    torch.testing.assert_close(ours, theirs, rtol=1e-8, atol=1e-9)


@pytest.mark.parametrize(
    "experiment,normalize",
    [
        ("cifar_tutorial", None),  # transforms.ToTensor() only
        # cls_train.py: Normalize((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010))
        ("cifar_mdeq_small", ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010))),
    ],
)
def test_cifar_images_are_what_the_references_transforms_give(experiment, normalize, tmp_path):
    from PIL import Image
    from torchvision import transforms

    from .helpers.runs import write_cifar_folder

    write_cifar_folder(tmp_path)
    overrides = ["task.datamodule.batch_size=10", "task.datamodule.eval_batch_size=10"]
    cfg = compose([f"experiment={experiment}", f"paths.data_dir={tmp_path}", *overrides], tmp_path)
    data = instantiate(cfg.task.datamodule)
    data.setup("fit")
    steps = [transforms.ToTensor()] + ([transforms.Normalize(*normalize)] if normalize else [])
    reference = transforms.Compose(steps)
    for i in range(5):
        pixels = data.train_set.images[i].permute(1, 2, 0).numpy()
        want = reference(Image.fromarray(pixels))
        torch.testing.assert_close(data.train_set[i][0], want, rtol=1e-6, atol=1e-6)
