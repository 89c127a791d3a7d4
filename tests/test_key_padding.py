"""Patterns on attention layers whose mask cuts the keys to a prefix (sparsec/key_padding.py): padded
keys, or the causal rule over a prefix (a static KV cache). Each batch row runs its patterns on its
kept keys, exactly as the float64 reference with the explicit masks; any other mask, or one the
layer's mask rule does not admit, runs dense with the mask; sparsec.tune records such calls and its
plan applies to them."""
from __future__ import annotations

import functools
import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparsec
from planted import PlantedLayer, cheap_calls_cpu
from reference import reference_attention, tolerance
from sparsec import key_padding
from sparsec import patterns as P
from sparsec.backend import sparsec_backend
from sparsec.key_padding import MaskPrefix, mask_prefixes
from sparsec.ops import attention as attention_op
from sparsec.ops import dense_attention, patterns_to_json

B, H, S, D = 3, 4, 70, 16


def _random(*shape, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype)


def _prefix(lengths, Sk=S) -> torch.Tensor:
    return torch.arange(Sk)[None, :] < torch.tensor(lengths)[:, None]


def _as_bias(keep: torch.Tensor, dropped: float) -> torch.Tensor:
    return torch.zeros(keep.shape).masked_fill(~keep, dropped)


def _patterns(Sq=S, Sk=S, seed=0):
    g = torch.Generator().manual_seed(seed)
    layout = torch.rand(-(-Sq // 16), -(-Sk // 16), generator=g) < 0.5
    return (P.Window(8, 8), P.Skip("mean"), P.Columns([(0, 4), (60, 70)]) | P.Window(3, 0),
            P.BlockSparse(layout, 16))


LOWEST = torch.finfo(torch.float32).min
PREFIX = _prefix([70, 55, 41])


@pytest.mark.parametrize("mask, want", [
    (PREFIX[:, None, None, :], [70, 55, 41]),
    (_as_bias(PREFIX, float("-inf"))[:, None, None, :], [70, 55, 41]),
    (_as_bias(PREFIX, LOWEST)[:, None, None, :], [70, 55, 41]),                 # transformers' padding bias
    (PREFIX[:, None, None, :].expand(B, H, S, S), [70, 55, 41]),                # expanded: stride 0
    (PREFIX[1], [55, 55, 55]),                                                  # (Sk,): every row alike
    (PREFIX[:, None, None, :].expand(B, 1, S, S).contiguous(), [70, 55, 41]),  # every query's row alike
    (torch.cat([PREFIX[:, None, None, :]] * (S - 1) + [_prefix([9, 9, 9])[:, None, None, :]], dim=2), None),
    (torch.cat([PREFIX[:, None, None, :], _prefix([9, 9, 9])[:, None, None, :]], dim=1), None),  # per head
    (_prefix([70, 55, 0])[:, None, None, :], None),                             # a row with no key
    (~PREFIX[:, None, None, :], None),                                          # keeps a suffix
    (_as_bias(PREFIX, -5.0)[:, None, None, :], None),                           # a bias, not a mask
    (torch.ones(B, 1, 1, S, dtype=torch.long), None),                           # not a bool or float mask
])
def test_padded_keys_are_read_from_the_mask(mask, want):
    found = mask_prefixes(mask, B, S, S)
    assert found == (None if want is None else [MaskPrefix(n) for n in want])


def _causal_prefix(Sq: int, lengths) -> torch.Tensor:
    """(B, 1, Sq, Sk) bool: query i of row b keeps keys j <= i + lengths[b] - Sq (Sk = max(lengths) + 3)."""
    Sk = max(lengths) + 3
    i, j = torch.arange(Sq)[:, None], torch.arange(Sk)[None, :]
    return torch.stack([j <= i + (n - Sq) for n in lengths])[:, None]


def _right_padded(Sq: int, lengths) -> torch.Tensor:
    """(B, 1, Sq, Sq) bool: transformers' causal mask of a right-padded batch, query i of row b
    keeping keys j <= i with j < lengths[b] (its padding rows keep all lengths[b] keys)."""
    i, j = torch.arange(Sq)[:, None], torch.arange(Sq)[None, :]
    return torch.stack([(j <= i) & (j < n) for n in lengths])[:, None]


def _causal_reference(q, k, v, patterns, lengths):
    """Row b: its queries against its first lengths[b] keys, under the causal rule (float64)."""
    return torch.cat([reference_attention(q[b:b + 1], k[b:b + 1, :, :n], v[b:b + 1, :, :n], patterns, causal=True)
                      for b, n in enumerate(lengths)])


@pytest.mark.parametrize("mask, Sq, want", [
    (_causal_prefix(6, [6, 6, 6]), 6, [MaskPrefix(6, 0)] * 3),                 # a static cache's prefill
    (_causal_prefix(6, [6, 9, 20]), 6, [MaskPrefix(6, 0), MaskPrefix(9, 3), MaskPrefix(20, 14)]),
    (_causal_prefix(1, [5, 5, 8]), 1, [MaskPrefix(5, 4)] * 2 + [MaskPrefix(8, 7)]),  # decoding steps
    (_right_padded(6, [6, 4, 2]), 6, [MaskPrefix(6, 0), MaskPrefix(4, 0), MaskPrefix(2, 0)]),
    (_causal_prefix(6, [6, 6, 6]).transpose(-1, -2)[..., :6, :], 6, None),       # keeps suffixes
    (_causal_prefix(6, [5, 6, 6]), 6, None),                                  # row 0's first query keeps nothing
])
def test_causal_prefixes_are_read_from_the_mask(mask, Sq, want):
    assert mask_prefixes(mask, B, Sq, mask.shape[-1]) == want


def test_patterns_run_under_the_causal_rule_on_each_rows_prefix():
    Sq, lengths = 20, [20, 31, 26]
    mask = _causal_prefix(Sq, lengths)
    Sk = mask.shape[-1]
    q = _random(B, H, Sq, D, seed=20)
    k, v = (_random(B, 2, Sk, D, seed=s) for s in (21, 22))
    patterns = (P.Window(4, 0), P.Skip("mean"), P.AShape(2, 3), P.Columns([(0, 3), (25, 40)]))
    got = attention_op(q, k, v, mask, D ** -0.5, False, patterns_to_json(patterns))
    torch.testing.assert_close(got.double(), _causal_reference(q, k, v, patterns, lengths), atol=2e-5, rtol=2e-5)


def _explicit_reference(q, k, v, patterns, keep, scale=D ** -0.5):
    """float64: head h of row b attends under patterns[h].mask(Sq, Sk) & keep[b] ((B, Sq, Sk) bool);
    Skip heads: the mean of V over keep[b]'s keys of each query, or 0. Rows with no key give 0."""
    B, Hq, Sq, _ = q.shape
    Sk, group = k.shape[2], Hq // k.shape[1]
    out = torch.zeros(B, Hq, Sq, v.shape[-1], dtype=torch.float64)
    for b in range(B):
        for h, p in enumerate(patterns):
            kb, vb = k[b, h // group].double(), v[b, h // group].double()
            if isinstance(p, P.Skip):
                if p.fill == "mean":
                    out[b, h] = (keep[b].double() / keep[b].sum(-1, keepdim=True).clamp(min=1)) @ vb
                continue
            scores = (q[b, h].double() @ kb.T) * scale
            probs = scores.masked_fill(~(p.mask(Sq, Sk) & keep[b]), float("-inf")).softmax(-1).nan_to_num(0.0)
            out[b, h] = probs @ vb
    return out


def test_a_right_padded_batch_runs_its_rows_under_the_causal_rule_and_its_padding_exactly():
    """transformers' causal mask of a right-padded batch: each row's real queries run the patterns under
    the causal rule on its kept keys, its padding queries against all of them (explicit masks)."""
    Sq, lengths = 48, [48, 30, 7]
    mask = _right_padded(Sq, lengths)
    q = _random(B, H, Sq, D, seed=40)
    k, v = (_random(B, 2, Sq, D, seed=s) for s in (41, 42))
    patterns = (P.Window(5, 0), P.Skip("mean"), P.AShape(2, 6) | P.Columns([(20, 24)]), P.Dense())
    got = attention_op(q, k, v, mask, D ** -0.5, False, patterns_to_json(patterns), mask_rule="causal:0")
    torch.testing.assert_close(got.double(), _explicit_reference(q, k, v, patterns, mask[:, 0]), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("rule, mask, runs", [
    ("causal:0", _causal_prefix(6, [6, 6, 6]), True),     # prefill from position 0: as tuned
    ("causal:0", _causal_prefix(6, [9, 9, 9]), False),    # a later chunk: its queries are positions 3..8
    ("causal:0", _causal_prefix(1, [7, 7, 7]), False),    # a decoding step
    ("causal:3", _causal_prefix(6, [9, 9, 9]), True),
    ("keys", _causal_prefix(6, [6, 6, 6]), False),        # tuned without the causal rule
    ("keys", _prefix([6, 4, 6], 9)[:, None, None, :], True),
    ("", _causal_prefix(1, [7, 7, 7]), True),              # attention_patterns: as given
])
def test_the_mask_rule_decides_which_calls_run_the_patterns(rule, mask, runs):
    from sparsec.key_padding import key_prefix_runs

    Sq, Sk = mask.shape[-2], mask.shape[-1]
    q, k = _random(B, H, Sq, D, seed=23), _random(B, H, Sk, D, seed=24)
    found = key_prefix_runs(q, k, mask, False, (P.Window(2, 0),) * H, rule)
    assert (found is not None) == runs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["bool", "-inf", "lowest"])
def test_patterns_run_on_each_rows_kept_keys(kind, dtype):
    q, k, v = (_random(B, H, S, D, seed=s, dtype=dtype) for s in (1, 2, 3))
    lengths = [55, 70, 55]
    keep = _prefix(lengths)
    mask = {"bool": keep, "-inf": _as_bias(keep, float("-inf")), "lowest": _as_bias(keep, LOWEST)}[kind]
    patterns = _patterns()
    got = attention_op(q, k, v, mask[:, None, None, :].to(dtype if kind != "bool" else torch.bool), D ** -0.5,
                       False, patterns_to_json(patterns))
    want = reference_attention(q, k, v, patterns, key_mask=keep)
    atol, rtol = tolerance(dtype)
    torch.testing.assert_close(got.double(), want, atol=atol, rtol=rtol)


def test_gqa_cross_attention_and_layouts_sized_for_the_prefix():
    """Cross-attention (Sq != Sk) with GQA; block layouts cut to each row's key blocks, or sized for
    the longest row's (as a plan tuned on padded calls has them)."""
    Sq, Sk = 33, 50
    q = _random(2, 4, Sq, D, seed=4)
    k, v = (_random(2, 2, Sk, D, seed=s) for s in (5, 6))
    keep = _prefix([50, 29], Sk)
    narrow = P.BlockSparse(torch.rand(3, 4, generator=torch.Generator().manual_seed(1)) < 0.6, 16)  # 4 x 16 >= 50
    patterns = (P.Columns([(0, 9)]), narrow, P.Dense(), P.Skip("zero"))
    got = attention_op(q, k, v, keep[:, None, None, :], D ** -0.5, False, patterns_to_json(patterns))
    torch.testing.assert_close(got.double(), reference_attention(q, k, v, patterns, key_mask=keep), atol=2e-5,
                               rtol=2e-5)


def test_the_triton_kernels_run_the_kept_keys_too(monkeypatch):
    """The slices are strided views: the Triton kernels (Triton's interpreter here) take them as they are."""
    monkeypatch.setenv("SPARSEC_ATTENTION_BACKEND", "triton")
    q, k, v = (_random(2, 2, 40, D, seed=s) for s in (14, 15, 16))
    keep = _prefix([40, 27], 40)
    patterns = (P.Window(5, 5), P.Columns([(0, 3)]) | P.Window(2, 0))
    got = attention_op(q, k, v, keep[:, None, None, :], D ** -0.5, False, patterns_to_json(patterns))
    torch.testing.assert_close(got.double(), reference_attention(q, k, v, patterns, key_mask=keep), atol=2e-5,
                               rtol=2e-5)


@pytest.mark.parametrize("kind", ["padded keys", "causal prefix", "right padded"])
def test_gradients_match_the_reference(kind, grad_blocks):
    Sq, lengths = {"padded keys": (S, [70, 48, 48]), "causal prefix": (40, [40, 52, 45]),
                   "right padded": (40, [40, 31, 9])}[kind]
    Sk = {"padded keys": S, "causal prefix": max(lengths) + 3, "right padded": Sq}[kind]
    q = _random(B, H, Sq, D, seed=7).requires_grad_()
    k, v = (_random(B, H, Sk, D, seed=s).requires_grad_() for s in (8, 9))
    mask = {"padded keys": _prefix(lengths, Sk)[:, None, None, :], "causal prefix": _causal_prefix(Sq, lengths),
            "right padded": _right_padded(Sq, lengths)}[kind]
    patterns = _patterns(seed=3) if kind == "padded keys" else (P.Window(4, 0), P.Skip("mean"), P.AShape(2, 3),
                                                                 P.Columns([(0, 3), (25, 40)]))
    out = attention_op(q, k, v, mask, D ** -0.5, False, patterns_to_json(patterns))
    weights = _random(*out.shape, seed=10)
    grads = torch.autograd.grad((out * weights).sum(), (q, k, v))
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    want = {"padded keys": lambda: reference_attention(q64, k64, v64, patterns, key_mask=_prefix(lengths, Sk)),
            "causal prefix": lambda: _causal_reference(q64, k64, v64, patterns, lengths),
            "right padded": lambda: _explicit_reference(q64, k64, v64, patterns, mask[:, 0])}[kind]()
    want = torch.autograd.grad((want * weights).sum(), (q64, k64, v64))
    for g, w in zip(grads, want):
        torch.testing.assert_close(g.double(), w, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", ["not a prefix", "causal", "layout too narrow", "per query"])
def test_other_masks_run_dense_with_the_mask(case, caplog):
    q, k, v = (_random(B, H, S, D, seed=s) for s in (11, 12, 13))
    keep = _prefix([70, 55, 41])
    mask, causal, patterns = keep[:, None, None, :], False, _patterns()
    if case == "not a prefix":
        mask = mask.clone()
        mask[1, 0, 0, 3] = False
    elif case == "causal":
        causal = True
    elif case == "layout too narrow":  # attention_patterns' layout for 48 keys cannot say which of 70 to keep
        patterns = (P.BlockSparse(torch.ones(5, 3, dtype=torch.bool), 16),) * H
    else:
        mask = (torch.rand(B, 1, S, S, generator=torch.Generator().manual_seed(2)) < 0.7) | torch.eye(S, dtype=bool)
    with caplog.at_level(logging.INFO, logger="sparsec.ops"):
        got = attention_op(q, k, v, mask, D ** -0.5, causal, patterns_to_json(patterns), site=f"layer {case}")
    torch.testing.assert_close(got, dense_attention(q, k, v, mask, D ** -0.5, causal), atol=0, rtol=0)
    assert f"layer {case}" in caplog.text and "dense, with the mask" in caplog.text


def test_a_plans_layout_short_of_a_rows_keys_keeps_the_keys_past_it():
    """A plan tuned on shorter text has layouts with fewer key blocks than a longer row needs: under a
    plan's rule the blocks past them are kept (no calibration call had those keys), not dropped."""
    q, k, v = (_random(B, H, S, D, seed=s) for s in (60, 61, 62))
    keep = _prefix([70, 55, 41])
    layout = torch.rand(5, 3, generator=torch.Generator().manual_seed(4)) < 0.5  # 48 keys' blocks
    patterns = (P.BlockSparse(layout, 16),) * H
    got = attention_op(q, k, v, keep[:, None, None, :], D ** -0.5, False, patterns_to_json(patterns), mask_rule="keys")
    widened = (P.BlockSparse(torch.cat([layout, torch.ones(5, 2, dtype=torch.bool)], dim=1), 16),) * H
    torch.testing.assert_close(got.double(), reference_attention(q, k, v, widened, key_mask=keep), atol=2e-5,
                               rtol=2e-5)


class Holding(nn.Module):
    """A model holding one attention module under `name`: its module path, which a plan names."""

    def __init__(self, name: str, module: nn.Module):
        super().__init__()
        self.held = name
        self.add_module(name, module)

    def forward(self, *args):
        return getattr(self, self.held)(*args)


TEXT = 48  # text tokens after the video tokens, padded at the end


class JointAttention(nn.Module):
    """Self-attention over [video, text] tokens whose text is padded at the end: the mask keeps keys
    j < video + text length of each row (HunyuanVideo's (B, 1, 1, S) bool mask)."""

    def forward(self, q, k, v, text_lengths):
        S = q.shape[2]
        keep = torch.arange(S, device=q.device)[None, :] < (S - TEXT + text_lengths)[:, None]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None, None, :])


def test_a_padded_layer_is_tuned_on_its_kept_keys_and_runs_its_plan():
    # stripes and near-uniform heads (bands and frames are built from quadratic position features whose
    # logits lose ~1e-3 in float32 at S = 512, dense SDPA included: too coarse for an exact comparison)
    layer = PlantedLayer(("stripes", "uniform", "stripes", "random"), 512, 32, seed=5)
    model = Holding("joint", JointAttention())
    calibration = (*layer.sample(2, seed=1), torch.tensor([TEXT - 16, TEXT - 16]))
    plan = sparsec.tune(model, calibration, target=cheap_calls_cpu(), budget=0.05, progress=False)
    planned = plan.layers["joint"]
    assert (planned.q_len, planned.kv_len) == (512, 512 - 16)
    assert sum(not isinstance(p, P.Dense) for p in planned.patterns) >= 2  # the stripes, the near-uniform head
    fresh = (*layer.sample(2, seed=2), torch.tensor([TEXT, 5]))
    runs = []
    with torch.no_grad(), _counting(runs):
        got = torch.compile(model, backend="sparsec", options={"plan": plan, "inner": "eager"})(*fresh)
    assert runs == [[(0, 512), (1, 512 - TEXT + 5)]]
    q, k, v, lengths = fresh
    want = reference_attention(q, k, v, planned.patterns, key_mask=_prefix((512 - TEXT + lengths).tolist(), 512))
    torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=2e-5)


class _counting:
    """Records (row, kept keys) of each run_key_prefix call into `calls`."""

    def __init__(self, calls: list):
        self.calls, self.original = calls, key_padding.run_key_prefix

    def __enter__(self):
        def counted(q, k, v, runs, attend, *args):
            self.calls.append(sorted((row, run.prefix.length) for run in runs for row in run.rows))
            return self.original(q, k, v, runs, attend, *args)

        import sparsec.ops
        sparsec.ops.run_key_prefix = counted

    def __exit__(self, *exc):
        import sparsec.ops
        sparsec.ops.run_key_prefix = self.original


@pytest.mark.models
def test_hunyuan_video_runs_patterns_on_its_padded_joint_attention():
    """diffusers' HunyuanVideo joins video and text tokens and pads the text with a (B, 1, 1, S) key
    mask: its double- and single-stream blocks run their patterns on the kept keys (the token
    refiner's mask varies with the query: it stays dense) and match eager."""
    diffusers = pytest.importorskip("diffusers")
    cls = getattr(diffusers, "HunyuanVideoTransformer3DModel", None)
    if cls is None:
        pytest.skip("this diffusers has no HunyuanVideoTransformer3DModel")
    torch.manual_seed(3)
    model = cls(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=10, num_layers=1,
                num_single_layers=1, num_refiner_layers=1, patch_size=1, patch_size_t=1, guidance_embeds=True,
                text_embed_dim=16, pooled_projection_dim=8, rope_axes_dim=(2, 4, 4)).eval()
    text_mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]])
    inputs = (torch.randn(2, 4, 2, 4, 4), torch.tensor([10, 10]), torch.randn(2, 6, 16), text_mask,
              torch.randn(2, 8), torch.tensor([3.0, 3.0]))
    every_key = P.Columns([(0, 1 << 20)])  # keeps every key: the sparse path, the dense result
    options = {"attention_patterns": {"transformer_blocks.*": every_key, "single_transformer_blocks.*": every_key},
               "inner": "eager", "fallback": "raise"}
    runs = []
    with torch.no_grad():
        want = model(*inputs).sample
        with _counting(runs):
            got = torch.compile(model, backend=functools.partial(sparsec_backend, options=options))(
                *inputs).sample
    video = 2 * 4 * 4
    assert runs == [[(0, video + 6), (1, video + 3)]] * 2
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.models
def test_bert_padding_masks_run_the_patterns_on_the_kept_keys():
    """transformers' BERT passes a materialized (B, 1, S, S) padding mask: its rows are all alike, so
    the patterns run on each row's kept keys (a pattern that keeps every key: the result is eager's)."""
    from tests import hf_models

    model, (ids, padding) = hf_models.bert("sdpa")
    lengths = padding.sum(-1).tolist()
    runs = []
    every_key = P.Columns([(0, 1 << 20)])
    with torch.no_grad():
        want = model(ids, padding).last_hidden_state
        with _counting(runs):
            compiled = torch.compile(model, backend=functools.partial(sparsec_backend, options={
                "attention_patterns": {"*": every_key}, "inner": "eager", "fallback": "raise"}))
            got = compiled(ids, padding).last_hidden_state
    assert runs == [sorted(enumerate(lengths))] * hf_models.LAYERS
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


CACHE = 320


class CachedAttention(nn.Module):
    """gpt-fast's static KV cache: k and v written in place at `positions`, attention over the whole
    cache with the mask j <= position (a prefill from 0, a later chunk, or one decoding query)."""

    def __init__(self, heads: int, head_dim: int):
        super().__init__()
        self.register_buffer("k_cache", torch.zeros(1, heads, CACHE, head_dim))
        self.register_buffer("v_cache", torch.zeros(1, heads, CACHE, head_dim))

    def forward(self, q, k, v, positions):
        self.k_cache.index_copy_(2, positions, k)
        self.v_cache.index_copy_(2, positions, v)
        mask = torch.arange(CACHE, device=q.device)[None, :] <= positions[:, None]
        return F.scaled_dot_product_attention(q, self.k_cache, self.v_cache, attn_mask=mask[None, None])


def test_a_static_cache_runs_a_causal_plan_on_its_prefill_and_decodes_dense():
    """Tuned on a prefill (the causal rule over the first 256 cache slots), the plan runs on a fresh
    prefill from position 0, and not on a decoding step or a later chunk, whose queries sit further on
    (dense with the mask there); every output equals the float64 reference of what ran."""
    layer = PlantedLayer(("stripes", "uniform", "stripes", "random"), 256, 32, causal=True, seed=6)
    positions = torch.arange(256)
    plan = sparsec.tune(Holding("attn", CachedAttention(4, 32)), (*layer.sample(1, seed=1), positions),
                        target=cheap_calls_cpu(), budget=0.05, progress=False)
    planned = plan.layers["attn"]
    assert (planned.q_len, planned.kv_len, planned.causal) == (256, 256, True)
    assert sum(not isinstance(p, P.Dense) for p in planned.patterns) >= 2
    model = Holding("attn", CachedAttention(4, 32))
    compiled = torch.compile(model, backend="sparsec", options={"plan": plan, "inner": "eager"})
    q, k, v = layer.sample(1, seed=2)
    g = torch.Generator().manual_seed(3)
    step = [torch.randn(1, 4, 1, 32, generator=g) for _ in range(3)]
    chunk = [torch.randn(1, 4, 8, 32, generator=g) for _ in range(3)]
    runs = []
    with torch.no_grad(), _counting(runs):
        prefill = compiled(q, k, v, positions)
        assert runs == [[(0, 256)]]
        decoded = compiled(*step, torch.tensor([256]))
        later = compiled(*chunk, torch.arange(257, 265))
    assert len(runs) == 1  # the decoding step and the later chunk ran dense
    torch.testing.assert_close(prefill.double(), reference_attention(q, k, v, planned.patterns, causal=True),
                               atol=2e-5, rtol=2e-5)
    keys = [torch.cat([k, step[1], chunk[1]], dim=2), torch.cat([v, step[2], chunk[2]], dim=2)]
    dense = (P.Dense(),) * 4
    torch.testing.assert_close(decoded.double(), reference_attention(step[0], keys[0][:, :, :257], keys[1][:, :, :257],
                                                                     dense, causal=True), atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(later.double(), reference_attention(chunk[0], *keys, dense, causal=True),
                               atol=2e-5, rtol=2e-5)


class QueryMasked(nn.Module):
    """Self-attention whose mask varies with the query (each keeps keys at or after it): no prefix."""

    def forward(self, q, k, v):
        S = q.shape[2]
        keep = torch.ones(S, S, dtype=torch.bool, device=q.device).triu()
        return F.scaled_dot_product_attention(q, k, v, attn_mask=keep)


def test_tune_says_why_a_model_with_only_other_masks_gets_an_empty_plan(caplog):
    inputs = tuple(_random(1, 2, 16, 8, seed=s) for s in (30, 31, 32))
    with caplog.at_level(logging.WARNING, logger="sparsec.model_tuning"):
        plan = sparsec.tune(Holding("attn", QueryMasked()), inputs, target="cpu", progress=False)
    assert not plan.layers
    assert "none of the model's 1 attention layers can be tuned" in caplog.text


@pytest.mark.models
def test_a_right_padded_llama_batch_runs_the_patterns_on_its_rows():
    """transformers' Llama with a right-padded batch: one (B, 1, S, S) mask, the causal rule and the
    padding; every row runs the patterns (a pattern that keeps every key: the result is eager's)."""
    from tests import hf_models

    model, _ = hf_models.llama("sdpa")
    ids = torch.randint(0, hf_models.VOCAB, (2, hf_models.SEQ))
    padding = torch.ones(2, hf_models.SEQ, dtype=torch.long)
    padding[1, 5:] = 0
    runs = []
    with torch.no_grad():
        want = model(ids, attention_mask=padding).last_hidden_state
        with _counting(runs):
            compiled = torch.compile(model, backend=functools.partial(sparsec_backend, options={
                "attention_patterns": {"*": P.Columns([(0, 1 << 20)])}, "inner": "eager", "fallback": "raise"}))
            got = compiled(ids, attention_mask=padding).last_hidden_state
    assert runs == [[(0, hf_models.SEQ), (1, 5)]] * hf_models.LAYERS
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


class RightPaddedCausal(nn.Module):
    """Causal self-attention over a right-padded batch, masked as transformers does: j <= i and j < length."""

    def forward(self, q, k, v, lengths):
        S = q.shape[2]
        i, j = torch.arange(S, device=q.device)[:, None], torch.arange(S, device=q.device)[None, :]
        keep = (j <= i)[None] & (j[None] < lengths[:, None, None])
        return F.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None])


def test_a_causal_plan_tuned_on_a_right_padded_batch_runs_on_another():
    """Tuned on a right-padded batch (each row's real queries against its real keys, under the causal
    rule), the plan runs on a batch padded otherwise: each row's real queries sparse, its padding exact."""
    layer = PlantedLayer(("stripes", "uniform", "stripes", "random"), 256, 32, causal=True, seed=7)
    plan = sparsec.tune(Holding("attn", RightPaddedCausal()), (*layer.sample(2, seed=1), torch.tensor([200, 200])),
                        target=cheap_calls_cpu(), budget=0.05, progress=False)
    planned = plan.layers["attn"]
    assert (planned.q_len, planned.kv_len, planned.causal) == (200, 200, True)
    assert sum(not isinstance(p, P.Dense) for p in planned.patterns) >= 2
    q, k, v = layer.sample(2, seed=2)
    lengths = torch.tensor([256, 180])
    runs = []
    with torch.no_grad(), _counting(runs):
        compiled = torch.compile(Holding("attn", RightPaddedCausal()), backend="sparsec",
                                 options={"plan": plan, "inner": "eager"})
        got = compiled(q, k, v, lengths)
    assert runs == [[(0, 256), (1, 180)]]
    i, j = torch.arange(256)[:, None], torch.arange(256)[None, :]
    keep = (j <= i)[None] & (j[None] < lengths[:, None, None])
    torch.testing.assert_close(got.double(), _explicit_reference(q, k, v, planned.patterns, keep, 32 ** -0.5),
                               atol=2e-5, rtol=2e-5)


def test_explain_says_how_a_masked_layer_runs_its_patterns():
    q, k, v = (_random(1, 2, 64, 8, seed=s) for s in (50, 51, 52))
    report = sparsec.explain(Holding("joint", JointAttention()), q, k, v, torch.tensor([5]),
                             options={"attention_patterns": {"joint": P.Window(4, 4)}})
    assert ("attention joint: heads 2/2, mask (patterns where it cuts the keys to a prefix or pads rows on the left, "
            "rule 'any')") in str(report)
    dense = sparsec.explain(Holding("joint", JointAttention()), q, k, v, torch.tensor([5]),
                            options={"mask_bands": "off"})
    assert "attention joint: heads 2/2, mask, scale" in str(dense)
    kept = sparsec.explain(Holding("joint", JointAttention()), q, k, v, torch.tensor([5]), options={"mask_bands": "on"})
    assert "attention joint: heads 2/2, mask (runs by what it keeps: " in str(kept)


def test_the_bundled_dit_with_joint_text_runs_its_plan_exactly():
    """sparsec.models' tiny DiT in HunyuanVideo's layout (joint_text: self-attention over [video,
    text] tokens, the text padded): tuned with all its text real, the plan runs on fresh inputs whose
    text is padded, and equals the eager model under the plan's patterns as explicit masks."""
    from sparsec.models import TinyDiTConfig, example_inputs, tiny_dit, with_roles

    config = with_roles(TinyDiTConfig(frames=4, height=16, width=16, joint_text=True, text_len=32))
    model, _ = tiny_dit(config)
    calibration = (*example_inputs(config, seed=1)[:3], torch.tensor([32]))
    plan = sparsec.tune(model, calibration, target=cheap_calls_cpu(), budget=0.05, progress=False)
    assert set(plan.layers) == {"blocks.0.attn", "blocks.1.attn"}
    assert any(not isinstance(p, P.Dense) for layer in plan.layers.values() for p in layer.patterns)
    fresh = (*example_inputs(config, seed=2)[:3], torch.tensor([9]))
    runs = []
    with torch.no_grad(), _counting(runs):
        got = torch.compile(model, backend="sparsec", options={"plan": plan, "inner": "eager"})(*fresh)
    assert runs and all(r == [(0, config.tokens + 9)] for r in runs)
    for b, block in enumerate(model.blocks):
        block.attn.head_patterns = tuple(plan.layers[f"blocks.{b}.attn"].patterns)
    with torch.no_grad():
        want = model(*fresh)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_tuning_takes_the_most_common_row_shape_and_the_longest_on_ties():
    from sparsec.model_tuning import _most_common_lengths
    from sparsec.passes.attention_stats import LayerSample

    def rows(*lengths):
        return [LayerSample(torch.zeros(1, 1, n, 4), torch.zeros(1, 1, n, 4), torch.zeros(1, 1, n, 4), causal=True)
                for n in lengths]

    assert [s.q.shape[2] for s in _most_common_lengths("layer", rows(25, 32))] == [32]
    assert [s.q.shape[2] for s in _most_common_lengths("layer", rows(32, 25))] == [32]
    assert [s.q.shape[2] for s in _most_common_lengths("layer", rows(25, 32, 25))] == [25, 25]


def test_a_union_whose_layouts_are_one_once_cut_runs_as_that_layout():
    """Two layouts that differ only past a shorter call's corner are one pattern there (found by
    fuzzing: building their Union raised "a Union needs at least two distinct patterns")."""
    a, b = P.BlockSparse([[1, 0], [0, 1]], 16), P.BlockSparse([[1, 1], [0, 1]], 16)
    corner = P.BlockSparse([[1]], 16)
    assert key_padding.patterns_at((a | b, a | b | P.Window(1, 0)), 16, 16) == (corner, corner | P.Window(1, 0))
    q, k, v = (_random(1, 2, 16, D, seed=s) for s in (1, 2, 3))
    patterns = (a | b, a | b | P.Window(1, 0))
    got = attention_op(q, k, v, None, D ** -0.5, True, patterns_to_json(patterns))
    torch.testing.assert_close(got.double(), reference_attention(q, k, v, (P.Dense(), P.Dense()), causal=True,
                                                                 scale=D ** -0.5), atol=2e-5, rtol=2e-5)
