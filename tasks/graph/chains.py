"""The IGNN paper's synthetic chains (Gu et al., 2020, section 5.1; ``load_citation_chain`` in
``nodeclassification/utils.py`` of github.com/SwiftieH/IGNN): directed chains whose class is
written only on their first node, so that a node ``p`` steps down its chain must see ``p``
hops back. Generated in code, deterministic by seed, with the reference's random stream (the
same split for the same seed and sizes)."""

from __future__ import annotations

import numpy as np
import torch

from .graph import GraphError


def make_chains(
    chain_length: int,
    *,
    classes: int = 2,
    chains_per_class: int = 20,
    features: int = 100,
    train: int = 20,
    val: int = 100,
    test: int = 200,
    noise: float = 0.0,
    seed: int = 42,
) -> dict[str, torch.Tensor]:
    """Chains as the reference builds them.

    Args:
        chain_length: nodes per chain (the reference's ``l``, 10 by default there).
        classes: the number of classes (``c``).
        chains_per_class: chains of each class (``n``).
        features: the feature dimension (``f``); the first node of a chain of class k has a 1
            at feature k.
        train, val, test: how many nodes (drawn at random, without overlap) each split reads.
        noise: the uniform feature noise amplitude (0 in the reference).
        seed: the NumPy seed (42 in the reference).

    Returns:
        ``x`` (N, features), ``edge_index`` (2, E) with an edge from each node to the next on
        its chain, ``y`` (N,), and the ``train``/``val``/``test`` index tensors.
    """
    if chain_length < 2:
        raise GraphError(f"a chain needs at least 2 nodes, got chain_length={chain_length}")
    nodes = classes * chains_per_class * chain_length
    if train + val + test > nodes:
        raise GraphError(
            f"the splits ask for {train + val + test} nodes of {nodes}: lengthen the chains or "
            "shrink the splits"
        )
    if features < classes:
        raise GraphError(f"features={features} cannot hold {classes} one-hot classes")
    r = np.random.RandomState(seed)
    # one chain: l - 1 edges i -> i + 1; the graph: the chains side by side
    starts = np.arange(classes * chains_per_class) * chain_length
    src = (starts[:, None] + np.arange(chain_length - 1)).reshape(-1)
    edge_index = torch.from_numpy(np.stack([src, src + 1])).long()
    # drawn even at noise 0, as the reference does: the split below depends on it
    x = r.uniform(-noise, noise, size=(classes, chains_per_class, chain_length, features))
    x[:, :, 0, :classes] += np.eye(classes).reshape(classes, 1, classes)
    x = x.reshape(-1, features)
    y = np.repeat(np.arange(classes), chains_per_class * chain_length)
    order = np.arange(nodes)
    r.shuffle(order)
    splits = np.split(order[: train + val + test], [train, train + val])
    # the reference row-normalizes the features (rows summing to 0 stay 0)
    sums = x.sum(1, keepdims=True)
    x = np.divide(x, sums, out=np.zeros_like(x), where=sums != 0)
    return {
        "x": torch.from_numpy(x).float(),
        "edge_index": edge_index,
        "y": torch.from_numpy(y).long(),
        **{
            name: torch.from_numpy(idx).long()
            for name, idx in zip(("train", "val", "test"), splits)
        },
    }
