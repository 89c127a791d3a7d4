"""Sliding-window masks (Mistral's, Gemma's) run as band patterns (mask rule "band"): detection of
the band in bool and additive masks (unpadded, right-padded, a chunk or decoding step of a cache),
the band's pattern against the explicit mask, the op against a float64 reference, gradients, and
transformers' Gemma 3 through the backend."""
from __future__ import annotations

import logging

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import sparsec
from hf_models import run_compiled, transformers_model
from sparsec import patterns as P
from sparsec.config import parse_options
from sparsec.dump import recording
from sparsec.key_padding import (MaskPrefix, band_pattern, decode_prefixes, encode_prefixes, key_prefix_runs,
                                 mask_prefixes)
from sparsec.ops import BAND_MIN_DECODE_KEYS, BAND_MIN_KEYS, attention as attention_op
from sparsec.ops import patterns_to_json


def band_mask(Sq: int, Sk: int, window: int, offset: int, lengths=(None,)) -> torch.Tensor:
    """(B, 1, Sq, Sk) bool: query i keeps j in [i + offset - window, i + offset] of its row's first
    `length` keys (None: all), as transformers builds a sliding window's causal mask."""
    i, j = torch.arange(Sq)[:, None], torch.arange(Sk)[None, :]
    rows = []
    for length in lengths:
        keep = (j <= i + offset) & (j >= i + offset - window)
        rows.append(keep & (j < (Sk if length is None else length)))
    return torch.stack(rows)[:, None]


def reference(q, k, v, keep, scale):
    """softmax(q k^T * scale) v in float64 over the pairs `keep` (B, 1, Sq, Sk) keeps, GQA expanded."""
    group = q.shape[1] // k.shape[1]
    k, v = (t.double().repeat_interleave(group, dim=1) for t in (k, v))
    scores = (q.double() @ k.transpose(-1, -2)) * scale
    return scores.masked_fill(~keep, float("-inf")).softmax(-1).nan_to_num(0.0) @ v


@pytest.mark.parametrize("window, lengths", [(7, (None, None)), (7, (27, None)), (40, (None,)), (0, (None,)),
                                             (12, (20,))])
def test_sliding_window_masks_read_as_bands(window, lengths):
    mask = band_mask(32, 32, window, 0, lengths)
    found = mask_prefixes(mask, len(lengths), 32, 32)
    want = [MaskPrefix(32 if n is None else n, 0, window if window < 31 else None) for n in lengths]
    assert found == want
    additive = torch.zeros(mask.shape).masked_fill(~mask, float("-inf"))
    assert mask_prefixes(additive, len(lengths), 32, 32) == want
    assert mask_prefixes(mask.expand(len(lengths), 3, 32, 32), len(lengths), 32, 32) == want  # expanded heads


def test_padding_queries_past_the_window_read_as_the_band():
    """A right-padded row's last queries keep no key once the window has passed its length (from
    query L + W on): still the band, those queries give 0 (as SDPA gives a bool mask's empty rows).
    Empty queries the band does not explain are no band."""
    want = [MaskPrefix(20, 0, 3), MaskPrefix(32, 0, 3)]
    assert mask_prefixes(band_mask(32, 32, 3, 0, (20, None)), 2, 32, 32) == want
    early = band_mask(32, 32, 3, 0, (20,))
    early[0, 0, 22] = False  # query 22 still reaches key 19
    assert mask_prefixes(early, 1, 32, 32) is None
    gap = band_mask(32, 32, 3, 0, (20,))
    gap[0, 0, 28, 19] = True  # a key again after the empty queries
    assert mask_prefixes(gap, 1, 32, 32) is None


def test_a_cache_chunk_and_a_decoding_step_read_as_bands():
    assert mask_prefixes(band_mask(6, 40, 9, 30), 1, 6, 40) == [MaskPrefix(36, 30, 9)]  # chunk at position 30
    assert mask_prefixes(band_mask(1, 64, 9, 50), 1, 1, 64) == [MaskPrefix(51, 50, 9)]   # decoding step


@pytest.mark.parametrize("mask", [
    torch.tensor([[1, 1, 0, 1], [1, 1, 1, 1], [0, 1, 1, 1], [0, 0, 1, 1]], dtype=torch.bool),  # two runs
    torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [0, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.bool),  # window varies
    torch.tensor([[0, 1, 0, 0], [0, 1, 1, 0], [0, 1, 1, 1], [0, 1, 1, 1]], dtype=torch.bool),  # key 0 never kept
    torch.tensor([[1, 0, 0, 0], [0, 0, 0, 0], [0, 1, 1, 0], [0, 1, 1, 1]], dtype=torch.bool),  # an empty row
])
def test_other_masks_are_not_bands(mask):
    assert mask_prefixes(mask, 1, 4, 4) is None


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 24), st.integers(1, 40), st.integers(0, 12), st.integers(0, 30))
def test_band_pattern_keeps_the_band(Sq, extra_keys, window, offset):
    Sk = Sq + extra_keys
    offset = min(offset, Sk - 1)
    kept = band_pattern(window, offset, Sq).mask(Sq, Sk) & torch.ones(Sq, Sk, dtype=torch.bool).tril(offset)
    assert torch.equal(kept, band_mask(Sq, Sk, window, offset)[0, 0])


@settings(max_examples=25, deadline=None)
@given(st.integers(BAND_MIN_KEYS, BAND_MIN_KEYS + 80), st.integers(0, 90), st.lists(st.integers(0, 60), min_size=1,
                                                                                       max_size=3))
def test_the_op_runs_bands_exactly(S, window, cuts):
    """Dense heads under rule "band" against the float64 reference with the explicit mask; each
    batch row its own right padding (a cut of 0: none; past the window, the last queries keep no
    key and give 0)."""
    lengths = tuple(S - c if c else None for c in cuts)
    mask = band_mask(S, S, window, 0, lengths)
    runs = key_prefix_runs(torch.empty(len(lengths), 4, S, 8), torch.empty(len(lengths), 2, S, 8), mask, False,
                           (P.Dense(),) * 4, "band")
    assert runs is not None
    q, k, v = torch.randn(len(lengths), 4, S, 8), torch.randn(len(lengths), 2, S, 8), torch.randn(len(lengths), 2, S, 8)
    out = attention_op(q, k, v, mask, 0.3, False, patterns_to_json((P.Dense(),) * 4), 0, 0, "test", "band")
    torch.testing.assert_close(out.double(), reference(q, k, v, mask, 0.3), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("window", [4, 40])
def test_a_cache_chunks_padding_query_keeps_its_own_band(window):
    """Two queries at the end of a sliding window's cache, one row a key shorter: that row's causal
    rule cuts one query, and its second (padding, past the row's keys) runs the band's pattern too,
    which must move with the query: the one-query Columns shortcut kept the first query's keys there
    (found by fuzzing the backward: the output, and so both backwards, were off there)."""
    Sk = BAND_MIN_KEYS + 20
    mask = torch.cat([band_mask(2, Sk, window, Sk - 2), band_mask(2, Sk, window, Sk - 2, (Sk - 1,))])
    q, k, v = torch.randn(2, 4, 2, 8), torch.randn(2, 2, Sk, 8), torch.randn(2, 2, Sk, 8)
    out = attention_op(q, k, v, mask, 0.3, False, patterns_to_json((P.Dense(),) * 4), 0, 0, "test", "band")
    torch.testing.assert_close(out.double(), reference(q, k, v, mask, 0.3), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("Sk, runs_the_band", [(BAND_MIN_DECODE_KEYS + 30, True), (BAND_MIN_DECODE_KEYS - 1, False)])
def test_a_decoding_step_runs_its_band_from_enough_keys(Sk, runs_the_band, monkeypatch):
    """One query against a sliding window's last keys of its row: the band's keys only, from
    BAND_MIN_DECODE_KEYS keys (below, torch's SDPA with the mask is faster); exact either way."""
    mask = torch.cat([band_mask(1, Sk, 300, Sk - 1), band_mask(1, Sk, 300, Sk - 41, (Sk - 40,))])
    q, k, v = torch.randn(2, 4, 1, 8), torch.randn(2, 2, Sk, 8), torch.randn(2, 2, Sk, 8)
    keys = []
    original = sparsec.attention
    monkeypatch.setattr(sparsec, "attention", lambda q, k, v, patterns, **kw: keys.append(k.shape[2]) or original(
        q, k, v, patterns, **kw))
    out = attention_op(q, k, v, mask, 0.3, False, patterns_to_json((P.Dense(),) * 4), 0, 0, "test", "band")
    torch.testing.assert_close(out.double(), reference(q, k, v, mask, 0.3), atol=2e-5, rtol=2e-5)
    assert bool(keys) == runs_the_band


class MaskedAttention(torch.nn.Module):
    def forward(self, q, k, v, mask):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)


@pytest.mark.parametrize("Sq, Sk, rule", [(8, 64, "band"), (1, 64, ""), (1, BAND_MIN_DECODE_KEYS, "band")])
def test_a_decoding_graph_takes_the_rule_only_where_its_keys_are_enough(Sq, Sk, rule):
    """A decoding step's graph (one query) keeps torch's SDPA unless its keys are known to be enough
    for the band to pay (a static cache's length); any other masked layer left dense takes the rule."""
    q, k, v = torch.randn(1, 2, Sq, 8), torch.randn(1, 2, Sk, 8), torch.randn(1, 2, Sk, 8)
    mask = torch.ones(1, 1, Sq, Sk, dtype=torch.bool)
    report = sparsec.explain(MaskedAttention(), q, k, v, mask, options={"mask_bands": "on", "inner": "eager"})
    (op,) = [op for op in report.graphs[0].final_ir.ops if type(op).__name__ == "Attention"]
    assert op.mask_rule == rule


def test_gradients_through_a_band():
    S = BAND_MIN_KEYS + 16
    mask = band_mask(S, S, 20, 0, (S - 9, None))
    q, k, v = (torch.randn(2, 2, S, 8, requires_grad=True) for _ in range(3))
    out = attention_op(q, k, v, mask, 0.25, False, patterns_to_json((P.Dense(),) * 2), 0, 0, "test", "band")
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    want = torch.autograd.grad(reference(q, k, v, mask, 0.25).square().sum(), (q, k, v))
    for got, expected in zip(grads, want):
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_patterns_other_than_dense_keep_a_band_mask_dense():
    mask = band_mask(300, 300, 20, 0)
    q = torch.empty(1, 2, 300, 8)
    assert key_prefix_runs(q, q, mask, False, (P.Window(4, 4), P.Dense()), "band") is None
    assert key_prefix_runs(q, q, mask, False, (P.Dense(), P.Dense()), "keys") is None


def test_the_option_is_checked():
    assert parse_options({}).mask_bands == "auto"
    with pytest.raises(ValueError, match="mask_bands"):
        parse_options({"mask_bands": "yes"})


def _gemma3(seq: int):
    return transformers_model(
        "Gemma3TextConfig", "Gemma3TextModel", "sdpa", seed=3, vocab_size=64, hidden_size=32, intermediate_size=64,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8, sliding_window=48,
        max_position_embeddings=2 * seq, layer_types=["sliding_attention", "full_attention"])


@pytest.mark.models
def test_gemma3_sliding_layers_run_their_band(caplog):
    seq = BAND_MIN_KEYS + 44
    model = _gemma3(seq)
    ids = torch.randint(0, 64, (2, seq))
    padding = (torch.arange(seq)[None] < torch.tensor([[seq - 30], [seq]])).long()
    for mask_bands, bands in (("off", False), ("on", True)):
        for inputs in ((ids,), (ids, padding)):
            with caplog.at_level(logging.INFO, logger="sparsec"):
                got, ops, calls = run_compiled(model, inputs, {"inner": "eager", "mask_bands": mask_bands})
            torch.testing.assert_close(got, model(*inputs).last_hidden_state, atol=1e-5, rtol=1e-5)
            rules = [op.mask_rule for op in ops]
            # the full-attention layer has a mask only with padding: causal prefixes, dense on each
            assert rules == ["band" if bands else "", "band" if bands and len(inputs) == 2 else ""]
            assert any(P.Window(47, 0) in c.patterns for c in calls) == bands, calls


class SharedMaskModel(torch.nn.Module):
    """Three layers, each reading the one before: the outer two take one band mask built in the
    forward (as transformers builds its masks; SDPA's decomposition turns a bool one into a bias for
    each call), the middle one a full causal bias (a float mask: read on its own)."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind

    def forward(self, q, k, v):
        S = q.shape[2]
        i, j = torch.arange(S)[:, None], torch.arange(S)[None, :]
        band = ((j <= i) & (j > i - 40))[None, None]
        if self.kind == "bias":
            band = torch.zeros(1, 1, S, S).masked_fill(~band, float("-inf"))
        x = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=band)
        causal = torch.zeros(1, 1, S, S).masked_fill(j > i, float("-inf"))
        y = torch.nn.functional.scaled_dot_product_attention(x, k, v, attn_mask=causal)
        return torch.nn.functional.scaled_dot_product_attention(y, k, v, attn_mask=band)


@pytest.mark.parametrize("kind", ["bool", "bias"])
def test_layers_that_share_a_mask_read_it_once(kind, monkeypatch):
    """The rewrite gives calls with one mask one sparsec::mask_layout: read once a forward (the
    backward reuses it), and each call still runs on what its mask keeps; gradients flow as without it."""
    from sparsec import key_padding

    reads = []  # which masks were read: the band keeps 40 keys a row at most
    read = key_padding._read_prefixes

    def counted(mask, *args):
        kept = mask if mask.dtype == torch.bool else mask == 0
        reads.append("band" if int(kept.sum()) < 60 * mask.shape[-1] else "causal")
        return read(mask, *args)

    monkeypatch.setattr(key_padding, "_read_prefixes", counted)
    q, k, v = (torch.randn(1, 2, BAND_MIN_KEYS + 20, 16, requires_grad=True) for _ in range(3))
    model = SharedMaskModel(kind)
    torch._dynamo.reset()
    with recording() as records:
        got = torch.compile(model, backend="sparsec", options={"inner": "eager", "mask_bands": "on"})(q, k, v)
    want = model(q, k, v)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert sorted(reads) == ["band", "causal"]  # the band once for two layers
    assert sum(r.rewritten_code.count("sparsec.mask_layout") for r in records) == 1
    grad = torch.randn_like(want)
    got_grads = torch.autograd.grad(got, (q, k, v), grad)
    assert sorted(reads) == ["band", "causal", "causal"]  # the band's reading is decoded, not read again
    for g, w in zip(got_grads, torch.autograd.grad(want, (q, k, v), grad)):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("prefixes", [None, [MaskPrefix(30)], [MaskPrefix(40, 0, 7), MaskPrefix(33, -3, None, 5)]])
def test_a_mask_layout_decodes_to_what_was_read(prefixes):
    batch = 1 if prefixes is None else len(prefixes)
    layout = encode_prefixes(prefixes, batch, 40, 40)
    assert decode_prefixes(layout, batch, 40, 40) == prefixes
    assert decode_prefixes(layout, batch, 39, 40) is False  # read for another shape: the call reads its own


@pytest.mark.models
def test_gemma2_masks_written_into_one_buffer_are_each_read():
    """Inductor writes Gemma 2's full causal mask into the buffer of its sliding-window mask without
    bumping the tensor's version counter: a reading cached on the tensor ran the full layers on the
    band (relative error 0.5). Each mask node is read in the graph now."""
    transformers = pytest.importorskip("transformers")
    if not hasattr(transformers, "Gemma2Config"):
        pytest.skip(f"transformers {transformers.__version__} has no Gemma2Model")
    S = BAND_MIN_KEYS + 32
    config = transformers.Gemma2Config(
        vocab_size=256, hidden_size=16, intermediate_size=32, num_hidden_layers=4, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, sliding_window=64, max_position_embeddings=2 * S,
        layer_types=["sliding_attention", "full_attention"] * 2, attn_logit_softcapping=None,
        final_logit_softcapping=None, attn_implementation="eager")
    torch.manual_seed(0)
    model = transformers.Gemma2Model(config).eval()
    ids = torch.randint(0, 256, (1, S))
    torch._dynamo.reset()
    with torch.no_grad():
        got = torch.compile(model, backend="sparsec", options={"mask_bands": "on"})(ids).last_hidden_state
        torch.testing.assert_close(got, model(ids).last_hidden_state, atol=1e-5, rtol=1e-5)


def left_padded(S: int, pads, window: int | None = None) -> torch.Tensor:
    """(B, 1, S, S) bool: transformers' causal mask of a left-padded batch (row b's first pads[b]
    tokens are padding: those queries keep no key), with a sliding window of `window` keys."""
    i, j = torch.arange(S)[:, None], torch.arange(S)[None, :]
    rows = [(j <= i) & (j >= p) & ((j > i - window) if window else True) for p in pads]
    return torch.stack(rows)[:, None]


@pytest.mark.parametrize("window", [None, 9])
def test_left_padding_reads_as_a_shifted_prefix(window):
    found = mask_prefixes(left_padded(40, [0, 13], window), 2, 40, 40)
    w = None if window is None else window - 1
    assert found == [MaskPrefix(40, 0, w, 0), MaskPrefix(40, 0, w, 13)]


@pytest.mark.parametrize("mask", [
    torch.tensor([[1, 0, 0, 0], [0, 0, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.bool),  # an empty row inside
    torch.tensor([[0, 0, 0, 0], [0, 1, 0, 0], [0, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.bool),  # a padding key kept
    torch.tensor([[0, 0, 0, 0], [0, 1, 1, 0], [0, 1, 1, 1], [0, 1, 1, 1]], dtype=torch.bool),  # not causal
])
def test_other_masks_with_empty_rows_are_not_left_padding(mask):
    assert mask_prefixes(mask, 1, 4, 4) is None


def test_a_left_padded_band_runs_only_dense_heads():
    """A band cuts patterns to a shape no pattern has: only Dense heads run a left-padded sliding
    window (patterns without a window run on each row's own tokens: tests/test_left_padding.py)."""
    mask = left_padded(300, [0, 20], window=40)
    q = torch.empty(2, 2, 300, 8)
    assert key_prefix_runs(q, q, mask, False, (P.Dense(), P.Dense()), "band") is not None
    assert key_prefix_runs(q, q, mask, False, (P.Dense(), P.Skip("mean")), "band") is None
    assert key_prefix_runs(q, q, mask, False, (P.Dense(), P.Window(3, 0)), "") is None


@settings(max_examples=20, deadline=None)
@given(st.integers(BAND_MIN_KEYS, BAND_MIN_KEYS + 60), st.sampled_from([None, 1, 30]),
       st.lists(st.integers(0, 50), min_size=1, max_size=3))
def test_the_op_runs_left_padded_rows_exactly(S, window, pads):
    """Each row's real queries on its real keys, the padding queries 0, against the float64
    reference with the explicit mask (a row with no key gives 0)."""
    mask = left_padded(S, pads, window)
    q, k, v = torch.randn(len(pads), 4, S, 8), torch.randn(len(pads), 2, S, 8), torch.randn(len(pads), 2, S, 8)
    out = attention_op(q, k, v, mask, 0.3, False, patterns_to_json((P.Dense(),) * 4), 0, 0, "test", "band")
    torch.testing.assert_close(out.double(), reference(q, k, v, mask, 0.3), atol=2e-5, rtol=2e-5)


@pytest.mark.models
def test_a_left_padded_llama_batch_runs_each_row_on_its_tokens(monkeypatch):
    """transformers' batched-generation layout (padding on the left): the real tokens equal eager,
    and the padded row runs causal attention on its own tokens only."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(4)
    seq, pad = BAND_MIN_KEYS + 20, 37
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2 * seq,
                                      attn_implementation="sdpa")
    model = transformers.LlamaModel(config).eval()
    ids = torch.randint(0, 64, (2, seq))
    padding = (torch.arange(seq)[None] >= torch.tensor([[pad], [0]])).long()
    lengths = []
    original = sparsec.attention
    monkeypatch.setattr(sparsec, "attention", lambda q, k, v, patterns, **kw: lengths.append(k.shape[2]) or original(
        q, k, v, patterns, **kw))
    torch._dynamo.reset()
    with torch.no_grad():
        got = torch.compile(model, backend="sparsec", options={"inner": "eager", "mask_bands": "on"})(
            ids, attention_mask=padding).last_hidden_state
        want = model(ids, attention_mask=padding).last_hidden_state
    real = padding.bool()
    torch.testing.assert_close(got[real], want[real], atol=1e-5, rtol=1e-5)
    assert sorted(lengths) == [seq - pad, seq]


@settings(max_examples=150, deadline=None)
@given(st.integers(1, 40), st.lists(st.tuples(st.integers(0, 45), st.integers(0, 45), st.booleans()), min_size=1,
                                     max_size=6), st.integers(0, 2 ** 31))
def test_runs_are_read_exactly(Sk, rows, seed):
    """key_padding._runs (each query's row) and _row_runs (one row a batch entry, on the host)
    against each row's kept keys listed: one run [start, end), none (0, 0), or several (end -1);
    rows of one run, of none, of two runs and random ones, at widths around the 8-key words _runs
    reads."""
    from sparsec.key_padding import _row_runs, _runs

    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(len(rows), Sk, dtype=torch.bool)
    for r, (a, b, random) in enumerate(rows):
        if random:
            mask[r] = torch.rand(Sk, generator=g) < 0.5
        else:
            mask[r, min(a, b):max(a, b)] = True
    for starts, ends in (_runs(mask.view(torch.int8)), _row_runs(mask[:, None].view(torch.int8))):
        starts, ends = starts.flatten(), ends.flatten()
        for r in range(len(rows)):
            kept = mask[r].nonzero().flatten().tolist()
            if not kept:
                assert (starts[r].item(), ends[r].item()) == (0, 0), (r, kept)
            elif kept == list(range(kept[0], kept[-1] + 1)):
                assert (starts[r].item(), ends[r].item()) == (kept[0], kept[-1] + 1), (r, kept)
            else:
                assert ends[r].item() == -1, (r, kept)


@pytest.mark.parametrize("lengths, runs_rows", [((BAND_MIN_KEYS + 40,) * 3 + (BAND_MIN_KEYS + 20,), False),
                                                ((BAND_MIN_KEYS + 40, 200, 150, 300), True)])
def test_padded_keys_run_row_by_row_only_when_padded_enough(lengths, runs_rows, monkeypatch):
    """A (B, 1, 1, S) padding mask under the rule "band": rows on their kept keys when at least
    PADDING_MIN_SHARE of the keys are padding, else the dense path; the result is exact either way."""
    from sparsec import ops

    calls = []
    original = ops.run_key_prefix
    monkeypatch.setattr(ops, "run_key_prefix", lambda *args: calls.append(1) or original(*args))
    S, B = max(lengths), len(lengths)
    mask = (torch.arange(S)[None, :] < torch.tensor(lengths)[:, None])[:, None, None, :]
    q, k, v = torch.randn(B, 4, S, 8), torch.randn(B, 2, S, 8), torch.randn(B, 2, S, 8)
    out = attention_op(q, k, v, mask, 0.3, False, patterns_to_json((P.Dense(),) * 4), 0, 0, "test", "band")
    assert bool(calls) == runs_rows
    torch.testing.assert_close(out.double(), reference(q, k, v, mask.expand(B, 1, S, S), 0.3), atol=2e-5, rtol=2e-5)
