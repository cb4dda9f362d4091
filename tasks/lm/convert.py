"""The reference DEQ-Transformer's weights in deqlab's model.

``from_locuslab_deq(state, net)`` maps a state dict of locuslab/deq's ``DEQTransformerLM``
(DEQ-Sequence/models/deq_transformer.py at 1fb7059, e.g. its released WT103 ``.pkl``, which is
a ``state_dict``) onto a :class:`~deqlab.tasks.lm.model.DEQTransformerLM` built with the same
sizes, ready for ``net.load_state_dict(..., strict=True)``:

- 1x1 ``Conv1d`` weights (out, in, 1) become ``Linear`` weights (out, in); weight-normalized
  layers keep their (g, v) as deqlab's (scale, V) when the receiving cell is weight-normalized
  (the same parametrization), or become plain weights;
- the adaptive softmax's per-band biases are concatenated into one vocabulary-wide bias, and its
  cluster logits are stored in reverse (the reference reads cluster i at head column -i);
- tied tensors (every band's output embedding, the tail projections) are checked to equal the
  embedding's and stored once (twice, over one storage, under ``proj_tying=storage``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from deqlab.norm import weight_entries, weight_norm_entries

if TYPE_CHECKING:  # the model imports this module to convert its reference's weights
    from .model import DEQTransformerLM

# reference layer -> deqlab layer, for the cell and the injection
LAYERS = {
    "func.dec_attn.qkv_net": "cell.attn.qkv",
    "func.dec_attn.r_net": "cell.attn.r_net",
    "func.dec_attn.o_net": "cell.attn.out",
    "func.pos_ff.ff1_net": "cell.ff.0",
    "func.pos_ff.ff2_net": "cell.ff.2",
    "inject_conv": "inject_net",
}


def is_locuslab_deq(state: Mapping[str, Tensor]) -> bool:
    return any(k.startswith("word_emb.emb_layers.") for k in state) and any(
        k.startswith("func.dec_attn.") for k in state
    )


def _layer(
    out: dict[str, Tensor], state: Mapping[str, Tensor], ref: str, ours: str, target: dict
) -> None:
    if f"{ref}.weight_v" in state:
        out.update(
            weight_norm_entries(ours, state[f"{ref}.weight_g"], state[f"{ref}.weight_v"], target)
        )
    else:
        out.update(weight_entries(ours, state[f"{ref}.weight"], target))
    if f"{ref}.bias" in state:
        out[f"{ours}.bias"] = state[f"{ref}.bias"]


def _same(a: Tensor, b: Tensor, what: str) -> None:
    if a.shape != b.shape or not torch.equal(a, b):
        raise ValueError(f"the reference state's {what} should be tied and is not: not converted")


def from_locuslab_deq(
    state: Mapping[str, Tensor], net: DEQTransformerLM, check_ties: bool = True
) -> dict[str, Tensor]:
    """``state`` (the reference's ``state_dict``) as ``net``'s state dict. Every transform is
    linear, so the same call maps per-parameter gradients (``check_ties=False``: a tied
    Parameter's gradient is listed once, and storage-tied ones differ)."""
    if not is_locuslab_deq(state):
        raise ValueError("not a locuslab/deq DEQTransformerLM state dict (no word_emb / func keys)")
    target = net.state_dict()
    out: dict[str, Tensor] = {}
    for ref, ours in LAYERS.items():
        _layer(out, state, ref, ours, target)
    for name in ("r_w_bias", "r_r_bias"):
        out[f"cell.attn.{name}"] = state[f"func.dec_attn.{name}"]
    bands = sorted(int(k.split(".")[2]) for k in state if k.startswith("word_emb.emb_layers."))
    if net.softmax is None:  # one band, input and output embeddings tied
        if bands != [0] or "word_emb.emb_projs.0.weight" in state:
            raise ValueError(
                "the reference model has adaptive or projected embeddings; build deqlab's with "
                "the same cutoffs (task.module.net.cutoffs)"
            )
        out["embed.weight"] = state["word_emb.emb_layers.0.weight"]
        if check_ties:
            _same(state["crit.out_layers.0.weight"], out["embed.weight"], "output embedding")
        out["out_bias"] = state["crit.out_layers.0.bias"]
        return out
    if len(bands) != len(net.embed.emb):
        raise ValueError(
            f"the reference model has {len(bands)} vocabulary bands, deqlab's {len(net.embed.emb)}"
            ": build it with the reference's cutoffs"
        )
    for i in bands:
        emb, proj = (
            state[f"word_emb.emb_layers.{i}.weight"],
            state[f"word_emb.emb_projs.{i}.weight"],
        )
        out[f"embed.emb.{i}.weight"], out[f"embed.proj.{i}.weight"] = emb, proj
        if check_ties:
            _same(state[f"crit.out_layers.{i}.weight"], emb, f"band {i} output embedding")
        if i > 0:
            if check_ties:
                _same(state[f"crit.out_projs.{i}.weight"], proj, f"band {i} projection")
            if f"softmax.tail_proj.{i - 1}" in target:
                out[f"softmax.tail_proj.{i - 1}"] = state[f"crit.out_projs.{i}.weight"]
    out["softmax.head_proj"] = state["crit.out_projs.0.weight"]
    out["softmax.bias"] = torch.cat([state[f"crit.out_layers.{i}.bias"] for i in bands])
    out["softmax.cluster.weight"] = state["crit.cluster_weight"].flip(0)
    out["softmax.cluster.bias"] = state["crit.cluster_bias"].flip(0)
    return out
