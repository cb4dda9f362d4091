"""Record the parity fixtures from the reference code itself.

    python tests/parity/record.py /path/to/locuslab-deq        # a checkout at REFERENCE_COMMIT

locuslab/deq holds both references deqlab reproduces: DEQ-Sequence (the DEQ-Transformer,
post- and pre-LN) and MDEQ-Vision (MDEQ-small and the Jacobian-regularized MDEQ-large). This
script imports their classes from the checkout, runs them at tiny sizes in float64, and writes
numbers, never code, to tests/parity/fixtures/*.pt: weights, inputs, losses, the gradient of
every parameter, 20-step loss curves, per-layer statistics of the effective weights at init
(at the published widths) and the shape of every dropout mask. tests/test_parity.py loads them
into deqlab's models through deqlab's converters and requires the same numbers.

Only what today's PyTorch needs is patched: ``torch.solve`` (removed in 2.x; the reference's
Anderson calls it) and ``torch.cuda.synchronize`` on a machine without CUDA. Everything else is
configuration the reference code takes: tiny widths, ``eps=-1`` for its solvers (a fixed
iteration count, so both sides run the same steps), dropout 0 where numbers are compared.
The loop around the model (Adam over ``model.parameters()``, gradient clipping, the cosine
schedule, memory carried between segments, pre-training steps) follows the reference scripts
(train_transformer.py's ``train``, MDEQ-Vision's cls_function.py ``train``) line by line.

Needs: torch, scipy, termcolor, yacs (the reference code's imports).
"""

from __future__ import annotations

import argparse
import ast
import functools
import subprocess
import sys
import types
from pathlib import Path

import torch
from torch import nn

REFERENCE = "https://github.com/locuslab/deq"
REFERENCE_COMMIT = "1fb7059d6d89bb26d16da80ab9489dcc73fc5472"
FIXTURES = Path(__file__).parent / "fixtures"
STEPS = 20  # optimizer steps in each recorded loss curve


def patch_torch() -> None:
    torch.solve = lambda b, a: (torch.linalg.solve(a, b), None)  # removed from torch 2
    if not torch.cuda.is_available():
        torch.cuda.synchronize = lambda *a, **k: None


def save(name: str, data: dict) -> None:
    FIXTURES.mkdir(parents=True, exist_ok=True)
    data = {"reference": REFERENCE, "commit": REFERENCE_COMMIT, **data}
    torch.save(data, FIXTURES / f"{name}.pt")
    print(f"wrote {FIXTURES / name}.pt")


def grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def shared_axes(mask_shape: tuple[int, ...], axes: tuple[str, ...]) -> list[str]:
    """The named axes a dropout mask is shared over (size 1 in the mask)."""
    return sorted(a for a, n in zip(axes, mask_shape) if n == 1)


def empirical_shared_axes(drop, x_shape: tuple[int, ...], axes: tuple[str, ...]) -> list[str]:
    """For a dropout called on the fly: the axes along which its output on ones is constant."""
    out = drop(torch.ones(x_shape))
    shared = []
    for d, a in enumerate(axes):
        if (x_shape[d] > 1 and bool((out == out.narrow(d, 0, 1)).all())) or x_shape[d] == 1:
            shared.append(a)
    return sorted(shared)


# -- DEQ-Sequence: the DEQ-Transformer ------------------------------------------------------


def script_functions(path: Path, names: tuple[str, ...], scope: dict) -> dict:
    """The named top-level functions of a reference script, defined from its own source
    (the script itself parses arguments and loads data at import)."""
    tree = ast.parse(path.read_text())
    picked = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name in names]
    exec(compile(ast.Module(picked, []), str(path), "exec"), scope)
    return {n: scope[n] for n in names}


def record_lm(ref: Path) -> None:
    seq = ref / "DEQ-Sequence"
    sys.path[:0] = [str(seq), str(ref)]
    from data_utils import LMOrderedIterator
    from lib.solvers import anderson, broyden
    from models.deq_transformer import DEQTransformerLM

    def init_fns(init_std: float, proj_init_std: float):
        args = types.SimpleNamespace(init="normal", init_std=init_std, proj_init_std=proj_init_std)
        scope = {"nn": nn, "args": args}
        names = ("init_weight", "init_bias", "weights_init")
        return script_functions(seq / "train_transformer.py", names, scope)["weights_init"]

    def build(pre_ln: bool, **kw):
        """As train_transformer.py builds it: DEQTransformerLM, then model.apply(weights_init)
        and model.word_emb.apply(weights_init)."""
        cfg = dict(
            n_token=60, n_layer=2, eval_n_layer=2, n_head=2, d_model=16, d_head=8, d_inner=32,
            dropout=0.0, dropatt=0.0, tie_weights=True, d_embed=16, div_val=2,
            tie_projs=[False, True, True], pre_lnorm=pre_ln, wnorm=True, tgt_len=6, mem_len=6,
            cutoffs=[20, 40], pretrain_steps=0, stop_mode="rel",
            f_solver=functools.partial(anderson, eps=-1.0),
            b_solver=functools.partial(broyden, eps=-1.0),
        )  # fmt: skip
        cfg.update(kw)
        model = DEQTransformerLM(**cfg)
        weights_init = init_fns(0.01, 0.01)
        model.apply(weights_init)
        model.word_emb.apply(weights_init)
        return model

    def contracting(model):
        """At init this tiny cell is no contraction (a post-LN residual block with small
        weights is close to the identity on its normalized states) and no solve converges,
        so float64 rounding, amplified by ill-conditioned Anderson systems, would decide the
        comparison. A 5x attention output (its g) makes the 30-step solves converge."""
        with torch.no_grad():
            model.func.dec_attn.o_net.weight_g.mul_(5.0)
        return model

    solve = {"f_thres": 30, "b_thres": 30}
    for pre_ln in (False, True):
        torch.manual_seed(0)
        model = contracting(build(pre_ln)).train()
        weights = state(model)
        g = torch.Generator().manual_seed(1)
        segments = [torch.randint(0, 60, (7, 3), generator=g) for _ in range(2)]
        mems, losses, seg_grads, nlls, new_mems = [], [], [], [], []
        for seq_tokens in segments:
            data, target = seq_tokens[:-1], seq_tokens[1:]
            model.zero_grad()
            ret = model(data, target, mems, train_step=-1, compute_jac_loss=False, **solve)
            loss, mems = ret[0], ret[3:]
            loss.mean().backward()
            nlls.append(loss.detach().clone())
            losses.append(loss.mean().item())
            seg_grads.append(grads(model))
            new_mems.append([m.detach().clone() for m in mems])

        # the stop rules: the same first segment with the solvers' own eps (1e-3), which
        # stop on the whole batch's relative residual
        stopped = build(pre_ln, f_solver=anderson, b_solver=broyden)
        stopped.load_state_dict(weights)
        stopped.train().zero_grad()
        data, target = segments[0][:-1], segments[0][1:]
        ret = stopped(data, target, [], train_step=-1, compute_jac_loss=False, **solve)
        ret[0].mean().backward()
        stop_rule = {"loss": ret[0].mean().item(), "grads": grads(stopped)}
        save(
            f"deq_transformer_{'preln' if pre_ln else 'postln'}",
            {
                "config": {
                    "n_token": 60,
                    "d_model": 16,
                    "n_head": 2,
                    "d_head": 8,
                    "d_inner": 32,
                    "cutoffs": [20, 40],
                    "div_val": 2,
                    "pre_ln": pre_ln,
                    "mem_len": 6,
                    "tgt_len": 6,
                    "batch": 3,
                    **solve,
                    "anderson_m": 6,
                    "pretrain_steps": 3,
                    "pretrain_unroll": 2,
                    "lr": 1e-3,
                    "clip": 0.25,
                },
                "weights": weights,
                "segments": segments,
                "nll": nlls,
                "loss": losses,
                "grads": seg_grads,
                "mems": new_mems,
                "stopped": stop_rule,
                "dynamics": lm_dynamics(
                    lambda *a, **k: contracting(build(*a, **k)), pre_ln, LMOrderedIterator, solve
                ),
            },
        )

    save("deq_transformer_init", lm_init_stats(build))
    save("deq_transformer_dropout", lm_dropout_axes(build))


def lm_dynamics(build, pre_ln, iterator_cls, solve) -> dict:
    """20 steps of train_transformer.py's loop: Adam over model.parameters() (the tied
    projections are separate Parameters over one storage there), clip 0.25, memory carried,
    the first 3 steps unrolled pre-training with n_layer 2; constant learning rate."""
    torch.manual_seed(2)
    model = build(pre_ln, pretrain_steps=3).train()
    initial = state(model)
    g = torch.Generator().manual_seed(3)
    stream = torch.randint(0, 60, (3 * (STEPS * 6 + 1),), generator=g)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=0.0)
    mems, curve, lrs, batches = [], [], [], []
    for train_step, (data, target, _) in enumerate(iterator_cls(stream, 3, 6)):
        if train_step == STEPS:
            break
        model.zero_grad()
        ret = model(data, target, mems, train_step=train_step, compute_jac_loss=False, **solve)
        loss, mems = ret[0].mean(), ret[3:]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.25)
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        curve.append(loss.item())
        batches.append((data.t().clone(), target.t().clone()))  # (batch, length), as deqlab's
    return {"initial": initial, "stream": stream, "batches": batches, "loss": curve, "lr": lrs}


def lm_init_stats(build) -> dict:
    """Std of every effective weight at init at the published medium widths (d_model 700,
    10 heads of 70, d_inner 48000; vocabulary 2,000 with cutoffs scaled down, which no
    weight's scale depends on), after the reference recomputes its weight-normalized
    layers (func.reset, as every forward does)."""
    torch.manual_seed(0)
    model = build(
        False, n_token=2000, d_model=700, n_head=10, d_head=70, d_inner=48000, d_embed=700,
        div_val=4, cutoffs=[200, 400, 1000], tie_projs=[False, True, True, True],
    )  # fmt: skip
    model.func.reset(1, 4, 4)
    stats = {}
    for name, module in model.named_modules():
        for leaf in ("weight", "bias", "r_w_bias", "r_r_bias", "cluster_weight"):
            w = getattr(module, leaf, None)
            if isinstance(w, torch.Tensor) and not name.startswith("crit.out_layers"):
                stats[f"{name}.{leaf}"] = w.detach().double().std().item() if w.numel() > 1 else 0.0
    return {"widths": {"d_model": 700, "n_head": 10, "d_head": 70, "d_inner": 48000,
                       "n_token": 2000, "cutoffs": [200, 400, 1000], "div_val": 4},
            "std": stats}  # fmt: skip


def lm_dropout_axes(build) -> dict:
    """Which axes each dropout site's mask is shared over, with dropout 0.5 everywhere."""
    model = build(False, dropout=0.5, dropatt=0.5).train()
    bsz, qlen, mlen = 3, 5, 4
    klen = qlen + mlen
    model.pos_drop.reset_mask(1, 16, klen)
    model.func.reset(bsz, qlen, klen)
    attn, ff = model.func.dec_attn, model.func.pos_ff
    axes = {
        # (B, L, D) word embeddings, (B, D, L) equilibrium states: iodrop draws on the fly
        "embedding": empirical_shared_axes(
            lambda x: model.iodrop(x, 0.5), (bsz, qlen, 16), ("batch", "position", "feature")
        ),
        "output": empirical_shared_axes(
            lambda x: model.iodrop(x, 0.5), (bsz, 16, qlen), ("batch", "feature", "position")
        ),
        "positional": shared_axes(model.pos_drop.mask.shape, ("batch", "feature", "position")),
        "attention_output": shared_axes(attn.drop.mask.shape, ("batch", "feature", "position")),
        "attention_probs": shared_axes(attn.dropatt.mask.shape, ("batch", "head", "query", "key")),
        "ff_hidden": shared_axes(ff.drop1.mask.shape, ("batch", "position", "feature")),
        "ff_output": shared_axes(ff.drop2.mask.shape, ("batch", "position", "feature")),
    }
    return {"shared_axes": axes}


# -- MDEQ-Vision ----------------------------------------------------------------------------


def mdeq_config(ref: Path, yaml_name: str, overrides: list) -> object:
    from config import config as default

    cfg = default.clone()
    cfg.defrost()
    cfg.merge_from_file(str(ref / "MDEQ-Vision" / "experiments" / "cifar" / yaml_name))
    cfg.merge_from_list(overrides)
    cfg.freeze()
    return cfg


TINY_MDEQ = {
    "small": (
        "cls_mdeq_TINY.yaml",
        ["MODEL.EXTRA.FULL_STAGE.NUM_CHANNELS", [4, 8], "MODEL.EXTRA.FULL_STAGE.HEAD_CHANNELS",
         [2, 4], "MODEL.EXTRA.FULL_STAGE.FINAL_CHANSIZE", 8, "MODEL.NUM_GROUPS", 2,
         "MODEL.EXPANSION_FACTOR", 2, "MODEL.NUM_LAYERS", 3, "MODEL.DROPOUT", 0.0,
         "DEQ.F_THRES", 6, "DEQ.B_THRES", 7, "TRAIN.PRETRAIN_STEPS", 4],
    ),
    # three branches: the 1x1 injection (stage0) and a two-step downsampling fusion
    "large_jr": (
        "cls_mdeq_LARGE_reg.yaml",
        ["MODEL.EXTRA.FULL_STAGE.NUM_BRANCHES", 3, "MODEL.EXTRA.FULL_STAGE.NUM_CHANNELS",
         [4, 8, 8], "MODEL.EXTRA.FULL_STAGE.HEAD_CHANNELS", [2, 4, 4],
         "MODEL.EXTRA.FULL_STAGE.NUM_BLOCKS", [1, 1, 1], "MODEL.EXTRA.FULL_STAGE.BIG_KERNELS",
         [0, 0, 0], "MODEL.EXTRA.FULL_STAGE.FINAL_CHANSIZE", 8, "MODEL.NUM_GROUPS", 2,
         "MODEL.EXPANSION_FACTOR", 2, "MODEL.NUM_LAYERS", 3, "MODEL.DROPOUT", 0.0,
         "DEQ.F_THRES", 6, "DEQ.B_THRES", 5, "DEQ.RAND_F_THRES_DELTA", 0,
         "TRAIN.PRETRAIN_STEPS", 4, "LOSS.JAC_LOSS_FREQ", 1.0],
    ),
}  # fmt: skip


def record_mdeq(ref: Path) -> None:
    vision = ref / "MDEQ-Vision"
    sys.path[:0] = [str(vision / "lib"), str(vision / "lib" / "models"), str(ref)]
    import models  # noqa: F401  (MDEQ-Vision/lib/models: registers mdeq)
    import models.mdeq as mdeq
    from lib.solvers import anderson, broyden

    # the module the network's forward runs in (mdeq.py imports it as a top-level mdeq_core)
    core = sys.modules[mdeq.MDEQNet.__module__]

    solvers = {"anderson": anderson, "broyden": broyden}

    def build(cfg):
        model = mdeq.get_cls_net(cfg)  # builds, weight-normalizes, then init_weights()
        # a fixed iteration count for both solves, as the deqlab side runs them
        model.f_solver = functools.partial(solvers[cfg.DEQ.F_SOLVER], eps=-1.0)
        model.b_solver = functools.partial(solvers[cfg.DEQ.B_SOLVER], eps=-1.0)
        return model

    for name, (yaml_name, overrides) in TINY_MDEQ.items():
        cfg = mdeq_config(ref, yaml_name, overrides)
        jr = cfg.LOSS.JAC_LOSS_WEIGHT > 0
        torch.manual_seed(0)
        model = build(cfg).train()
        weights = state(model)
        g = torch.Generator().manual_seed(1)
        x = torch.randn(3, 3, 8, 8, generator=g)
        y = torch.randint(0, 10, (3,), generator=g)
        out = {}
        for mode, step in (("deq", 10**6), ("unrolled", 0)):
            model.zero_grad()
            probes = seeded_probes(core, 1000)
            logits, jac_loss, _ = model(x, train_step=step, compute_jac_loss=jr and mode == "deq")
            loss = nn.functional.cross_entropy(logits, y)
            total = loss + cfg.LOSS.JAC_LOSS_WEIGHT * jac_loss.mean() if jr else loss
            total.backward()
            probes.restore()
            out[mode] = {
                "logits": logits.detach().clone(),
                "loss": loss.item(),
                "jac_loss": jac_loss.mean().item(),
                "grads": grads(model),
                "bn_running": {
                    k: v.clone() for k, v in model.state_dict().items() if "running" in k
                },
            }
            model.load_state_dict(weights)  # undo the running statistics' update
        # the stop rules: the same DEQ step with the solvers' own eps (1e-3, batch-wide)
        stopped = build(cfg)
        stopped.f_solver = solvers[cfg.DEQ.F_SOLVER]
        stopped.b_solver = solvers[cfg.DEQ.B_SOLVER]
        stopped.load_state_dict(weights)
        stopped.train().zero_grad()
        logits, _, _ = stopped(x, train_step=10**6, compute_jac_loss=False)
        nn.functional.cross_entropy(logits, y).backward()
        out["stopped"] = {"logits": logits.detach().clone(), "grads": grads(stopped)}
        dynamics = mdeq_dynamics(build, cfg, core, jr)
        save(
            f"mdeq_{name}",
            {
                "config": {"yaml": yaml_name, "overrides": overrides, "cfg": cfg.dump()},
                "weights": weights,
                "x": x,
                "y": y,
                **out,
                "dynamics": dynamics,
            },
        )
    save("mdeq_init", mdeq_init_stats(ref, build))
    save("mdeq_dropout", mdeq_dropout_axes(ref, build))


class seeded_probes:
    """Seed the generator right before each Hutchinson estimate (at 1000, 1001, ...), so the
    deqlab side can draw the same probe vectors: a recording aid, the estimate is unchanged."""

    def __init__(self, core, seed: int):
        self.core, self.seed, self.original = core, seed, core.jac_loss_estimate

        def seeded(*a, **k):
            torch.manual_seed(self.seed)
            self.seed += 1
            return self.original(*a, **k)

        core.jac_loss_estimate = seeded

    def restore(self) -> None:
        self.core.jac_loss_estimate = self.original


def mdeq_dynamics(build, cfg, core, jr: bool) -> dict:
    """20 steps of cls_function.py's train(): Adam(lr, weight_decay=WD) over the parameters,
    CosineAnnealingLR(T_max=20, eta_min=1e-6) stepped after each step, train_step =
    scheduler._step_count - 1 (so the first PRETRAIN_STEPS steps run unrolled), the Jacobian
    loss on every DEQ step when regularized (JAC_LOSS_FREQ 1 here), no clipping."""
    torch.manual_seed(5)
    model = build(cfg).train()
    initial = state(model)
    opt = torch.optim.Adam(
        filter(lambda p: p.requires_grad, model.parameters()),
        lr=cfg.TRAIN.LR,
        weight_decay=cfg.TRAIN.WD,
    )
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, STEPS, eta_min=1e-6)
    g = torch.Generator().manual_seed(6)
    batches = [(torch.randn(4, 3, 8, 8, generator=g), torch.randint(0, 10, (4,), generator=g))
               for _ in range(STEPS)]  # fmt: skip
    probes = seeded_probes(core, 2000)
    curve, lrs = [], []
    for x, y in batches:
        global_steps = sched._step_count - 1
        deq_steps = global_steps - cfg.TRAIN.PRETRAIN_STEPS
        factor = (
            cfg.LOSS.PRETRAIN_JAC_LOSS_WEIGHT
            if deq_steps < 0
            else cfg.LOSS.JAC_LOSS_WEIGHT + 0.1 * (deq_steps // cfg.LOSS.JAC_INCREMENTAL)
        )
        compute_jac_loss = (torch.rand([]).item() < cfg.LOSS.JAC_LOSS_FREQ) and (factor > 0)
        logits, jac_loss, _ = model(x, train_step=global_steps, compute_jac_loss=compute_jac_loss)
        loss = nn.functional.cross_entropy(logits, y)
        opt.zero_grad()
        (loss + factor * jac_loss.mean() if factor > 0 else loss).backward()
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
        curve.append(loss.item())
    probes.restore()
    assert jr == (cfg.LOSS.JAC_LOSS_WEIGHT > 0)
    return {"initial": initial, "batches": batches, "loss": curve, "lr": lrs}


def mdeq_init_stats(ref: Path, build) -> dict:
    """Std of every effective conv / linear weight (and conv bias) at init at the published
    widths (MDEQ-small: cls_mdeq_TINY.yaml; MDEQ-large: cls_mdeq_LARGE_reg.yaml), after the
    weight-normalized layers are recomputed from g and v (fullstage._reset, as every forward)."""
    out = {}
    for name, yaml_name in (("small", "cls_mdeq_TINY.yaml"), ("large", "cls_mdeq_LARGE_reg.yaml")):
        torch.manual_seed(0)
        model = build(mdeq_config(ref, yaml_name, []))
        zs = [torch.zeros(1, c, 32 >> i, 32 >> i) for i, c in enumerate(model.num_channels)]
        model.fullstage._reset(zs)
        stats = {}
        for mod_name, module in model.named_modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                stats[f"{mod_name}.weight"] = module.weight.detach().double().std().item()
                if module.bias is not None:
                    stats[f"{mod_name}.bias"] = module.bias.detach().double().std().item()
        out[name] = stats
    return {"std": out}


def mdeq_dropout_axes(ref: Path, build) -> dict:
    cfg = mdeq_config(ref, "cls_mdeq_TINY.yaml", [])
    model = build(cfg).train()
    zs = [torch.zeros(2, c, 32 >> i, 32 >> i) for i, c in enumerate(model.num_channels)]
    model.fullstage._reset(zs)
    drop = model.fullstage.branches[0].blocks[0].drop
    return {
        "shared_axes": {
            "block": shared_axes(drop.mask.shape, ("batch", "channel", "height", "width"))
        }
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("reference", type=Path, help=f"a checkout of {REFERENCE}")
    parser.add_argument("--only", choices=("lm", "mdeq"), help="record one family (internal)")
    args = parser.parse_args()
    ref = args.reference.resolve()
    head = subprocess.run(
        ["git", "-C", str(ref), "rev-parse", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    if head != REFERENCE_COMMIT:
        sys.exit(f"{ref} is at {head or 'no git commit'}; check out {REFERENCE_COMMIT}")
    if args.only is None:  # each family in its own process: both name a top-level `utils`
        for family in ("lm", "mdeq"):
            subprocess.run([sys.executable, __file__, str(ref), "--only", family], check=True)
        return
    patch_torch()
    torch.set_default_dtype(torch.float64)
    (record_lm if args.only == "lm" else record_mdeq)(ref)


if __name__ == "__main__":
    main()
