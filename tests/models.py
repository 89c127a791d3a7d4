"""Hand-written test models: small, deterministic factories with fresh random inputs.

Each factory returns `(model.eval(), example_inputs)`; weights come from a fixed seed (so two calls
build the same model) and inputs from the global generator (fresh every call). EXPECTED maps a
factory name to (attention layers, nn.Linear layers) that sparsec must find in the whole model,
summed over all graphs Dynamo produces (graph breaks included).

The attention code paths mimic what real libraries write, so the matchers see realistic ATen:
SDPA with is_causal / bool masks / scale= / enable_gqa, and hand-written matmul -> scale ->
mask (masked_fill / where / additive bias) -> softmax -> matmul, with GQA by repeat_interleave
or the HF expand+reshape `repeat_kv`.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["MODEL_FACTORIES", "EXPECTED", "repeat_kv"]

EMBED = 32
HEADS = 4
KV_HEADS = 2
SEQ = 8
BATCH = 2


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """HF transformers' GQA expansion: (B, Hkv, S, D) -> (B, Hkv * n_rep, S, D) by expand+reshape."""
    if n_rep == 1:
        return x
    b, h, s, d = x.shape
    return x[:, :, None, :, :].expand(b, h, n_rep, s, d).reshape(b, h * n_rep, s, d)


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    b, s, _ = x.shape
    return x.view(b, s, heads, -1).transpose(1, 2)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    b, h, s, d = x.shape
    return x.transpose(1, 2).reshape(b, s, h * d)


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


# -- GPT-style causal decoders -------------------------------------------------------------------

class CausalSelfAttention(nn.Module):
    """GQA causal self-attention. `mode` picks the attention code path:
    "sdpa" (is_causal, repeat_interleave GQA), "sdpa_gqa" (is_causal, enable_gqa),
    "masked_fill" / "where" (tril buffer, repeat_kv) and "bias" (additive -inf bias, repeat_kv).
    """

    def __init__(self, dim: int, heads: int, kv_heads: int, max_seq: int, mode: str):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim, self.mode = heads, kv_heads, dim // heads, mode
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(dim, kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(dim, kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(dim, dim)
        tril = torch.tril(torch.ones(max_seq, max_seq, dtype=torch.bool))
        self.register_buffer("tril", tril, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.shape[1]
        q = _split_heads(self.q_proj(x), self.heads)
        k = _split_heads(self.k_proj(x), self.kv_heads)
        v = _split_heads(self.v_proj(x), self.kv_heads)
        rep = self.heads // self.kv_heads
        if self.mode == "sdpa":
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        elif self.mode == "sdpa_gqa":
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        else:
            out = self._manual(q, repeat_kv(k, rep), repeat_kv(v, rep), s)
        return self.o_proj(_merge_heads(out))

    def _manual(self, q, k, v, s):
        scores = torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(self.head_dim)
        keep = self.tril[:s, :s]
        if self.mode == "masked_fill":
            scores = scores.masked_fill(~keep, float("-inf"))
        elif self.mode == "where":
            scores = torch.where(keep, scores, torch.finfo(scores.dtype).min)
        else:
            bias = torch.zeros(s, s, dtype=scores.dtype).masked_fill(~keep, float("-inf"))
            scores = scores + bias
        probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        probs = F.dropout(probs, p=0.0, training=self.training)
        return torch.matmul(probs, v)


class DecoderBlock(nn.Module):
    def __init__(self, dim: int, mode: str):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = CausalSelfAttention(dim, HEADS, KV_HEADS, SEQ * 2, mode)
        self.mlp = MLP(dim, 2 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class Decoder(nn.Module):
    """Token embedding, decoder blocks (one attention mode each), LM head."""

    def __init__(self, modes: tuple[str, ...], vocab: int = 50):
        super().__init__()
        self.embed = nn.Embedding(vocab, EMBED)
        self.blocks = nn.ModuleList(DecoderBlock(EMBED, m) for m in modes)
        self.ln_f = nn.LayerNorm(EMBED)
        self.lm_head = nn.Linear(EMBED, vocab, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))


def gpt_sdpa() -> tuple[nn.Module, tuple]:
    """Causal decoder on SDPA(is_causal=True): GQA by repeat_interleave, then by enable_gqa."""
    torch.manual_seed(0)
    model = Decoder(("sdpa", "sdpa_gqa"))
    return model.eval(), (torch.randint(0, 50, (BATCH, SEQ)),)


def gpt_manual() -> tuple[nn.Module, tuple]:
    """Causal decoder with hand-written attention: masked_fill, where and additive -inf bias."""
    torch.manual_seed(1)
    model = Decoder(("masked_fill", "where", "bias"))
    return model.eval(), (torch.randint(0, 50, (BATCH, SEQ)),)


# -- BERT/ViT-style encoder with a padding mask --------------------------------------------------

class EncoderSelfAttention(nn.Module):
    """Fused-qkv self-attention; `manual` uses BERT's additive extended attention mask."""

    def __init__(self, dim: int, heads: int, manual: bool):
        super().__init__()
        self.heads, self.manual = heads, manual
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, keep: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        q, k, v = (_split_heads(t, self.heads) for t in self.qkv(x).chunk(3, dim=-1))
        if self.manual:
            scores = q @ k.transpose(-1, -2) * (q.shape[-1] ** -0.5) + bias
            out = scores.softmax(dim=-1) @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)
        return self.proj(_merge_heads(out))


class EncoderLayer(nn.Module):
    def __init__(self, dim: int, manual: bool):
        super().__init__()
        self.attn = EncoderSelfAttention(dim, HEADS, manual)
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.mlp = MLP(dim, 2 * dim)

    def forward(self, x, keep, bias):
        x = self.ln1(x + self.attn(x, keep, bias))
        return self.ln2(x + self.mlp(x))


class Encoder(nn.Module):
    """Post-norm encoder over features (B, S, E) with a (B, S) 0/1 padding mask."""

    def __init__(self, layers: int, manual: bool):
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(EMBED, manual) for _ in range(layers))
        self.pooler = nn.Linear(EMBED, EMBED)

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        keep = attention_mask[:, None, None, :].bool()  # (B, 1, 1, S): True = attend
        bias = (1.0 - attention_mask[:, None, None, :].to(x.dtype)) * torch.finfo(x.dtype).min
        for layer in self.layers:
            x = layer(x, keep, bias)
        return torch.tanh(self.pooler(x[:, 0]))


def _padding_mask(batch: int, seq: int) -> torch.Tensor:
    """(B, S) int64 0/1 mask; every row keeps at least one token, one row is padded."""
    lengths = torch.randint(1, seq + 1, (batch,))
    lengths[0] = seq // 2
    return (torch.arange(seq)[None, :] < lengths[:, None]).long()


def encoder_sdpa() -> tuple[nn.Module, tuple]:
    """Encoder with a boolean padding attn_mask to SDPA."""
    torch.manual_seed(2)
    model = Encoder(2, manual=False)
    return model.eval(), (torch.randn(BATCH, SEQ, EMBED), _padding_mask(BATCH, SEQ))


def encoder_manual() -> tuple[nn.Module, tuple]:
    """Encoder with hand-written attention and an additive extended attention mask."""
    torch.manual_seed(3)
    model = Encoder(2, manual=True)
    return model.eval(), (torch.randn(BATCH, SEQ, EMBED), _padding_mask(BATCH, SEQ))


# -- DiT-like block with self- and cross-attention -----------------------------------------------

class DiTAttention(nn.Module):
    """Multi-head attention of x to a context (x itself for self-attention), SDPA with scale=."""

    def __init__(self, dim: int, context_dim: int, heads: int, scale: float):
        super().__init__()
        self.heads, self.scale = heads, scale
        self.to_q = nn.Linear(dim, dim)
        self.to_kv = nn.Linear(context_dim, 2 * dim)
        self.to_out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        q = _split_heads(self.to_q(x), self.heads)
        k, v = (_split_heads(t, self.heads) for t in self.to_kv(context).chunk(2, dim=-1))
        out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        return self.to_out(_merge_heads(out))


class DiTBlock(nn.Module):
    """adaLN-modulated self-attention, cross-attention to a context, and an MLP."""

    def __init__(self, dim: int, context_dim: int, heads: int):
        super().__init__()
        self.adaLN = nn.Linear(dim, 6 * dim)
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False)
        self.norm3 = nn.LayerNorm(dim)
        self.attn = DiTAttention(dim, dim, heads, scale=0.3)
        self.cross_attn = DiTAttention(dim, context_dim, heads, scale=0.2)
        self.mlp = MLP(dim, 4 * dim)

    def forward(self, x, context, cond):
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN(F.silu(cond))[:, None].chunk(6, -1)
        h = self.norm1(x) * (1 + scale1) + shift1
        x = x + gate1 * self.attn(h, h)
        x = x + self.cross_attn(self.norm3(x), context)
        h = self.norm2(x) * (1 + scale2) + shift2
        return x + gate2 * self.mlp(h)


class DiT(nn.Module):
    def __init__(self, depth: int = 2, context_dim: int = 24, patch_dim: int = 12):
        super().__init__()
        self.patch_embed = nn.Linear(patch_dim, EMBED)
        self.t_embed = nn.Linear(1, EMBED)
        self.blocks = nn.ModuleList(DiTBlock(EMBED, context_dim, HEADS) for _ in range(depth))
        self.final = nn.Linear(EMBED, patch_dim)

    def forward(self, patches, context, t):
        x = self.patch_embed(patches)
        cond = self.t_embed(t[:, None])
        for block in self.blocks:
            x = block(x, context, cond)
        return self.final(x)


def dit() -> tuple[nn.Module, tuple]:
    """DiT-like model: 2 blocks of self-attention (Sq = Sk = 8) and cross-attention (Sk = 5)."""
    torch.manual_seed(4)
    model = DiT()
    inputs = (torch.randn(BATCH, SEQ, 12), torch.randn(BATCH, 5, 24), torch.rand(BATCH))
    return model.eval(), inputs


# -- graph break -----------------------------------------------------------------------------------

class GraphBreakModel(nn.Module):
    """Two attention blocks with a Dynamo graph break between them (two graphs, one attention each)."""

    def __init__(self):
        super().__init__()
        self.block0 = DecoderBlock(EMBED, "sdpa")
        self.block1 = DecoderBlock(EMBED, "masked_fill")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block0(x)
        torch._dynamo.graph_break()
        return self.block1(x)


def graph_break() -> tuple[nn.Module, tuple]:
    torch.manual_seed(5)
    return GraphBreakModel().eval(), (torch.randn(BATCH, SEQ, EMBED),)


MODEL_FACTORIES: dict[str, Callable[[], tuple[nn.Module, tuple]]] = {
    "gpt_sdpa": gpt_sdpa,
    "gpt_manual": gpt_manual,
    "encoder_sdpa": encoder_sdpa,
    "encoder_manual": encoder_manual,
    "dit": dit,
    "graph_break": graph_break,
}

# (attention layers, nn.Linear layers). Decoder block: 4 attention + 2 MLP linears; LM head 1.
# Encoder layer: qkv, proj + 2 MLP; pooler 1. DiT block: adaLN, 2 attentions of 3 (to_q, to_kv,
# to_out), 2 MLP = 9; patch_embed, t_embed, final 3.
EXPECTED: dict[str, tuple[int, int]] = {
    "gpt_sdpa": (2, 2 * 6 + 1),
    "gpt_manual": (3, 3 * 6 + 1),
    "encoder_sdpa": (2, 2 * 4 + 1),
    "encoder_manual": (2, 2 * 4 + 1),
    "dit": (4, 2 * 9 + 3),
    "graph_break": (2, 2 * 6),
}
