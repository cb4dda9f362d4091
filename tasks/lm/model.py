"""DEQ-Transformer language model (Bai, Kolter & Koltun, "Deep Equilibrium Models", NeurIPS
2019): one weight-tied Transformer-XL block (Dai et al., 2019) as the equilibrium cell.

    u      = inject(embed(x))                      once per segment: q, k, v offsets
    f(z)   = LN2(a + FF(a)),  a = LN1(z + Attn(z, mem; u))      (post-LN; pre-LN optional)

Attention is multi-head with Transformer-XL's relative positional encoding over the segment
plus a memory of the previous segments' equilibrium states (detached), causally masked.
Hidden dropout is variational (one mask per batch, held through the solve). Output: tied
input/output embeddings, or adaptive input embeddings with an adaptive softmax for large
vocabularies (Baevski & Auli, 2019; Grave et al., 2017).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deqlab.dropout import VariationalDropout


@dataclass
class Context:
    """What the cell needs besides z, computed once per segment."""

    u: Tensor  # (B, L, 3 * H * Dh) injection into q, k, v
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
    def __init__(self, d_model: int, n_head: int, d_head: int):
        super().__init__()
        self.n_head, self.d_head = n_head, d_head
        self.qkv = nn.Linear(d_model, 3 * n_head * d_head, bias=False)
        self.r_net = nn.Linear(d_model, n_head * d_head, bias=False)
        self.out = nn.Linear(n_head * d_head, d_model, bias=False)
        self.r_w_bias = nn.Parameter(torch.zeros(n_head, d_head))
        self.r_r_bias = nn.Parameter(torch.zeros(n_head, d_head))
        self.scale = 1.0 / math.sqrt(d_head)

    def forward(self, z: Tensor, ctx: Context) -> Tensor:
        b, length, _ = z.shape
        h, dh = self.n_head, self.d_head
        mem_len = ctx.mem.shape[1]
        qkv = self.qkv(torch.cat([ctx.mem, z], dim=1))  # (B, M + L, 3 H Dh)
        qkv = torch.cat([qkv[:, :mem_len], qkv[:, mem_len:] + ctx.u], dim=1)
        q, k, v = qkv.view(b, mem_len + length, 3, h, dh).unbind(2)
        q = q[:, mem_len:]  # queries: the current segment only
        r = self.r_net(ctx.pos).view(-1, h, dh)  # (M + L, H, Dh)
        ac = torch.einsum("bihd,bjhd->bhij", q + self.r_w_bias, k)
        bd = rel_shift(torch.einsum("bihd,jhd->bhij", q + self.r_r_bias, r))
        scores = (ac + bd) * self.scale
        scores = scores.masked_fill(ctx.mask, float("-inf"))
        attn = scores.softmax(dim=-1)
        out = torch.einsum("bhij,bjhd->bihd", attn, v).reshape(b, length, h * dh)
        return self.out(out)


class DEQTransformerCell(nn.Module):
    """f(z; ctx): relative attention and a position-wise feed-forward, each with a residual
    and LayerNorm (post-LN, as the DEQ-Transformer; ``pre_ln`` puts the norms first)."""

    def __init__(
        self,
        d_model: int,
        n_head: int,
        d_head: int,
        d_inner: int,
        dropout: float = 0.0,
        pre_ln: bool = False,
    ):
        super().__init__()
        self.attn = RelAttention(d_model, n_head, d_head)
        self.ff = nn.Sequential(nn.Linear(d_model, d_inner), nn.ReLU(), nn.Linear(d_inner, d_model))
        self.ln1, self.ln2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        # One mask per (sample, feature), shared over positions and held through the solve.
        self.drop = VariationalDropout(dropout, shared_dims=(1,))
        self.pre_ln = pre_ln

    def forward(self, z: Tensor, ctx: Context) -> Tensor:
        if self.pre_ln:
            a = z + self.drop(self.attn(self.ln1(z), ctx))
            return a + self.drop(self.ff(self.ln2(a)))
        a = self.ln1(z + self.drop(self.attn(z, ctx)))
        return self.ln2(a + self.drop(self.ff(a)))


class AdaptiveInput(nn.Module):
    """Adaptive input embeddings (Baevski & Auli, 2019): frequency bands of the vocabulary get
    embeddings of dimension d / div_val^i, each projected to d."""

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


class DEQTransformerLM(nn.Module):
    """Embedding -> DEQ(DEQTransformerCell) with segment memory -> (adaptive) softmax.

    ``cutoffs`` empty: tied input/output embeddings. Otherwise adaptive input and adaptive
    softmax with those cutoffs (token ids are frequency-ranked, see tasks/lm/data.py).
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
        pre_ln: bool = False,
        cutoffs: Sequence[int] = (),
        div_val: float = 4.0,
    ):
        super().__init__()
        cutoffs = [c for c in cutoffs if c < n_token]
        self.d_model = d_model
        if cutoffs:
            self.embed = AdaptiveInput(n_token, d_model, cutoffs, div_val)
            self.softmax = nn.AdaptiveLogSoftmaxWithLoss(
                d_model, n_token, cutoffs, div_value=div_val
            )
            self.out_bias = None
        else:
            self.embed = nn.Embedding(n_token, d_model)
            self.softmax = None
            self.out_bias = nn.Parameter(torch.zeros(n_token))
            nn.init.normal_(self.embed.weight, std=0.02)
        self.inject_net = nn.Linear(d_model, 3 * n_head * d_head)
        self.cell = DEQTransformerCell(d_model, n_head, d_head, d_inner, dropout, pre_ln)
        self.emb_drop = VariationalDropout(emb_dropout, shared_dims=(1,))
        self.out_drop = VariationalDropout(dropout, shared_dims=(1,))

    def inject(self, x: Tensor, mem: Tensor | None = None) -> tuple[Context, Tensor]:
        """Injection context and z0 for a segment x (B, L), given the memory (B, M, D)."""
        b, length = x.shape
        e = self.emb_drop(self.embed(x) * math.sqrt(self.d_model))
        if mem is None:
            mem = e.new_zeros(b, 0, self.d_model)
        m = mem.shape[1]
        distances = torch.arange(m + length - 1, -1, -1, device=x.device)
        mask = torch.ones(length, m + length, dtype=torch.bool, device=x.device).triu_(1 + m)
        ctx = Context(
            self.inject_net(e), mem.to(e.dtype), sinusoid(distances, self.d_model).to(e.dtype), mask
        )
        return ctx, torch.zeros_like(e)

    def head(self, z: Tensor) -> Tensor:
        return self.out_drop(z)

    def nll(self, h: Tensor, y: Tensor) -> Tensor:
        """Per-token negative log-likelihood (B, L) of targets y under hidden states h."""
        if self.softmax is None:
            logits = F.linear(h, self.embed.weight, self.out_bias)
            return F.cross_entropy(
                logits.flatten(0, 1).float(), y.reshape(-1), reduction="none"
            ).view_as(y)
        logp = self.softmax.log_prob(h.reshape(-1, h.shape[-1]).float())
        return -logp.gather(1, y.reshape(-1, 1)).view_as(y)

    def logits(self, h: Tensor) -> Tensor:
        if self.softmax is None:
            return F.linear(h, self.embed.weight, self.out_bias)
        return self.softmax.log_prob(h.reshape(-1, h.shape[-1])).view(*h.shape[:-1], -1)
