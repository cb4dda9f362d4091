"""The benchmarks. Each returns rows of measurements taken side by side in one process.

Every timing is the median of ``repeats`` runs after a warm-up, with min and max kept; on a GPU
the device is synchronised around each run. Ratios compare runs made in the same process.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from deqlab import DEQ, Bound, build_core, get_solver
from deqlab.solvers import solver_options
from deqlab.solvers.capture import CapturedSolver, check_capturable

from .baseline import TutorialDEQFixedPoint
from .cells import resnet_problem, tanh_problem, tutorial_model

# The training-step variants that are not deqlab's: the ratios are taken against the best.
REFERENCES = ("torchdeq ift", "tutorial ift")

SOLVER_PAIRS = {"fixed_point": "fixed_point_iter", "anderson": "anderson", "broyden": "broyden"}


def timed(
    fn: Callable[[], Any], device: torch.device, repeats: int, warmup: int = 1
) -> dict[str, float]:
    """Median / min / max seconds of ``fn()`` over ``repeats`` runs."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return {"median": statistics.median(times), "min": min(times), "max": max(times)}


def timed_round_robin(
    fns: dict[str, Callable[[], Any]], device: torch.device, repeats: int, warmup: int = 2
) -> dict[str, dict[str, float]]:
    """Like ``timed`` for several functions, run in turns (A B C A B C ...) after warming all
    of them up, so drift in the machine's speed does not favour whichever runs first."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - t0)
    return {
        n: {"median": statistics.median(t), "min": min(t), "max": max(t)} for n, t in times.items()
    }


def cuda_graph(fn: Callable[[], Any]) -> Callable[[], None]:
    """``fn`` recorded as one CUDA graph (after a warm-up on a side stream): its replay."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def peak_memory_mb(fn: Callable[[], Any], device: torch.device) -> float | None:
    """CUDA memory allocated at the peak of one ``fn()`` above what was allocated before."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def _torchdeq():
    try:
        import torchdeq
        from torchdeq.solver import get_solver as td_get_solver
    except ImportError:  # the dev extra is not installed
        return None, None
    return torchdeq, td_get_solver


# -- 1. solver overhead ---------------------------------------------------------------------


def history_products(name: str, z0: Tensor, iters: int) -> Callable[[], None] | None:
    """The products with stored history that ``name`` makes in ``iters`` iterations at its
    default settings, alone, by the solver module's own ``history_products``; ``None`` for
    solvers without history. No implementation of the algorithm goes below f plus these."""
    from deqlab.solvers.anderson import history_products as anderson_products
    from deqlab.solvers.broyden import history_products as broyden_products

    x = z0.reshape(z0.shape[0], -1)
    defaults = solver_options(name)
    if name == "anderson":
        return anderson_products(x, iters, m=defaults["m"])
    if name == "broyden":
        return broyden_products(x, iters, memory=defaults["memory"])
    return None


def solver_overhead(
    device: torch.device, repeats: int, iters: int = 20, compile: bool = False
) -> list[dict[str, Any]]:
    """Time of ``iters`` solver iterations over the time of ``iters`` plain chained f
    evaluations (z <- f(z), the floor), all timed in turns in one process. ``compile`` adds
    fixed-iteration solves under ``torch.compile`` (compiled during the warm-up)."""
    _, td_get_solver = _torchdeq()
    rows = []
    for cell_name, make in (("resnet", resnet_problem), ("tanh", tanh_problem)):
        cell, x = make(device)
        f = lambda z: cell(z, x)
        z0 = torch.zeros_like(x)

        def plain(f=f, z0=z0):
            z = z0
            for _ in range(iters):
                z = f(z)

        fns: dict[str, Callable[[], Any]] = {"f": plain}
        if device.type == "cuda":  # the floor without launch costs: the chain as one graph
            with torch.no_grad():
                fns["f_graph"] = cuda_graph(plain)
        for name, td_name in SOLVER_PAIRS.items():
            solve = get_solver(name)
            # tol out of reach: the convergence test runs (one sync per step), never stops.
            fns[f"deqlab/{name}"] = lambda solve=solve, f=f, z0=z0: solve(
                f, z0, max_iter=iters, tol=1e-30
            )
            fns[f"fixed/{name}"] = lambda solve=solve, f=f, z0=z0: solve(
                f, z0, max_iter=iters, tol=None
            )
            if compile:
                fns[f"compiled/{name}"] = torch.compile(
                    lambda solve=solve, f=f, z0=z0: solve(f, z0, max_iter=iters, tol=None).z
                )
            if device.type == "cuda":
                # replayed as CUDA graphs: the test read back every 5 steps (never met), and
                # the fixed budget (one graph, no read)
                cap = CapturedSolver(solve, name)
                fns[f"captured/{name}"] = lambda cap=cap, cell=cell, x=x, z0=z0: cap(
                    Bound(cell, x), z0, max_iter=iters, tol=1e-30, check_every=5
                )
                fns[f"captured_fixed/{name}"] = lambda cap=cap, cell=cell, x=x, z0=z0: cap(
                    Bound(cell, x), z0, max_iter=iters, tol=None
                )
            products = history_products(name, z0, iters)
            if products is not None:
                fns[f"history/{name}"] = products
            if td_get_solver is not None:
                td = td_get_solver(td_name)
                fns[f"torchdeq/{name}"] = lambda td=td, f=f, z0=z0: td(
                    f, z0, max_iter=iters, tol=1e-30, stop_mode="rel"
                )
        errors = {}
        with torch.no_grad():
            for key in [k for k in fns if k.startswith("captured")]:
                try:  # records the graphs; a failure is reported, not fatal to the table
                    fns[key]()
                except Exception as err:
                    errors[key.split("/")[1]] = f"{type(err).__name__}: {err}"[:120]
                    del fns[key]
            times = timed_round_robin(fns, device, repeats)
        floor = times["f"]["median"]
        for name in SOLVER_PAIRS:
            row = {
                "bench": "solver_overhead",
                "cell": cell_name,
                "solver": name,
                "f_eval_s": floor / iters,
            }
            # f plus the history products alone: what the algorithm itself costs.
            products = times.get(f"history/{name}")
            row["history_floor"] = 1.0 + (products["median"] / floor if products else 0.0)
            keys = {"fixed": "deqlab_fixed_iters", "compiled": "deqlab_compiled"}
            for lib in ("deqlab", "fixed", "compiled", "captured", "captured_fixed", "torchdeq"):
                t = times.get(f"{lib}/{name}")
                if t is not None:
                    key = keys.get(lib, lib)
                    row[key] = t["median"] / floor
                    if lib in ("deqlab", "torchdeq"):
                        row[f"{key}_range"] = [t["min"] / floor, t["max"] / floor]
            if "f_graph" in times:
                row["f_graph"] = times["f_graph"]["median"] / floor
            if name in errors:
                row["captured_error"] = errors[name]
            if "captured" in row and "torchdeq" in row:
                # microseconds per iteration above the plain f chain: the solver's own cost
                row["overhead_us_deqlab"] = (row["deqlab"] - 1) * floor / iters * 1e6
                row["overhead_us_captured"] = (row["captured"] - 1) * floor / iters * 1e6
                row["overhead_us_torchdeq"] = (row["torchdeq"] - 1) * floor / iters * 1e6
            rows.append(row)
    return rows


# -- 2. convergence -------------------------------------------------------------------------


def _first_below(trace: list[float], level: float) -> int | None:
    return next((i + 1 for i, r in enumerate(trace) if r <= level), None)


def residual_probe(f: Callable[[Tensor], Tensor]) -> tuple[Callable[[Tensor], Tensor], list[float]]:
    """f, recording at each call the batch-mean relative residual of the point it is called
    at: a solver-independent account of what every f evaluation bought (libraries differ in
    how their own traces line up with evaluations)."""
    trace: list[float] = []

    def probed(z: Tensor) -> Tensor:
        fz = f(z)
        diff = (fz - z).flatten(1).norm(dim=1)
        trace.append(float((diff / (fz.flatten(1).norm(dim=1) + 1e-9)).mean()))
        return fz

    return probed, trace


def convergence(
    device: torch.device, max_iter: int = 60
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """f evaluations until the solver first evaluates f at a point of relative residual
    <= 1e-3 and <= 1e-5 (batch mean), same settings in both libraries (Anderson m=5)."""
    _, td_get_solver = _torchdeq()
    rows, traces = [], {}
    torch.manual_seed(0)  # the same cells whichever benchmarks ran before in this process
    for cell_name, make in (("resnet", resnet_problem), ("tanh", tanh_problem)):
        cell, x = make(device)
        f = lambda z: cell(z, x)
        z0 = torch.zeros_like(x)
        with torch.no_grad():
            for name, td_name in SOLVER_PAIRS.items():
                opts = {"m": 5} if name == "anderson" else {}
                row = {"bench": "convergence", "cell": cell_name, "solver": name}
                runs = [
                    (
                        "deqlab",
                        lambda g, name=name, opts=opts: get_solver(name)(
                            g, z0, max_iter=max_iter, tol=1e-7, **opts
                        ),
                    )
                ]
                if td_get_solver is not None:
                    td = td_get_solver(td_name)
                    runs.append(
                        (
                            "torchdeq",
                            lambda g, td=td, opts=opts: td(
                                g, z0, max_iter=max_iter, tol=1e-7, stop_mode="rel", **opts
                            ),
                        )
                    )
                for lib, solve in runs:
                    probed, trace = residual_probe(f)
                    solve(probed)
                    traces[f"{cell_name}/{name}/{lib}"] = trace
                    for level in (1e-3, 1e-5):
                        row[f"{lib}_nfe@{level:g}"] = _first_below(trace, level)
                rows.append(row)
    return rows, traces


def plot_convergence(traces: dict[str, list[float]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, cell in zip(axes, ("resnet", "tanh")):
        for key, trace in traces.items():
            c, solver, lib = key.split("/")
            if c == cell:
                ax.semilogy(
                    range(1, len(trace) + 1),
                    trace,
                    ls="-" if lib == "deqlab" else "--",
                    label=f"{solver} ({lib})",
                )
        ax.set_title(f"{cell} cell")
        ax.set_xlabel("f evaluations")
        ax.set_ylabel("relative residual (batch mean)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- 3. training step -----------------------------------------------------------------------


class _Model(nn.Module):
    """The tutorial CIFAR model around an interchangeable DEQ layer ``layer(cell, u) -> z``."""

    def __init__(self, device: torch.device, layer: Callable[[nn.Module, Tensor], Tensor]):
        super().__init__()
        torch.manual_seed(0)
        self.net = tutorial_model(device)
        self.layer = layer

    def forward(self, x: Tensor) -> Tensor:
        u, _ = self.net.inject(x)
        return self.net.head(self.layer(self.net.cell, u))


def training_step(
    device: torch.device,
    repeats: int,
    iters: int = 20,
    batch: int = 64,
    dtype: torch.dtype | None = None,
) -> list[dict[str, Any]]:
    """Forward + backward of the tutorial model, Anderson (m=5) forward and backward with the
    same fixed budgets in every library (tolerance out of reach), so all do equal work."""
    torchdeq, _ = _torchdeq()
    x = torch.randn(batch, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    budget = {"max_iter": iters, "tol": 1e-30}
    variants: dict[str, Callable[[nn.Module, Tensor], Tensor]] = {}
    for grad in ("ift", "phantom", "onestep"):
        deq = DEQ(
            solver={"name": "anderson", "m": 5, **budget},
            grad={"name": grad, "solver": "anderson", **budget, "steps": 5},
        )
        variants[f"deqlab {grad}"] = lambda cell, u, deq=deq: deq(
            lambda z: cell(z, u), torch.zeros_like(u)
        )[0]
    if device.type == "cuda":  # the forward solve replayed as CUDA graphs (one read per 5 steps)
        deq = DEQ(
            solver={"name": "anderson", "m": 5, **budget, "capture": True, "check_every": 5},
            grad={"name": "ift", "solver": "anderson", **budget},
        )
        variants["deqlab ift captured"] = lambda cell, u, deq=deq: deq(
            Bound(cell, u), torch.zeros_like(u)
        )[0]
    # the other cores on the same ift step: sliced (one segment, the same work as indexing)
    # and TorchDEQ behind deqlab's core interface (the adapter's overhead over the raw call)
    solver_cfg = {"name": "anderson", "m": 5, **budget}
    grad_cfg = {"name": "ift", "solver": "anderson", **budget}
    cores = {"core=sliced ift": {"name": "sliced"}}
    if torchdeq is not None:
        cores["core=torchdeq ift"] = {"name": "torchdeq"}
    for name, core in cores.items():
        deq = build_core(core, solver_cfg, grad_cfg)
        variants[f"deqlab {name}"] = lambda cell, u, deq=deq: deq(
            lambda z: cell(z, u), torch.zeros_like(u)
        )[0]
    if torchdeq is not None:
        td = torchdeq.get_deq(
            f_solver="anderson",
            f_max_iter=iters,
            f_tol=1e-30,
            b_solver="anderson",
            b_max_iter=iters,
            b_tol=1e-30,
            f_stop_mode="rel",
            b_stop_mode="rel",
            ift=True,
        )
        variants["torchdeq ift"] = lambda cell, u: td(lambda z: cell(z, u), torch.zeros_like(u))[0][
            -1
        ]

    def tutorial(cell, u):
        layer = TutorialDEQFixedPoint(cell, m=5, max_iter=iters, tol=1e-30)
        return layer(u)

    variants["tutorial ift"] = tutorial
    rows, steps = [], {}
    for name, layer in variants.items():
        model = _Model(device, layer)

        def step(model=model):
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()

        row = {"bench": "training_step", "variant": name, "dtype": str(dtype or "float32")}
        try:
            step()
            steps[name] = step
        except Exception as err:  # e.g. a reference without bf16 support
            row.update(seconds=None, error=str(err).splitlines()[0][:80])
        rows.append(row)
    times = timed_round_robin(steps, device, repeats)
    for row in rows:
        if row["variant"] in times:
            t = times[row["variant"]]
            row.update(seconds=t["median"], range=[t["min"], t["max"]])
            if device.type == "cuda":
                row["peak_MB"] = peak_memory_mb(steps[row["variant"]], device)
    refs = [r["seconds"] for r in rows if r["variant"] in REFERENCES and r["seconds"]]
    for r in rows:
        r["vs_best_reference"] = r["seconds"] / min(refs) if refs and r["seconds"] else None
    return rows


def model_step(
    device: torch.device,
    repeats: int,
    experiments: tuple[str, ...] = ("cifar_tutorial", "cifar_mdeq_small"),
) -> list[dict[str, Any]]:
    """Forward + backward of the published CIFAR models as their experiment files build them
    (batch, solver, gradient, normalization), in fp32 and under bf16 autocast, with the
    tolerances set out of reach so every variant spends the same f evaluations (the
    experiment's forward and backward budgets); on CUDA also with the forward solve captured
    (skipped where the model draws dropout masks inside the solve). Images/s and peak memory."""
    import hydra.utils

    from deqlab.dropout import reset_dropout
    from deqlab.runner.config import compose

    rows, steps = [], {}
    for exp in experiments:
        for precision in ("fp32", "bf16"):
            for captured in (False, True) if device.type == "cuda" else (False,):
                overrides = [f"experiment={exp}", "solver.tol=null", "grad.tol=null"]
                overrides += ["task.module.fit.pretrain_steps=0"]
                if captured:
                    overrides += ["solver.capture=true"]
                cfg = compose(overrides, "/tmp/deqlab-bench")
                torch.manual_seed(0)
                module = hydra.utils.instantiate(cfg.task.module).to(device).train()
                if captured:
                    try:
                        check_capturable(module.net.cell)
                    except ValueError:  # variational dropout inside the cell
                        continue
                batch = cfg.task.datamodule.batch_size
                x = torch.randn(batch, 3, 32, 32, device=device)
                y = torch.randint(0, 10, (batch,), device=device)
                dtype = torch.bfloat16 if precision == "bf16" else None

                def step(module=module, x=x, y=y, dtype=dtype):
                    reset_dropout(module)
                    with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                        outputs, _ = module(x)
                        loss = module.criterion(outputs[-1].float(), y)
                    loss.backward()

                name = f"{exp} {precision}" + (" captured" if captured else "")
                row = {
                    "bench": "model_step",
                    "variant": name,
                    "batch": batch,
                    "fwd_bwd_nfe": f"{cfg.solver.max_iter}+{cfg.grad.max_iter}",
                }
                rows.append(row)
                try:
                    step()
                    steps[name] = step
                except Exception as err:  # reported in the table
                    row["error"] = f"{type(err).__name__}: {err}"[:120]
    times = timed_round_robin(steps, device, repeats)
    for row in rows:
        if row["variant"] not in times:
            continue
        t = times[row["variant"]]
        row.update(seconds=t["median"], images_per_s=row["batch"] / t["median"])
        row["peak_MB"] = peak_memory_mb(steps[row["variant"]], device)
        fp32 = next(r for r in rows if r["variant"] == row["variant"].split()[0] + " fp32")
        row["vs_fp32"] = fp32["seconds"] / row["seconds"] if "seconds" in fp32 else None
    return rows


# -- 4. memory ------------------------------------------------------------------------------


class SavedBytes:
    """Bytes of distinct tensor storages autograd saves for backward inside the context."""

    def __init__(self):
        self.seen: dict[int, int] = {}

    def __enter__(self):
        def pack(t: Tensor) -> Tensor:
            self.seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        self._ctx = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        self._ctx.__exit__(*exc)

    @property
    def total(self) -> int:
        return sum(self.seen.values())


def memory(device: torch.device, batch: int = 32) -> list[dict[str, Any]]:
    """Activation memory of one training step vs forward budget, and vs a 30-step unrolled
    network. Measured as bytes autograd saves (on any device) and, on CUDA, peak allocation."""
    rows = []
    x = torch.randn(batch, 3, 32, 32, device=device)

    def measure(name: str, layer: Callable[[nn.Module, Tensor], Tensor]) -> None:
        model = _Model(device, layer)
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        with SavedBytes() as saved:
            loss = model(x).sum()
        loss.backward()
        row = {"bench": "memory", "variant": name, "saved_MB": saved.total / 2**20}
        if device.type == "cuda":
            torch.cuda.synchronize()
            row["peak_MB"] = (torch.cuda.max_memory_allocated() - base) / 2**20
        rows.append(row)

    for budget in (10, 30, 60):
        deq = DEQ(
            solver={"name": "anderson", "max_iter": budget, "tol": 1e-30},
            grad={"max_iter": 20, "tol": 1e-30},
        )
        measure(
            f"deqlab ift, forward budget {budget}",
            lambda cell, u, deq=deq: deq(lambda z: cell(z, u), torch.zeros_like(u))[0],
        )

    def unrolled(cell, u):
        z = torch.zeros_like(u)
        for _ in range(30):
            z = cell(z, u)
        return z

    measure("unrolled 30 steps, backprop", unrolled)
    return rows


def lm_memory(
    device: torch.device,
    batch: int = 1,
    width: dict[str, int] | None = None,
    tgt_len: int = 150,
    mem_len: int = 150,
    depth: int = 18,
    budget: int = 30,
) -> list[dict[str, Any]]:
    """The DEQ slides' memory claim (DEQ-Transformer medium, adaptive embeddings: 3.7 GB;
    Transformer-XL medium, 18 layers: 9.0 GB) at one width and segment: activation bytes
    autograd keeps for one training step of the DEQ-Transformer layer (ift) against the same
    layer unrolled ``depth`` times with backprop (the activations of a weight-untied
    Transformer-XL of that depth: untying changes parameters, not activations) and unrolled
    for the DEQ's forward ``budget``. Parameter storages are left out; ``param_MB`` is the
    layers' float32 parameters (the untied stack has ``depth`` copies; gradients and Adam's
    moments triple that again). Default width: the medium model's (d_model 700, 10 x 70 heads, d_inner
    48000), segment 150 with memory 150; bytes are linear in ``batch``."""
    from torch.nn.utils import parametrize

    from deqlab.tasks.lm.model import DEQTransformerLM

    width = width or {"d_model": 700, "n_head": 10, "d_head": 70, "d_inner": 48000}
    torch.manual_seed(0)
    # No weight norm here: its normalized weights are computed once per step and saved, which
    # an untied stack would do once per layer; without it every saved byte is an activation.
    net = DEQTransformerLM(1000, **width, dropout=0.0, emb_dropout=0.0).to(device)
    d, du = width["d_model"], 3 * width["n_head"] * width["d_head"]
    mem = (
        torch.randn(batch, mem_len, d, device=device),
        torch.randn(batch, mem_len, du, device=device),
    )
    x = torch.randint(0, 1000, (batch, tgt_len), device=device)
    with torch.no_grad():
        ctx, z0 = net.inject(x, mem)
    params = {p.untyped_storage().data_ptr() for p in net.parameters()}
    cell_params = sum(p.numel() for p in net.cell.parameters())
    f = lambda z: net.cell(z, ctx)

    def deq_step(max_iter: int) -> Callable[[], Tensor]:
        deq = DEQ({"name": "anderson", "max_iter": max_iter, "tol": None}, {"name": "ift"})
        return lambda: deq(f, z0)[0]

    def unrolled(n: int) -> Callable[[], Tensor]:
        def run() -> Tensor:
            z = z0
            for _ in range(n):
                z = f(z)
            return z

        return run

    variants = [
        ("DEQ-Transformer, ift (forward budget 2)", deq_step(2), 1),
        ("DEQ-Transformer, ift (forward budget 6)", deq_step(6), 1),
        (f"Transformer-XL, {depth} untied layers", unrolled(depth), depth),
        (f"DEQ unrolled for its budget ({budget}), backprop", unrolled(budget), 1),
    ]
    rows = []
    for name, step, copies in variants:
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        with parametrize.cached(), SavedBytes() as saved:
            out = step()
        row = {
            "bench": "lm_memory",
            "variant": name,
            "activation_MB": sum(b for p, b in saved.seen.items() if p not in params) / 2**20,
            "param_MB": copies * cell_params * 4 / 2**20,
        }
        if device.type == "cuda":
            torch.cuda.synchronize()
            row["peak_MB"] = (torch.cuda.max_memory_allocated() - base) / 2**20
        rows.append(row)
        del out
    txl = rows[2]["activation_MB"]
    for r in rows:
        r["vs_transformer_xl"] = r["activation_MB"] / txl
    return rows


# -- 5. end to end --------------------------------------------------------------------------


class _Throughput:
    """Lightning callback: wall time and items (images or tokens) of training steps after
    ``warmup`` steps."""

    def __new__(cls, warmup: int, device: torch.device):
        from lightning.pytorch.callbacks import Callback

        class Throughput(Callback):
            def __init__(self):
                self.items, self.seconds, self.steps = 0, 0.0, 0
                self.nfe: list[float] = []  # forward f evaluations per measured step

            def on_train_batch_start(self, trainer, module, batch, batch_idx):
                if device.type == "cuda":
                    torch.cuda.synchronize()
                self.t0 = time.perf_counter()

            def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
                if device.type == "cuda":
                    torch.cuda.synchronize()
                self.steps += 1
                if self.steps > warmup:
                    self.seconds += time.perf_counter() - self.t0
                    self.items += batch[1].numel()
                    info = outputs.get("info") if isinstance(outputs, dict) else None
                    if info is not None:
                        self.nfe.append(info.nfe)

        return Throughput()


def end_to_end(device: torch.device, data_dir: str, steps: int = 30) -> list[dict[str, Any]]:
    """Training throughput through the real runner (config, DataModule, LightningModule,
    Trainer): images/s of the CPU CIFAR experiment and tokens/s of the CPU PTB experiment."""
    import hydra.utils
    import lightning as L

    from deqlab.runner.config import compose

    trainer_kind = "gpu" if device.type == "cuda" else "cpu"
    rows = []
    runs = [
        ("cifar_cpu", ["experiment=cifar_cpu"], "images/s"),
        ("cifar_cpu core=sliced", ["experiment=cifar_cpu", "core=sliced"], "images/s"),
        ("ptb_deq_transformer_cpu", ["experiment=ptb_deq_transformer_cpu"], "tokens/s"),
    ]
    if _torchdeq()[0] is not None:
        runs.insert(
            2, ("cifar_cpu core=torchdeq", ["experiment=cifar_cpu", "core=torchdeq"], "images/s")
        )
    if device.type == "cuda":  # the published experiments, as a GPU runs them
        tutorial = ["experiment=cifar_tutorial"]
        bf16 = ["trainer.precision=bf16-mixed"]
        capture = ["solver.capture=true", "solver.check_every=5"]
        mdeq = ["experiment=cifar_mdeq_small", "task.module.fit.pretrain_steps=0"]
        runs = [
            ("cifar_tutorial", tutorial, "images/s"),
            ("cifar_tutorial bf16", [*tutorial, *bf16], "images/s"),
            ("cifar_tutorial captured", [*tutorial, *capture], "images/s"),
            ("cifar_tutorial bf16 captured", [*tutorial, *bf16, *capture], "images/s"),
            ("cifar_mdeq_small", mdeq, "images/s"),
            ("cifar_mdeq_small bf16", [*mdeq, *bf16], "images/s"),
            ("ptb_deq_transformer_cpu", ["experiment=ptb_deq_transformer_cpu"], "tokens/s"),
            ("ptb_deq_transformer_cpu bf16", ["experiment=ptb_deq_transformer_cpu", *bf16], "tokens/s"),
        ]  # fmt: skip
    for name, overrides, unit in runs:
        cfg = compose(
            [*overrides, f"paths.data_dir={data_dir}", f"trainer={trainer_kind}"],
            "/tmp/deqlab-bench",
        )
        L.seed_everything(0, verbose=False)
        datamodule = hydra.utils.instantiate(cfg.task.datamodule)
        module = hydra.utils.instantiate(cfg.task.module)
        meter = _Throughput(warmup=3, device=device)
        trainer = hydra.utils.instantiate(
            cfg.trainer, max_steps=steps + 3, limit_val_batches=0, num_sanity_val_steps=0,
            logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, callbacks=[meter],
        )  # fmt: skip
        try:
            trainer.fit(module, datamodule)
        except Exception as err:  # one failing run does not end the table
            rows.append({"bench": "end_to_end", "experiment": name, "error": str(err)[:120]})
            continue
        row = {
            "bench": "end_to_end",
            "experiment": name,
            "unit": unit,
            "throughput": meter.items / meter.seconds,
            "steps": meter.steps - 3,
            "mean_fwd_nfe": sum(meter.nfe) / len(meter.nfe) if meter.nfe else None,
        }
        rows.append(row)
    return rows


# -- 6. the tutorial's recipe, against the tutorial's own code --------------------------------


def tutorial_recipe(
    device: torch.device, data_dir: str, steps: int = 20, test_images: int = 1000
) -> list[dict[str, Any]]:
    """``experiment=cifar_tutorial`` through the runner against the tutorial's own
    implementation (benchmarks/baseline.py: its Anderson and hook-based backward, tol 1e-2,
    25 iterations, m=5, its batch-level stop rule) in the tutorial's plain training loop, both
    from the same initial weights on the same real CIFAR-10 batches for ``steps`` steps
    (Adam 1e-3, cosine over the steps): training seconds, solver iterations and test accuracy
    on the first ``test_images`` of the (class-stratified) test split."""
    import hydra.utils
    import lightning as L

    from deqlab.runner.config import compose

    cfg = compose(
        [
            "experiment=cifar_tutorial",
            f"paths.data_dir={data_dir}",
            "trainer=" + ("gpu" if device.type == "cuda" else "cpu"),
        ],
        "/tmp/deqlab-bench",
    )
    L.seed_everything(0, verbose=False)
    datamodule = hydra.utils.instantiate(cfg.task.datamodule)
    datamodule.setup("fit")
    module = hydra.utils.instantiate(cfg.task.module)
    start = {k: v.clone() for k, v in module.net.state_dict().items()}
    test = [(x.to(device), y.to(device)) for x, y in datamodule.test_dataloader()]
    test = _first_images(test, test_images)

    def accuracy(predict: Callable[[Tensor], Tensor]) -> float:
        with torch.no_grad():
            right = sum(int((predict(x).argmax(1) == y).sum()) for x, y in test)
        return right / sum(len(y) for _, y in test)

    rows = []
    # deqlab: the runner's module and Trainer, validation off
    meter = _Throughput(warmup=0, device=device)
    trainer = hydra.utils.instantiate(
        cfg.trainer, max_steps=steps, limit_val_batches=0, num_sanity_val_steps=0, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, callbacks=[meter],
    )  # fmt: skip
    nfe: list[float] = []

    class Iterations(L.Callback):
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            nfe.append(outputs["info"].nfe)

    trainer.callbacks.append(Iterations())
    trainer.fit(module, datamodule)
    module.eval()
    rows.append(
        {
            "bench": "tutorial_recipe",
            "variant": "deqlab experiment=cifar_tutorial",
            "steps": meter.steps,
            "train_s": meter.seconds,
            "mean_fwd_nfe": sum(nfe) / len(nfe),
            "test_acc": accuracy(lambda x: module(x.to(module.device))[0][-1]),
        }
    )
    # the tutorial: the same network and initial weights, its DEQ layer and training loop
    net = hydra.utils.instantiate(cfg.task.module.net).to(device)
    net.load_state_dict(start)
    layer = TutorialDEQFixedPoint(net.cell, m=5, max_iter=25, tol=1e-2)
    model = lambda x: net.head(layer(net.inject(x)[0]))
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps, eta_min=1e-6)
    datamodule.train_loader = None  # a fresh pass over the same order
    loader = datamodule.make_train_loader()
    net.train()
    seconds, iterations = 0.0, []
    for step, (x, y) in enumerate(loader):
        if step == steps:
            break
        x, y = x.to(device), y.to(device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        sched.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds += time.perf_counter() - t0
        iterations.append(len(layer.forward_res) + 2)  # its loop starts with 2 evaluations
    net.eval()
    rows.append(
        {
            "bench": "tutorial_recipe",
            "variant": "tutorial (benchmarks/baseline.py)",
            "steps": len(iterations),
            "train_s": seconds,
            "mean_fwd_nfe": sum(iterations) / len(iterations),
            "test_acc": accuracy(model),
        }
    )
    base = rows[-1]["train_s"]
    for r in rows:
        r["time_vs_tutorial"] = r["train_s"] / base
    return rows


def _first_images(batches: list[tuple[Tensor, Tensor]], n: int) -> list[tuple[Tensor, Tensor]]:
    out, left = [], n
    for x, y in batches:
        if left <= 0:
            break
        out.append((x[:left], y[:left]))
        left -= len(y)
    return out
