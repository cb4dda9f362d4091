"""``deqlab generate CKPT --prompt "..."``: sample text from a trained DEQ language model.

The prompt is solved as one segment; each new token is then a segment of one position whose
attention memory holds every earlier position's equilibrium (Transformer-XL decoding: causal
attention makes the joint fixed point of a sequence agree, position by position, with these
one-position solves). Each new position's solve starts from the previous position's
equilibrium rather than from zeros: neighbouring positions have close equilibria, so the solve
needs fewer f evaluations (locuslab/deq issue 3 asks how to decode this way). The same tokens
are then solved again from zeros, and the two costs are reported side by side.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from hydra.utils import get_class, instantiate
from torch import Tensor

from deqlab.bound import Bound
from deqlab.runner.checkpoint import read_checkpoint, run_config

from .data import UNK
from .module import LMModule, vocabulary_id


@dataclass
class Generation:
    """Prompt and sampled token ids, their log-probabilities, and the forward solves' cost."""

    prompt: list[int]
    tokens: list[int]
    log_probs: list[float]  # log p(token | everything before), for each sampled token
    warm_nfe: int  # f evaluations of the sampled tokens' solves, each warm-started
    cold_nfe: int  # the same solves started from zeros


def load_model(
    ckpt: str | Path, data_dir: str | None = None, trust_config: bool = False
) -> tuple[LMModule, Any]:
    """The LM module of a run's checkpoint, in eval mode, and its corpus. The run's config is
    ``config_resolved.yaml`` in the run folder (the checkpoint's grandparent folder); it may
    build only allowed classes unless ``trust_config`` (:mod:`deqlab.runner.trust`)."""
    ckpt = Path(ckpt)
    cfg = run_config(ckpt, "deqlab generate", trust_config)
    if not issubclass(get_class(cfg.task.module._target_), LMModule):
        raise ValueError(
            f"{ckpt} is a {cfg.task.name!r} model: deqlab generate needs a language model"
        )
    if data_dir is not None:
        cfg.task.datamodule.data_dir = data_dir
    datamodule = instantiate(cfg.task.datamodule)
    datamodule.prepare_data()
    datamodule.setup("test")
    module: LMModule = instantiate(cfg.task.module, init_from=None)
    module.attach_net(module.net_factory(n_token=len(datamodule.corpus)))
    state = read_checkpoint(ckpt)
    saved = state.get("deqlab_vocabulary")
    if saved is not None and saved != vocabulary_id(datamodule.corpus.itos):
        raise ValueError(
            f"{ckpt} was trained on another vocabulary than the corpus under "
            f"{cfg.task.datamodule.data_dir}: pass --data-dir with the run's data"
        )
    module.load_state_dict(state["state_dict"])
    return module.eval(), datamodule.corpus


@torch.no_grad()
def generate(
    module: LMModule,
    prompt: list[int],
    steps: int,
    temperature: float = 1.0,
    top_k: int = 0,
    seed: int = 0,
) -> Generation:
    """Sample ``steps`` tokens after ``prompt`` (temperature 0: greedy). Memory keeps every
    position (no ``mem_len`` cut), so each token sees the whole text so far."""
    if not prompt:
        raise ValueError("the prompt is empty: give at least one word")
    net, generator = module.net, torch.Generator().manual_seed(seed)
    device = next(net.parameters()).device

    def solve(x: Tensor, mem: Any, z0: Tensor | None) -> tuple[Tensor, Any, int]:
        ctx, zeros = net.inject(x.to(device), mem)
        z, info = module.deq(Bound(net.cell, ctx), zeros if z0 is None else z0)
        return z, net.next_memory(ctx, z, keep=ctx.u.shape[1]), info.nfe

    def next_token(z: Tensor) -> tuple[int, float]:
        logits = net.logits(net.head(z[:, -1:]))[0, -1]
        log_p = logits.to(torch.promote_types(logits.dtype, torch.float32)).log_softmax(-1)
        if temperature == 0:
            token = int(log_p.argmax())
        else:
            scores = log_p / temperature
            if top_k > 0:
                kth = scores.topk(min(top_k, scores.numel())).values[-1]
                scores = scores.masked_fill(scores < kth, float("-inf"))
            token = int(torch.multinomial(scores.softmax(-1).cpu(), 1, generator=generator))
        return token, float(log_p[token])

    z, mem, _ = solve(torch.tensor([prompt]), None, None)
    tokens, log_probs, warm = [], [], 0
    for _ in range(steps):
        token, log_p = next_token(z)
        tokens.append(token)
        log_probs.append(log_p)
        z, mem, nfe = solve(torch.tensor([[token]]), mem, z[:, -1:])
        warm += nfe
    # the same tokens, each solve from zeros: what the warm start saved
    z, mem, _ = solve(torch.tensor([prompt]), None, None)
    cold = 0
    for token in tokens:
        z, mem, nfe = solve(torch.tensor([[token]]), mem, None)
        cold += nfe
    return Generation(prompt, tokens, log_probs, warm, cold)


def main(argv: list[str] | None = None) -> Generation:
    parser = argparse.ArgumentParser(
        prog="deqlab generate", description="Sample text from a trained DEQ language model."
    )
    parser.add_argument("ckpt", help="a checkpoint of a language-model run (checkpoints/*.ckpt)")
    parser.add_argument("--prompt", required=True, help="the text to continue (words)")
    parser.add_argument("--tokens", type=int, default=30, help="how many words to sample")
    parser.add_argument("--temperature", type=float, default=1.0, help="0: greedy")
    parser.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-dir", help="where the run's corpus is, if it moved")
    parser.add_argument(
        "--trust-config",
        action="store_true",
        help="build whatever the run's config names (only for a run folder you trust)",
    )
    args = parser.parse_args(argv)
    module, corpus = load_model(args.ckpt, args.data_dir, args.trust_config)
    unk = corpus.stoi[UNK]
    prompt = [corpus.stoi.get(w, unk) for w in args.prompt.split()]
    out = generate(module, prompt, args.tokens, args.temperature, args.top_k, args.seed)
    words = [corpus.itos[t] for t in out.tokens]
    print(" ".join([corpus.itos[t] for t in prompt]), "|", " ".join(words))
    n = max(1, len(out.tokens))
    saved = 1 - out.warm_nfe / max(1, out.cold_nfe)
    print(
        f"deqlab generate: {len(out.tokens)} tokens; forward solves took {out.warm_nfe} f "
        f"evaluations warm-started ({out.warm_nfe / n:.1f} per token) against {out.cold_nfe} "
        f"from zeros ({out.cold_nfe / n:.1f}): {saved:.0%} saved"
    )
    return out


if __name__ == "__main__":
    main()
