"""DEQ-Transformer language model (Bai, Kolter & Koltun, "Deep Equilibrium Models", NeurIPS
2019): one weight-tied Transformer-XL block (Dai et al., 2019) as the equilibrium cell, as the
reference code (locuslab/deq, DEQ-Sequence/models/deq_transformer.py) builds it.

    u      = inject(embed(x))                      once per segment: q, k, v offsets
    f(z)   = LN(a + FF(a)),  a = LN(z + Attn(z, mem; u))      (post-LN)
    f(z)   = n + FF(n),      n = LN(z + Attn(LN(z), LN(mem); u))   (pre-LN, ``pre_ln``)

Attention is multi-head with Transformer-XL's relative positional encoding over the segment
plus a memory of the previous segments, causally masked. The memory holds, for each past
position, its equilibrium state and its injection (detached), so a memory position's keys and
values are what they were in its own segment. Layer norms have no affine parameters, as in the
reference. Dropout is variational (one mask per batch, held through the solve) with the
reference's sharing at every site: the embeddings, the attention and feed-forward outputs and
the feed-forward hidden units drop features (one mask per sample and feature, shared over
positions); the positional encodings drop features shared over positions and samples; the
output drops whole positions; the attention probabilities drop each entry. Output: tied input/output embeddings, or adaptive input
embeddings (Baevski & Auli, 2019) tied to a projected adaptive softmax (Grave et al., 2017) as
Transformer-XL ties them: every band's embedding matrix, and the projection of every band but
the first (the reference's ``tie_weights``, ``tie_projs = [False, True, ...]``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deqlab.dropout import VariationalDropout

# The memory a segment leaves to the next: (states (B, M, D), injections (B, M, 3 H Dh)).
Memory = tuple[Tensor, Tensor]


@dataclass
class Context:
    """What the cell needs besides z, computed once per segment."""

    u: Tensor  # (B, M + L, 3 * H * Dh) injection into q, k, v of the memory and the segment
    mem: Tensor  # (B, M, D) previous equilibrium states, no grad
    pos: Tensor  # (M + L, D) sinusoidal embedding of distances M + L - 1 ... 0
    mask: Tensor  # (L, M + L) True where attention is not allowed (the future)


def sinusoid(distances: Tensor, dim: int) -> Tensor:
    inv = 1.0 / (
        10000 ** (torch.arange(0, dim, 2, device=distances.device, dtype=torch.float32) / dim)
    )
    angles = distances.float()[:, None] * inv[None]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def rel_shift(x: Tensor) -> Tensor:
    """Align scores against relative distances to absolute key positions (Transformer-XL):
    row i of (.., L, K) is shifted so that column j holds distance (K - L + i) - j."""
    b, h, q, k = x.shape
    padded = F.pad(x, (1, 0))  # (b, h, q, k + 1)
    return padded.view(b, h, k + 1, q)[:, :, 1:].view(b, h, q, k)


class RelAttention(nn.Module):
    def __init__(self, d_model: int, n_head: int, d_head: int, dropatt: float = 0.0):
        super().__init__()
        self.n_head, self.d_head = n_head, d_head
        self.qkv = nn.Linear(d_model, 3 * n_head * d_head, bias=False)
        self.r_net = nn.Linear(d_model, n_head * d_head, bias=False)
        self.out = nn.Linear(n_head * d_head, d_model)
        self.r_w_bias = nn.Parameter(torch.zeros(n_head, d_head))
        self.r_r_bias = nn.Parameter(torch.zeros(n_head, d_head))
        self.scale = 1.0 / math.sqrt(d_head)
        # one mask per (sample, head, query, key), held through the solve
        self.dropatt = VariationalDropout(dropatt)

    def forward(self, z: Tensor, ctx: Context, norm: nn.Module | None = None) -> Tensor:
        """``norm``: pre-LN, normalize the memory and the segment before the projections."""
        b, length, _ = z.shape
        h, dh = self.n_head, self.d_head
        mem_len = ctx.mem.shape[1]
        cat = torch.cat([ctx.mem, z], dim=1)
        if norm is not None:  # the reference normalizes the memory together with the segment
            cat = norm(cat)
        qkv = self.qkv(cat) + ctx.u  # (B, M + L, 3 H Dh)
        q, k, v = qkv.view(b, mem_len + length, 3, h, dh).unbind(2)
        q = q[:, mem_len:]  # queries: the current segment only
        r = self.r_net(ctx.pos).view(-1, h, dh)  # (M + L, H, Dh)
        ac = torch.einsum("bihd,bjhd->bhij", q + self.r_w_bias, k)
        bd = rel_shift(torch.einsum("bihd,jhd->bhij", q + self.r_r_bias, r))
        scores = (ac + bd) * self.scale
        scores = scores.masked_fill(ctx.mask, float("-inf"))
        attn = self.dropatt(scores.softmax(dim=-1))
        out = torch.einsum("bhij,bjhd->bihd", attn, v).reshape(b, length, h * dh)
        return self.out(out)


class DEQTransformerCell(nn.Module):
    """f(z; ctx): relative attention and a position-wise feed-forward, each with a residual
    and a LayerNorm, without affine parameters as the reference's (``ln_affine`` adds them);
    post-LN, as the DEQ-Transformer, or ``pre_ln``, which normalizes the inputs instead."""

    def __init__(
        self,
        d_model: int,
        n_head: int,
        d_head: int,
        d_inner: int,
        dropout: float = 0.0,
        pre_ln: bool = False,
        dropatt: float = 0.0,
        ln_affine: bool = False,
    ):
        super().__init__()
        self.attn = RelAttention(d_model, n_head, d_head, dropatt)
        self.ff = nn.Sequential(nn.Linear(d_model, d_inner), nn.ReLU(), nn.Linear(d_inner, d_model))
        # One mask per (sample, feature), shared over positions and held through the solve.
        # Three masks, as the reference: attention output, FF hidden (d_inner), FF output.
        self.drop = VariationalDropout(dropout, shared_dims=(1,))
        self.ff_drop = VariationalDropout(dropout, shared_dims=(1,))
        self.ff_out_drop = VariationalDropout(dropout, shared_dims=(1,))
        self.pre_ln, self.d_model = pre_ln, d_model
        self.norm_attn = nn.LayerNorm(d_model, elementwise_affine=ln_affine)
        self.norm_ff = nn.LayerNorm(d_model, elementwise_affine=ln_affine)

    def feed_forward(self, a: Tensor) -> Tensor:
        return self.ff_out_drop(self.ff[2](self.ff_drop(self.ff[1](self.ff[0](a)))))

    def forward(self, z: Tensor, ctx: Context) -> Tensor:
        if self.pre_ln:  # the residual adds the normalized input, as the reference's FF does
            n = self.norm_ff(z + self.drop(self.attn(z, ctx, self.norm_attn)))
            return n + self.feed_forward(n)
        a = self.norm_attn(z + self.drop(self.attn(z, ctx)))
        return self.norm_ff(a + self.feed_forward(a))


class AdaptiveInput(nn.Module):
    """Adaptive input embeddings (Baevski & Auli, 2019): frequency band i of the vocabulary
    (``cutoffs``) gets embeddings of dimension d // div_val^i, projected to d by ``proj[i]``."""

    def __init__(self, n_token: int, d_model: int, cutoffs: Sequence[int], div_val: float = 4.0):
        super().__init__()
        self.edges = [0, *cutoffs, n_token]
        self.d_model = d_model
        self.emb = nn.ModuleList()
        self.proj = nn.ModuleList()
        for i in range(len(self.edges) - 1):
            d = max(1, int(d_model // div_val**i))
            self.emb.append(nn.Embedding(self.edges[i + 1] - self.edges[i], d))
            self.proj.append(nn.Linear(d, d_model, bias=False))

    def forward(self, x: Tensor) -> Tensor:
        out = x.new_zeros(*x.shape, self.d_model, dtype=self.proj[0].weight.dtype)
        for i, (emb, proj) in enumerate(zip(self.emb, self.proj)):
            lo, hi = self.edges[i], self.edges[i + 1]
            sel = (x >= lo) & (x < hi)
            if sel.any():
                out[sel] = proj(emb(x[sel] - lo))
        return out


class TiedAdaptiveSoftmax(nn.Module):
    """Projected adaptive softmax (Grave et al., 2017) over the bands of an
    :class:`AdaptiveInput`, whose parameters it shares: band i's logits are
    (h P_i) E_i^T + b_i with E_i that band's embedding matrix and P_i its projection (tied for
    i >= 1; the head's P_0 is its own). The head scores the first band and one logit per tail
    cluster; a token of band i >= 1 has log p = log p_head(cluster i) + log p_i(token).
    Only the parameters it owns are registered (biases, cluster logits, P_0).

    ``proj_tying``: ``parameter`` ties each tail projection as one Parameter (one optimizer
    update per step); ``storage`` gives the softmax Parameters of its own over the embedding
    projections' storage (``tail_proj``), each with its own gradient and optimizer state, so
    the shared values are updated twice per step, once per use: what the reference's
    ``out_projs[i].weight.data = emb_projs[i].weight.data`` does (its first Adam step moves
    them by up to 2 lr)."""

    def __init__(self, embed: AdaptiveInput, proj_tying: str = "parameter"):
        super().__init__()
        if proj_tying not in ("parameter", "storage"):
            raise ValueError(f"proj_tying must be parameter or storage, got {proj_tying!r}")
        self.tied = [embed]  # a list: shared, not a second registration of the embedding
        n_clusters = len(embed.emb) - 1
        d0 = embed.emb[0].embedding_dim
        self.bias = nn.Parameter(torch.zeros(embed.edges[-1]))
        self.cluster = nn.Linear(d0, n_clusters)
        self.head_proj = nn.Parameter(torch.empty(embed.d_model, d0))
        self.tail_proj = nn.ParameterList(
            nn.Parameter(p.weight.data) for p in embed.proj[1:] if proj_tying == "storage"
        )

    def _logits(self, h: Tensor, i: int) -> Tensor:
        embed = self.tied[0]
        if i == 0:
            proj = self.head_proj  # (D, d_0)
        else:
            proj = self.tail_proj[i - 1] if len(self.tail_proj) else embed.proj[i].weight
        lo, hi = embed.edges[i], embed.edges[i + 1]
        hp = h @ proj
        logits = F.linear(hp, embed.emb[i].weight, self.bias[lo:hi])
        if i == 0:
            logits = torch.cat([logits, self.cluster(hp)], dim=-1)
        return logits

    def nll(self, h: Tensor, y: Tensor) -> Tensor:
        """-log p(y | h) for rows h (N, D) and targets y (N,), computing each tail band only
        for the tokens in it."""
        edges = self.tied[0].edges
        work = torch.promote_types(h.dtype, torch.float32)  # never below float32
        head = self._logits(h, 0).to(work).log_softmax(-1)
        n_head = edges[1]
        out = torch.empty(len(y), dtype=head.dtype, device=h.device)
        in_head = y < n_head
        out[in_head] = -head[in_head].gather(1, y[in_head, None]).squeeze(1)
        for i in range(1, len(edges) - 1):
            sel = (y >= edges[i]) & (y < edges[i + 1])
            if not sel.any():
                continue
            tail = self._logits(h[sel], i).to(work).log_softmax(-1)
            token = tail.gather(1, (y[sel] - edges[i])[:, None]).squeeze(1)
            out[sel] = -(head[sel, n_head + i - 1] + token)
        return out

    def log_prob(self, h: Tensor) -> Tensor:
        """log p over the whole vocabulary, (N, n_token): for evaluation of small batches."""
        edges = self.tied[0].edges
        work = torch.promote_types(h.dtype, torch.float32)
        head = self._logits(h, 0).to(work).log_softmax(-1)
        parts = [head[:, : edges[1]]]
        for i in range(1, len(edges) - 1):
            tail = self._logits(h, i).to(work).log_softmax(-1)
            parts.append(head[:, edges[1] + i - 1 : edges[1] + i] + tail)
        return torch.cat(parts, dim=-1)


class DEQTransformerLM(nn.Module):
    """Embedding -> DEQ(DEQTransformerCell) with segment memory -> (adaptive) softmax.

    ``cutoffs`` empty: tied input/output embeddings. Otherwise adaptive input embeddings tied
    to a projected adaptive softmax (token ids are frequency-ranked, see tasks/lm/data.py).
    ``tie_weights=False`` (the reference's ``--not_tied``): the output layer has a weight of its
    own, or, adaptive, band matrices of their own while the tail projections stay tied (the
    reference's ``tie_projs``).
    ``dropout``: hidden (attention and FF outputs, FF hidden), positional and output dropout;
    ``dropatt``: attention probabilities; ``emb_dropout``: the embeddings. Weights start from
    N(0, init_std), projections from N(0, proj_init_std), biases from 0 (the reference's
    ``weights_init``), except the weights of the layers under the module names in
    ``default_init``, which keep PyTorch's default: the reference initializes after weight
    normalization, which recomputes the weight-normalized layers (the whole cell) from g and v
    and so discards the draws (``default_init: [cell]`` reproduces that). ``proj_tying``: see
    :class:`TiedAdaptiveSoftmax`. ``ln_affine``: affine layer norms (the reference has none);
    ``memory_injections``: memory positions keep the injection of their own segment, as the
    reference's (false: none, their keys and values from the state alone).
    """

    def __init__(
        self,
        n_token: int,
        d_model: int = 128,
        n_head: int = 4,
        d_head: int = 32,
        d_inner: int = 512,
        dropout: float = 0.1,
        emb_dropout: float = 0.1,
        dropatt: float = 0.0,
        pre_ln: bool = False,
        cutoffs: Sequence[int] = (),
        div_val: float = 4.0,
        proj_tying: str = "parameter",
        ln_affine: bool = False,
        memory_injections: bool = True,
        init_std: float = 0.01,
        proj_init_std: float = 0.01,
        default_init: Sequence[str] = (),
        tie_weights: bool = True,
    ):
        super().__init__()
        cutoffs = [c for c in cutoffs if c < n_token]
        self.d_model = d_model
        self.softmax: TiedAdaptiveSoftmax | None = None
        self.out_weight: nn.Parameter | None = None
        if cutoffs:
            self.embed: nn.Module = AdaptiveInput(n_token, d_model, cutoffs, div_val)
            out = self.embed
            if not tie_weights:  # band matrices of its own; the tail projections stay tied
                out = self.out_embed = AdaptiveInput(n_token, d_model, cutoffs, div_val)
                out.proj[0] = nn.Identity()  # the head's projection is the softmax's own
                for mine, tied in zip(out.proj[1:], self.embed.proj[1:]):
                    mine.weight = tied.weight
            self.softmax = TiedAdaptiveSoftmax(out, proj_tying)
            self.out_bias = None
        else:
            self.embed = nn.Embedding(n_token, d_model)
            self.out_bias = nn.Parameter(torch.zeros(n_token))
            if not tie_weights:
                self.out_weight = nn.Parameter(torch.empty(n_token, d_model))
        self.inject_net = nn.Linear(d_model, 3 * n_head * d_head)
        self.cell = DEQTransformerCell(
            d_model, n_head, d_head, d_inner, dropout, pre_ln, dropatt, ln_affine
        )
        self.memory_injections = memory_injections
        # (B, L, D) embeddings: one mask per (sample, feature); (1, K, D) positional
        # encodings: one per feature; (B, L, D) output: one per (sample, position)
        self.emb_drop = VariationalDropout(emb_dropout, shared_dims=(1,))
        self.pos_drop = VariationalDropout(dropout, shared_dims=(1,))
        self.out_drop = VariationalDropout(dropout, shared_dims=(2,))
        self.init_weights(init_std, proj_init_std, default_init)

    @staticmethod
    def is_reference_state(state: dict[str, Tensor]) -> bool:
        from .convert import is_locuslab_deq

        return is_locuslab_deq(state)

    def convert_reference_state(self, state: dict[str, Tensor]) -> dict[str, Tensor]:
        """A locuslab/deq DEQTransformerLM state dict as this network's (tasks/lm/convert.py):
        what ``init_from`` loads a released reference model through."""
        from .convert import from_locuslab_deq

        return from_locuslab_deq(state, self)

    def _apply(self, fn, recurse=True):  # type: ignore[no-untyped-def]
        # A dtype or device conversion gives every Parameter a tensor of its own: re-share
        # the storage-tied projections (proj_tying=storage), as the reference, which builds
        # its model on the GPU, never converts them.
        out = super()._apply(fn, recurse)
        if self.softmax is not None:
            for tail, proj in zip(self.softmax.tail_proj, self.embed.proj[1:]):
                tail.data = proj.weight.data
        return out

    @torch.no_grad()
    def init_weights(self, std: float, proj_std: float, default_init: Sequence[str] = ()) -> None:
        kept = tuple(default_init)
        for name, p in self.named_parameters():
            module, leaf = name.rsplit(".", 1) if "." in name else ("", name)
            if ".proj." in name or "_proj" in module or leaf == "head_proj":  # projections
                p.normal_(0.0, proj_std)
            elif leaf in ("bias", "out_bias"):
                p.zero_()
            elif leaf == "weight" and any(module == k or module.startswith(k + ".") for k in kept):
                continue  # PyTorch's default, as the layer was built
            else:  # weights, embeddings, the attention's r_w / r_r biases, cluster logits
                p.normal_(0.0, std)

    def inject(self, x: Tensor, mem: Memory | None = None) -> tuple[Context, Tensor]:
        """Injection context and z0 for a segment x (B, L), given the memory."""
        b, length = x.shape
        e = self.emb_drop(self.embed(x) * math.sqrt(self.d_model))
        u = self.inject_net(e)
        if mem is None:
            mem = (e.new_zeros(b, 0, self.d_model), u.new_zeros(b, 0, u.shape[-1]))
        z_mem, u_mem = mem
        if not self.memory_injections:  # memory positions without their injections
            u_mem = torch.zeros_like(u_mem)
        m = z_mem.shape[1]
        distances = torch.arange(m + length - 1, -1, -1, device=x.device)
        mask = torch.ones(length, m + length, dtype=torch.bool, device=x.device).triu_(1 + m)
        pos = self.pos_drop(sinusoid(distances, self.d_model).to(e.dtype)[None])[0]
        ctx = Context(torch.cat([u_mem.to(u.dtype), u], dim=1), z_mem.to(e.dtype), pos, mask)
        return ctx, torch.zeros_like(e)

    def enable_learned_start(self) -> None:
        """``init=learned`` (the runner calls this before the optimizer is built): a linear
        map from each position's injection to its state, zero at first, so that the first
        solves start where init=zeros does."""
        w = self.inject_net.weight  # built beside it: its device and dtype
        self.start = nn.Linear(w.shape[0], self.d_model, device=w.device, dtype=w.dtype)
        nn.init.zeros_(self.start.weight)
        nn.init.zeros_(self.start.bias)

    def predict_start(self, ctx: Context) -> Tensor:
        length = ctx.u.shape[1] - ctx.mem.shape[1]  # the segment's positions, after the memory
        return self.start(ctx.u[:, -length:])

    @staticmethod
    def next_memory(ctx: Context, z: Tensor, keep: int) -> Memory:
        """The last ``keep`` positions of memory and segment, states and injections, detached:
        what the next segment attends to."""
        m = ctx.mem.shape[1]
        states = torch.cat([ctx.mem, z.detach()], dim=1)[:, -keep:]
        injections = ctx.u.detach()[:, -(m + z.shape[1]) :][:, -keep:]
        return states, injections

    def head(self, z: Tensor) -> Tensor:
        return self.out_drop(z)

    def nll(self, h: Tensor, y: Tensor) -> Tensor:
        """Per-token negative log-likelihood (B, L) of targets y under hidden states h."""
        if self.softmax is None:
            logits = F.linear(h, self.output_weight(), self.out_bias)
            return F.cross_entropy(
                logits.flatten(0, 1).float(), y.reshape(-1), reduction="none"
            ).view_as(y)
        return self.softmax.nll(h.reshape(-1, h.shape[-1]), y.reshape(-1)).view_as(y)

    def output_weight(self) -> Tensor:
        """The output layer's weight: the input embedding's, unless ``tie_weights=False``."""
        return self.embed.weight if self.out_weight is None else self.out_weight

    def logits(self, h: Tensor) -> Tensor:
        if self.softmax is None:
            return F.linear(h, self.output_weight(), self.out_bias)
        return self.softmax.log_prob(h.reshape(-1, h.shape[-1])).view(*h.shape[:-1], -1)
