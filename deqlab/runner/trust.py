"""Opening a run folder runs no code that deqlab did not write.

A saved ``config_resolved.yaml`` names classes to build (``_target_``); a run folder from a
colleague or a paper's download could name anything (``torch.load`` of a payload,
``os.system``). :func:`check_targets` lets through only targets from the packages the config
tree itself uses, at every nesting level, and checks what a name resolves to, not only how
it is spelled (``deqlab.runner.files.torch.load`` is ``torch.load``), importing nothing from
outside those packages. ``deqlab analyze --trust-config`` / ``deqlab generate
--trust-config`` skip the check for a folder you trust (your own runs with your own tasks).
"""

from __future__ import annotations

import inspect
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from .refusal import Refusal

# The packages whose classes and functions the config tree builds (conf/**.yaml): deqlab and
# its tasks, torch's optimizers, Lightning's trainer, callbacks, loggers and profilers.
ALLOWED = (
    "deqlab.",
    "torch.optim.",
    "lightning.Trainer",
    "lightning.pytorch.Trainer",
    "lightning.pytorch.trainer.",
    "lightning.pytorch.callbacks.",
    "lightning.pytorch.loggers.",
    "lightning.pytorch.profilers.",
)


class UntrustedTarget(Refusal, ValueError):
    """A config names something outside :data:`ALLOWED` to build."""


def _allowed(name: str) -> bool:
    return any(name == a.rstrip(".") or name.startswith(a) for a in ALLOWED)


def check_target(target: str, where: str, source: str) -> None:
    """Refuse ``target`` (at config key ``where`` of ``source``) unless it names, and resolves
    to, a class or function of :data:`ALLOWED`."""
    from hydra._internal.utils import _locate

    def refuse(why: str) -> UntrustedTarget:
        return UntrustedTarget(
            f"{source}: {where}._target_={target!r} {why}; deqlab builds only classes of "
            f"deqlab, torch.optim and Lightning from a saved config, so that opening a run "
            "folder runs no code you did not write. If you trust this folder (your own run, "
            "with your own task package), pass --trust-config"
        )

    if not isinstance(target, str) or not _allowed(target):
        raise refuse("is not on the allow-list")
    try:
        obj = _locate(target)
    except Exception as e:
        raise refuse(f"cannot be found ({e})") from None
    module = getattr(obj, "__module__", None) or ""
    if not (inspect.isclass(obj) or inspect.isfunction(obj)) or not _allowed(module + "."):
        raise refuse(f"resolves to {module or type(obj).__name__}, outside the allow-list")


def check_targets(cfg: Any, source: str, where: str = "") -> None:
    """:func:`check_target` on every ``_target_`` in ``cfg``, at every nesting level."""
    if isinstance(cfg, (DictConfig, dict)):
        items = cfg.items_ex(resolve=False) if isinstance(cfg, DictConfig) else cfg.items()
        for key, value in items:
            if key == "_target_":
                check_target(value, where or "<root>", source)
            else:
                check_targets(value, source, f"{where}.{key}" if where else str(key))
    elif isinstance(cfg, (ListConfig, list, tuple)):
        for i, value in enumerate(cfg):
            check_targets(value, source, f"{where}[{i}]")


def trusted_config(cfg: Any, source: str, trust: bool = False) -> Any:
    """``cfg`` after :func:`check_targets` (skipped with ``trust``)."""
    if not trust:
        container = OmegaConf.to_container(cfg, resolve=False) if OmegaConf.is_config(cfg) else cfg
        check_targets(container, source)
    return cfg
