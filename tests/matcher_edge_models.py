"""Attention and linear forms at the edges of what the matchers accept, in one model (one capture).

`EdgeCases.forward` runs every case on the same input; EXPECTED_ATTENTION says, per module path,
what match_attention must report (None: no match, with the reason in the comment), and
EXPECTED_LINEAR which linear module paths match_linear must find.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["EdgeCases", "edge_cases", "EXPECTED_ATTENTION", "EXPECTED_LINEAR"]

B, H, S, D = 2, 2, 6, 8
S_CONTEXT = 4


def _heads(x: torch.Tensor) -> torch.Tensor:
    return x.view(x.shape[0], x.shape[1], H, D).transpose(1, 2)


def _scores_attention(q, k, v, scale):
    return (q @ k.transpose(-2, -1) * scale).softmax(-1) @ v


class PreScaledQAttention(nn.Module):
    """timm style: q = q * scale before q @ k^T."""

    def forward(self, q, k, v):
        return _scores_attention(q * D ** -0.5, k, v, 1.0)


class PreScaledQKAttention(nn.Module):
    """Old diffusers/OpenAI style: q and k both scaled by D ** -0.25, then divided by 2."""

    def forward(self, q, k, v):
        weights = (q * D ** -0.25) @ (k * D ** -0.25).transpose(-1, -2) / 2.0
        return weights.softmax(dim=-1) @ v


class Baddbmm3DAttention(nn.Module):
    """diffusers' classic AttnProcessor: (B*H, S, D) tensors, baddbmm(beta=0, alpha=scale)."""

    def forward(self, q, k, v):
        q3, k3, v3 = (t.reshape(B * H, -1, D) for t in (q, k, v))
        empty = torch.empty(B * H, q3.shape[1], k3.shape[1], dtype=q.dtype)
        scores = torch.baddbmm(empty, q3, k3.transpose(-1, -2), beta=0, alpha=0.25)
        out = torch.bmm(scores.softmax(dim=-1), v3)
        return out.reshape(B, H, -1, D)


class EqMaskAttention(nn.Module):
    """masked_fill with `mask == 0` (positions to drop, not a negation): needs a keep mask."""

    def forward(self, q, k, v, mask):
        scores = q @ k.transpose(-1, -2) / D ** 0.5
        scores = scores.masked_fill(mask[:, None, None, :] == 0, float("-inf"))
        return torch.softmax(scores, dim=-1) @ v


class ProbsReturnedAttention(nn.Module):
    """output_attentions: the probabilities are used outside the attention."""

    def forward(self, q, k, v):
        probs = (q @ k.transpose(-1, -2) * 0.5).softmax(-1)
        return probs @ v, probs


class TiledKVAttention(nn.Module):
    """k.repeat (tiling, head h uses kv head h % Hkv): not GQA's layout, so kept expanded."""

    def forward(self, q, k, v):
        k, v = k[:, :1].repeat(1, H, 1, 1), v[:, :1].repeat(1, H, 1, 1)
        return F.scaled_dot_product_attention(q, k, v)


class DropoutAttention(nn.Module):
    """dropout_p > 0 is passed to SDPA even in eval: not exact, no match."""

    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, dropout_p=0.5)


class CausalCrossAttention(nn.Module):
    """is_causal with Sq != Sk: SDPA aligns the diagonal top-left, sparsec bottom-right."""

    def forward(self, q, context):
        return F.scaled_dot_product_attention(q, context, context, is_causal=True)


class LearnedScaleAttention(nn.Module):
    """A scale held in a parameter is not a constant: no match."""

    def __init__(self):
        super().__init__()
        self.logit_scale = nn.Parameter(torch.tensor(0.3))

    def forward(self, q, k, v):
        return _scores_attention(q, k, v, self.logit_scale)


class SoftFillAttention(nn.Module):
    """masked_fill with 0.0 does not remove keys: not a mask, no match."""

    def forward(self, q, k, v, mask):
        scores = (q @ k.transpose(-1, -2)).masked_fill(mask[:, None, None, :] == 0, 0.0)
        return scores.softmax(-1) @ v


class TrilCausalAttention(nn.Module):
    """where(tril(ones(N, N))[:S, :S], scores, -inf) computed in the graph: the causal rule."""

    def forward(self, q, k, v):
        keep = torch.ones(2 * S, 2 * S, dtype=torch.bool).tril()[: q.shape[2], : k.shape[2]]
        scores = torch.where(keep, q @ k.transpose(-1, -2) * 0.5, float("-inf"))
        return scores.softmax(-1) @ v


class TrilWindowAttention(nn.Module):
    """tril(ones, 1) also keeps the next key: a bool mask, not the causal rule."""

    def forward(self, q, k, v):
        keep = torch.ones(S, S, dtype=torch.bool).tril(1)
        scores = (q @ k.transpose(-1, -2) * 0.5).masked_fill(~keep, float("-inf"))
        return scores.softmax(-1) @ v


class BiasAndMaskAttention(nn.Module):
    """T5's eager attention, unscaled: scores + position bias + additive padding mask, two adds (`biases`
    of them): matched with their sum as one additive mask."""

    def __init__(self, biases: int = 2):
        super().__init__()
        self.position_bias = nn.Parameter(torch.randn(biases - 1, 1, H, S, S))

    def forward(self, q, k, v, mask):
        scores = q @ k.transpose(-1, -2)
        for bias in self.position_bias:
            scores = scores + bias
        scores = scores + (1.0 - mask[:, None, None, :].float()) * torch.finfo(torch.float32).min
        return scores.softmax(-1) @ v


class BoolMaskThenBiasAttention(nn.Module):
    """A bias added to scores a bool mask already filled: two masks of different kinds, no match."""

    def __init__(self):
        super().__init__()
        self.position_bias = nn.Parameter(torch.randn(1, H, S, S))

    def forward(self, q, k, v, mask):
        scores = (q @ k.transpose(-1, -2)).masked_fill(mask[:, None, None, :] == 0, float("-inf"))
        return (scores + self.position_bias).softmax(-1) @ v


class SoftCappedAttention(nn.Module):
    """Gemma 2's eager attention: scores / c, tanh, * c, then the additive mask: soft-capping with c."""

    def forward(self, q, k, v, mask):
        scores = q @ k.transpose(-1, -2) * 0.5
        scores = torch.tanh(scores / 3.0) * 3.0
        scores = scores + (1.0 - mask[:, None, None, :].float()) * torch.finfo(torch.float32).min
        return scores.softmax(-1) @ v


class TanhInsideScaleAttention(nn.Module):
    """2 * tanh(s / 4): out != 1 / in, still c * tanh(s' / c) with c = 2 and s' = s / 2."""

    def forward(self, q, k, v):
        return (torch.tanh(q @ k.transpose(-1, -2) / 4.0) * 2.0).softmax(-1) @ v


class MaskUnderTanhAttention(nn.Module):
    """A mask filled in before the tanh is capped with the scores (-inf becomes -c): no match."""

    def forward(self, q, k, v, mask):
        scores = (q @ k.transpose(-1, -2)).masked_fill(mask[:, None, None, :] == 0, float("-inf"))
        return (torch.tanh(scores / 3.0) * 3.0).softmax(-1) @ v


class EdgeCases(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(H * D, H * D)            # rank-3 input with bias: addmm
        self.proj4d = nn.Linear(D, D)                  # rank-4 input: mm + add of the bias
        self.no_bias = nn.Linear(D, 3, bias=False)     # rank-1 input
        self.cases = nn.ModuleDict({
            "prescaled_q": PreScaledQAttention(), "prescaled_qk": PreScaledQKAttention(), "baddbmm": Baddbmm3DAttention(),
            "eq_mask": EqMaskAttention(), "probs_returned": ProbsReturnedAttention(), "tiled_kv": TiledKVAttention(),
            "dropout": DropoutAttention(), "causal_cross": CausalCrossAttention(), "learned_scale": LearnedScaleAttention(),
            "soft_fill": SoftFillAttention(), "tril_causal": TrilCausalAttention(),
            "tril_window": TrilWindowAttention(), "bias_and_mask": BiasAndMaskAttention(),
            "three_biases": BiasAndMaskAttention(3), "bool_then_bias": BoolMaskThenBiasAttention(),
            "soft_capped": SoftCappedAttention(), "tanh_inside_scale": TanhInsideScaleAttention(),
            "mask_under_tanh": MaskUnderTanhAttention(),
        })

    def forward(self, x, context, mask, weight):
        h = self.proj(x)
        q, k, v = (_heads(h * (i + 1)) for i in range(3))
        c = self.cases
        outs = [c["prescaled_q"](q, k, v), c["prescaled_qk"](q, k, v), c["baddbmm"](q, k, v),
                c["eq_mask"](q, k, v, mask), *c["probs_returned"](q, k, v), c["tiled_kv"](q, k, v),
                c["dropout"](q, k, v), c["causal_cross"](q, _heads(context)),
                c["learned_scale"](q, k, v), c["soft_fill"](q, k, v, mask), c["tril_causal"](q, k, v),
                c["tril_window"](q, k, v), c["bias_and_mask"](q, k, v, mask), c["three_biases"](q, k, v, mask),
                c["bool_then_bias"](q, k, v, mask), c["soft_capped"](q, k, v, mask), c["tanh_inside_scale"](q, k, v),
                c["mask_under_tanh"](q, k, v, mask)]
        linears = [self.proj4d(q), self.no_bias(x[0, 0, :D]), F.linear(x, weight)]
        return outs, linears


def edge_cases() -> tuple[nn.Module, tuple]:
    torch.manual_seed(6)
    mask = torch.ones(B, S, dtype=torch.long)
    mask[0, -2:] = 0
    inputs = (torch.randn(B, S, H * D), torch.randn(B, S_CONTEXT, H * D), mask, torch.randn(5, H * D))
    return EdgeCases().eval(), inputs


# module path -> (scale, mask_kind, num_kv_heads, causal, softcap) of the match, or None for no match.
EXPECTED_ATTENTION: dict[str, tuple[float, str | None, int, bool, float] | None] = {
    "cases.prescaled_q": (D ** -0.5, None, H, False, 0.0),
    "cases.prescaled_qk": (D ** -0.5 / 2.0, None, H, False, 0.0),
    "cases.baddbmm": (0.25, None, H, False, 0.0),
    "cases.eq_mask": (D ** -0.5, "bool", H, False, 0.0),
    "cases.probs_returned": (0.5, None, H, False, 0.0),
    "cases.tiled_kv": (D ** -0.5, None, H, False, 0.0),
    "cases.dropout": None,
    "cases.causal_cross": None,
    "cases.learned_scale": None,
    "cases.soft_fill": None,
    "cases.tril_causal": (0.5, None, H, True, 0.0),
    "cases.tril_window": (0.5, "bool", H, False, 0.0),
    "cases.bias_and_mask": (1.0, "additive", H, False, 0.0),
    "cases.three_biases": (1.0, "additive", H, False, 0.0),
    "cases.bool_then_bias": None,
    "cases.soft_capped": (0.5, "additive", H, False, 3.0),
    "cases.tanh_inside_scale": (0.5, None, H, False, 2.0),
    "cases.mask_under_tanh": None,
}
# F.linear(x, weight) with an input weight is not a layer with a parameter: no match.
EXPECTED_LINEAR = ["proj", "proj4d", "no_bias"]
