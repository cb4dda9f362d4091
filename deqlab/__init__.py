"""deqlab: Deep Equilibrium models in PyTorch.

The engine is this package (minus :mod:`deqlab.runner`, the Lightning/Hydra/W&B runner, and
:mod:`deqlab.tasks`), pure PyTorch: importing it loads none of them.

    from deqlab import DEQ
    deq = DEQ(solver={"name": "anderson", "max_iter": 30}, grad={"name": "ift"})
    z_star, info = deq(lambda z: cell(z, x), torch.zeros_like(x))
"""

from .bound import Bound
from .core import DEQ, Core, CoreConfig, DEQInfo, SlicedDEQ, build_core, register_core
from .dropout import (
    VariationalDropout,
    VariationalDropout1d,
    VariationalDropout2d,
    VariationalDropout3d,
    VariationalTokenDropout,
    reset_dropout,
)
from .grad import DivergenceWarning, GradConfig, GradMode, register_grad
from .initial_state import InitConfig, mixed_init, zeros_init
from .norm import NormConfig, apply_norm, register_norm, register_norm_module, remove_norm
from .regularize import fp_correction, jacobian_loss, spectral_radius
from .solvers import SolverConfig, SolverResult, get_solver, register_solver

__all__ = [
    "DEQ",
    "Bound",
    "Core",
    "CoreConfig",
    "DEQInfo",
    "DivergenceWarning",
    "GradConfig",
    "GradMode",
    "InitConfig",
    "NormConfig",
    "SlicedDEQ",
    "SolverConfig",
    "SolverResult",
    "VariationalDropout",
    "VariationalDropout1d",
    "VariationalDropout2d",
    "VariationalDropout3d",
    "VariationalTokenDropout",
    "apply_norm",
    "build_core",
    "fp_correction",
    "get_solver",
    "jacobian_loss",
    "mixed_init",
    "register_core",
    "register_grad",
    "register_norm",
    "register_norm_module",
    "register_solver",
    "remove_norm",
    "reset_dropout",
    "spectral_radius",
    "zeros_init",
]
