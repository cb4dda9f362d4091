"""The reference MDEQ's weights in deqlab's model.

``from_locuslab_mdeq(state, net)`` maps a state dict of the reference ``MDEQClsNet``
(locuslab/deq at 1fb7059, MDEQ-Vision/lib/models/mdeq.py; locuslab/mdeq's has the same names)
onto a :class:`~deqlab.tasks.cifar.mdeq.MDEQClassifier` of the same sizes, for
``net.load_state_dict(..., strict=True)``. Weight-normalized convolutions keep their (g, v) as
deqlab's (scale, V) when the receiving cell normalizes them, else become plain weights;
BatchNorm running statistics come along. A checkpoint of the reference's training script (a dict
with ``state_dict``) is unwrapped by the caller (:func:`deqlab.runner.checkpoint.network_state`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from torch import Tensor

from deqlab.norm import weight_entries, weight_norm_entries

if TYPE_CHECKING:  # the model imports this module to convert its reference's weights
    from .mdeq import MDEQClassifier

BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def is_locuslab_mdeq(state: Mapping[str, Tensor]) -> bool:
    return any(k.startswith("fullstage.") for k in state) and any(
        k.startswith("incre_modules.") for k in state
    )


def _layer_map(net: MDEQClassifier) -> dict[str, str]:
    """Reference module name -> deqlab module name, for every layer with parameters."""
    m = {"downsample.0": "stem.0", "downsample.1": "stem.1"}
    m |= {"downsample.3": "stem.3", "downsample.4": "stem.4"}
    m |= {"stage0.0": "stage0.0", "stage0.1": "stage0.1"}
    n = len(net.channels)
    for i in range(n):
        for k in range(len(net.cell.branches[i])):
            for part in ("conv1", "conv2", "gn1", "gn2", "gn3"):
                m[f"fullstage.branches.{i}.blocks.{k}.{part}"] = f"cell.branches.{i}.{k}.{part}"
        m[f"fullstage.post_fuse_layers.{i}.conv"] = f"cell.post.{i}.1"
        m[f"fullstage.post_fuse_layers.{i}.gnorm"] = f"cell.post.{i}.2"
        for j in range(n):
            ref, ours = f"fullstage.fuse_layers.{i}.{j}.net", f"cell.fuse.{i}.{j}"
            if j > i:  # upsampling: conv, gnorm, upsample
                m[f"{ref}.conv"], m[f"{ref}.gnorm"] = f"{ours}.0", f"{ours}.1"
            for step in range(i - j):  # downsampling: (conv, gnorm[, relu]) per step, flat here
                m[f"{ref}.{step}.conv"] = f"{ours}.{3 * step}"
                m[f"{ref}.{step}.gnorm"] = f"{ours}.{3 * step + 1}"
        body = {"conv1": 0, "bn1": 1, "conv2": 3, "bn2": 4, "conv3": 6, "bn3": 7}
        for part, idx in body.items():
            m[f"incre_modules.{i}.0.{part}"] = f"incre.{i}.body.{idx}"
        m[f"incre_modules.{i}.0.downsample.0"] = f"incre.{i}.skip.0"
        m[f"incre_modules.{i}.0.downsample.1"] = f"incre.{i}.skip.1"
    for i in range(n - 1):
        m[f"downsamp_modules.{i}.0"] = f"merge.{i}.0"
        m[f"downsamp_modules.{i}.1"] = f"merge.{i}.1"
    m |= {"final_layer.0": "final.0", "final_layer.1": "final.1", "classifier": "classifier"}
    return m


def from_locuslab_mdeq(state: Mapping[str, Tensor], net: MDEQClassifier) -> dict[str, Tensor]:
    """``state`` (the reference's ``state_dict``) as ``net``'s state dict. Every transform is a
    renaming or a reshape, so the same call maps per-parameter gradients."""
    if not is_locuslab_mdeq(state):
        raise ValueError("not a locuslab MDEQ state dict (no fullstage / incre_modules keys)")
    target = net.state_dict()
    layers = _layer_map(net)
    out: dict[str, Tensor] = {}
    unknown = []
    for key, value in state.items():
        ref, leaf = key.rsplit(".", 1)
        ours = layers.get(ref)
        if ours is None:
            unknown.append(key)
        elif leaf == "weight_v":
            out.update(weight_norm_entries(ours, state[f"{ref}.weight_g"], value, target))
        elif leaf == "weight_g":
            continue  # with its v
        elif leaf == "weight":  # plain, or V and scale if deqlab normalizes the layer
            out.update(weight_entries(ours, value, target))
        elif leaf in BN:
            out[f"{ours}.{leaf}"] = value
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"reference tensors with no place in deqlab's MDEQ: {unknown}")
    return out
