"""Checkpoints that survive a kill, that never run code, and the checks before one is trusted.

- :class:`AtomicCheckpointIO` writes every checkpoint to a temporary name and renames it, so
  ``last.ckpt`` is always the previous complete checkpoint or the new complete one, never a
  truncated file, whenever the process is killed; and reads every checkpoint Lightning
  restores through :func:`read_checkpoint` (tensors and plain containers only).
- :func:`resolve_checkpoint` turns ``ckpt_path`` (a file, or ``last`` for the run folder's own
  ``checkpoints/last.ckpt``) into an existing, readable file, or fails before any work with a
  message that says what to do.
- :func:`check_compatible` refuses, in one line, a checkpoint whose network is not this run's
  (another task, other widths, another normalization).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from .files import load_tensors, save_atomic
from .refusal import InputNotFound, Refusal


class CheckpointError(Refusal, ValueError):
    """A checkpoint that cannot be used for this run; the message says why and what to do."""


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer, made atomic for local files (write, fsync, rename), and
    its reader, made safe: whatever the environment or the torch version says, a checkpoint
    is loaded as tensors and plain containers (:func:`read_checkpoint`)."""

    def load_checkpoint(
        self, path: str | Path, map_location: Any | None = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        return read_checkpoint(local_file(path, "ckpt_path"))

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None or "://" in str(path):  # remote storage: Lightning's own
            return super().save_checkpoint(checkpoint, path, storage_options)
        save_atomic(checkpoint, path)  # creates the folder


def local_file(path: str | Path, key: str) -> Path:
    """``path`` as a local file path; a URL (``https://...``, ``s3://...``) is refused by name
    (a path would mangle it to ``https:/...``)."""
    if "://" in str(path):
        raise CheckpointError(
            f"{key}={path}: a URL; deqlab reads checkpoints from local files only. Download it "
            f"first and pass the file: {key}=<file.ckpt>"
        )
    return Path(path)


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """The checkpoint at ``path``: tensors and plain containers only (never code, whatever
    ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` says), memory-mapped (tensors are read only when
    touched) unless the file is in torch's legacy (pre-zip) format."""
    try:
        return load_tensors(path)
    except Exception as e:
        # torch's own message may advise weights_only=False, which would execute whatever
        # the file holds: report the damage instead.
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        reason = (
            "it holds objects other than tensors and plain containers"
            if "weights_only" in str(e) or "Weights only" in str(e)
            else first
        )
        raise CheckpointError(
            f"{path} is not a readable checkpoint ({reason}). A process killed while writing "
            "leaves such a file; use another checkpoint of the run (checkpoints/best.ckpt, "
            "last.ckpt)."
        ) from None


def run_config(ckpt: str | Path, command: str, trust: bool = False) -> Any:
    """The config of the run that wrote ``ckpt``: ``config_resolved.yaml`` in the run folder
    (the checkpoint's grandparent folder); ``command`` names the caller in the error. Unless
    ``trust``, every class it names must be on the allow-list (:mod:`~deqlab.runner.trust`):
    building it then runs no code from outside deqlab, torch.optim and Lightning."""
    from omegaconf import OmegaConf

    from .trust import trusted_config

    config = Path(ckpt).resolve().parent.parent / "config_resolved.yaml"
    if not config.is_file():
        raise InputNotFound(
            f"{config} not found: {command} reads the run's config beside its checkpoints/ "
            "folder (a checkpoint of a deqlab run, left where the run wrote it)"
        )
    return trusted_config(OmegaConf.load(config), str(config), trust)


def last_checkpoint(output_dir: str | Path) -> Path:
    """The run folder's ``checkpoints/last.ckpt`` (``ckpt_path=last``)."""
    return Path(output_dir) / "checkpoints" / "last.ckpt"


def resolve_checkpoint(ckpt_path: str, output_dir: str | Path) -> Path:
    """The checkpoint file ``ckpt_path`` names, checked to exist and to be readable.

    ``last`` means this run folder's ``checkpoints/last.ckpt`` (resume a killed run with
    ``hydra.run.dir=<its folder> ckpt_path=last``).
    """
    if ckpt_path == "last":
        path = last_checkpoint(output_dir)
        if not path.is_file():
            raise CheckpointError(
                f"ckpt_path=last: there is no {path}. `last` resumes the run whose folder is "
                "hydra.run.dir (pass hydra.run.dir=<that run's folder>), or pass a checkpoint "
                "file: ckpt_path=<file.ckpt>"
            )
    else:
        path = local_file(ckpt_path, "ckpt_path")
        if not path.is_file():
            raise CheckpointError(f"ckpt_path={ckpt_path}: no such file")
    read_checkpoint(path)
    return path


def _describe(shape: tuple[int, ...] | None) -> str:
    return "absent" if shape is None else f"shape {tuple(shape)}"


def check_compatible(
    checkpoint: dict[str, Any], module: torch.nn.Module, writer: str, reader: str
) -> None:
    """Refuse ``checkpoint`` unless it was written by the same task module (``writer`` vs
    ``reader``, qualified class names) with the same parameter names and shapes."""
    if writer != reader:
        raise CheckpointError(
            f"the checkpoint was written by {writer}, this run trains {reader}: pass a "
            "checkpoint of this task"
        )
    saved = {k: tuple(v.shape) for k, v in checkpoint.get("state_dict", {}).items()}
    here = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    if saved == here:
        return
    differ = sorted(k for k in saved.keys() | here.keys() if saved.get(k) != here.get(k))
    first = differ[0]
    raise CheckpointError(
        f"the checkpoint's network differs from this run's in {len(differ)} tensor(s), e.g. "
        f"{first}: {_describe(saved.get(first))} in the checkpoint, {_describe(here.get(first))} "
        "here; use the network settings (net, norm) the checkpoint was trained with"
    )


def _state_dict(checkpoint: Any, path: str | Path) -> dict[str, Any]:
    state = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"init_from={path}: no state dict of tensors in it")
    return state


def network_state(
    checkpoint: dict[str, Any], net: torch.nn.Module, path: str | Path
) -> dict[str, Any]:
    """The network's tensors in ``checkpoint``: a deqlab checkpoint's ``net.*`` entries, a plain
    state dict, or a reference implementation's state dict (bare or under ``state_dict``, as
    the DEQ and MDEQ training scripts save them), which a network that knows the format
    (``net.is_reference_state`` / ``net.convert_reference_state``) converts."""
    state = _state_dict(checkpoint, path)
    if any(k.startswith("net.") for k in state):  # a deqlab (Lightning) checkpoint
        return {k[4:]: v for k, v in state.items() if k.startswith("net.")}
    is_reference = getattr(net, "is_reference_state", None)
    if is_reference is None or not is_reference(state):
        return state
    try:
        return net.convert_reference_state(state)
    except ValueError as e:
        raise CheckpointError(f"init_from={path}: {e}") from None


def initial_state(path: str | Path, net: torch.nn.Module | None = None) -> dict[str, Any]:
    """The network tensors ``init_from=path`` names (:func:`network_state`); the file must be
    a local, readable file holding a state dict of tensors. With ``net`` None (a task that
    builds its network later) the file is only checked."""
    path = local_file(path, "init_from")
    if not path.is_file():
        raise CheckpointError(f"init_from={path}: no such file")
    checkpoint = read_checkpoint(path)
    return _state_dict(checkpoint, path) if net is None else network_state(checkpoint, net, path)


def load_initial_weights(path: str | Path, net: torch.nn.Module, strict: bool = True) -> str:
    """Start ``net`` from the weights in ``path`` (see :func:`network_state`): every tensor
    with ``strict``, else those whose names and shapes match. Returns a one-paragraph report of
    what was loaded, skipped (in the file, not usable here) and left new (not in the file)."""
    state = initial_state(path, net)
    ours = net.state_dict()
    usable = {k: v for k, v in state.items() if k in ours and ours[k].shape == v.shape}
    skipped = sorted(set(state) - set(usable))
    new = sorted(set(ours) - set(usable))
    if strict and (skipped or new):
        first = (skipped or new)[0]
        raise CheckpointError(
            f"init_from={path}: {len(skipped)} tensor(s) of the file do not fit this network "
            f"and {len(new)} of the network are not in the file (e.g. {first}: "
            f"{_describe(tuple(state[first].shape) if first in state else None)} in the file, "
            f"{_describe(tuple(ours[first].shape) if first in ours else None)} here). Build the "
            "network the weights were trained with, or load what fits with init_from_strict=false"
        )
    net.load_state_dict(usable, strict=False)
    lines = [f"init_from {path}: loaded {len(usable)} tensors"]
    for what, names in (("skipped (not usable here)", skipped), ("new (not in the file)", new)):
        if names:
            lines.append(f"  {what}: {', '.join(names)}")
    return "\n".join(lines)
