"""sparsec.patterns: masks follow the definitions, values are immutable, hashable and serialize."""
import json
import math
import re

import pytest
import torch
from hypothesis import given, settings, strategies as st

from sparsec import patterns as P


def brute_mask(fn, Sq, Sk):
    return torch.tensor([[bool(fn(i, j)) for j in range(Sk)] for i in range(Sq)])


@pytest.mark.parametrize("Sq,Sk", [(7, 7), (5, 11), (12, 4), (1, 9)])
def test_masks_follow_definitions(Sq, Sk):
    cases = [
        (P.Dense(), lambda i, j: True),
        (P.Skip(), lambda i, j: False),
        (P.Window(2, 1), lambda i, j: i - 2 <= j <= i + 1),
        (P.MultiDiagonal([-3, 0, 4], 1), lambda i, j: any(abs(j - (i + o)) <= 1 for o in (-3, 0, 4))),
        (P.Columns([(1, 3), 6]), lambda i, j: 1 <= j < 3 or j == 6),
        (P.AShape(2, 1), lambda i, j: j < 2 or i - 1 <= j <= i),
        (P.VerticalSlash([0, (4, 6)], [0, -2]), lambda i, j: j == 0 or 4 <= j < 6 or j in (i, i - 2)),
        (P.Window(0, 0) | P.Columns([3]), lambda i, j: j == i or j == 3),
    ]
    for pattern, fn in cases:
        assert torch.equal(pattern.mask(Sq, Sk), brute_mask(fn, Sq, Sk)), pattern


def test_block_sparse_mask_and_layout_check():
    layout = torch.tensor([[1, 0, 1], [0, 1, 0]], dtype=torch.bool)
    p = P.BlockSparse(layout, (4, 3))
    expected = brute_mask(lambda i, j: bool(layout[i // 4, j // 3]), 7, 8)
    assert torch.equal(p.mask(7, 8), expected)
    with pytest.raises(ValueError, match="layout has shape"):
        p.mask(9, 8)


@pytest.mark.parametrize("causal", [False, True])
def test_density_counts_kept_pairs(causal):
    Sq, Sk = 9, 13
    p = P.Window(3, 2) | P.Columns([(0, 2)])
    mask = p.mask(Sq, Sk)
    allowed = torch.ones(Sq, Sk, dtype=torch.bool)
    if causal:
        allowed = torch.arange(Sk)[None, :] <= torch.arange(Sq)[:, None] + (Sk - Sq)
    expected = (mask & allowed).sum().item() / allowed.sum().item()
    assert math.isclose(p.density(Sq, Sk, causal=causal), expected)
    assert P.Dense().density(Sq, Sk, causal=causal) == 1.0
    assert P.Skip().density(Sq, Sk) == 0.0


def test_union_is_canonical_and_rejects_skip():
    a, b, c = P.Window(1, 0), P.Columns([0]), P.MultiDiagonal([5], 0)
    assert (a | b) | c == a | (b | c) == c | b | a
    assert hash(a | b) == hash(b | a)
    with pytest.raises(ValueError, match="Skip"):
        a | P.Skip()
    assert a | a is a and (a | b) | a == a | b  # a union of one pattern is that pattern
    assert P.union_of([a, a, a | a]) is a
    with pytest.raises(ValueError, match="two distinct"):
        P.Union([a, a])


def test_patterns_are_immutable_and_hashable():
    w = P.Window(4, 0)
    with pytest.raises(AttributeError):
        w.left = 3
    assert {w: 1}[P.Window(4, 0)] == 1
    assert P.Columns([(0, 2), (1, 4)]) == P.Columns([(0, 4)])
    assert P.MultiDiagonal([4, 0, 4], 1) == P.MultiDiagonal([0, 4], 1)


@pytest.mark.parametrize("bad", [
    lambda: P.Window(-1, 0),
    lambda: P.Window(1.5, 0),
    lambda: P.MultiDiagonal([], 1),
    lambda: P.MultiDiagonal([0], -2),
    lambda: P.Columns([(3, 3)]),
    lambda: P.Columns([(-1, 2)]),
    lambda: P.AShape(-1, 4),
    lambda: P.Skip("ones"),
    lambda: P.BlockSparse(torch.ones(2, 2, 2), 4),
    lambda: P.BlockSparse(torch.ones(2, 2), 0),
    lambda: P.BlockSparse([[0.5, 1.0]], 4),
    lambda: P.Window(2 ** 64, 0),
    lambda: P.MultiDiagonal([-(2 ** 70)], 1),
    lambda: P.Columns([(0, 2 ** 63)]),
])
def test_invalid_arguments_raise_clear_errors(bad):
    with pytest.raises((ValueError, TypeError)):
        bad()


@pytest.mark.parametrize("layout, error, message", [
    (torch.ones(2, 2, 2), ValueError, "non-empty 2-D tensor, got shape (2, 2, 2)"),
    (torch.ones(0, 3), ValueError, "non-empty 2-D tensor, got shape (0, 3)"),
    ([[0.5, 1.0]], ValueError, "must be boolean (or 0/1 integers)"),
    ([[2, 0]], ValueError, "must be boolean (or 0/1 integers)"),
    (["01", "2x"], ValueError, "may only hold '0' and '1'"),
    ([[1, 0], [1]], TypeError, "must be a 2-D bool tensor or nested lists"),
])
def test_bad_block_layouts_are_named(layout, error, message):
    with pytest.raises(error, match=re.escape(message)):
        P.BlockSparse(layout, 4)


@pytest.mark.parametrize("block, error, message", [
    (0, ValueError, "BlockSparse bq must be >= 1, got 0"),
    ((4, -2), ValueError, "BlockSparse bk must be >= 1, got -2"),
    ((4,), TypeError, "must be an int or a (bq, bk) pair"),
    ((4, 2.0), TypeError, "BlockSparse bk must be an int"),
])
def test_bad_block_sizes_are_named(block, error, message):
    with pytest.raises(error, match=re.escape(message)):
        P.BlockSparse([[1, 0]], block)


def random_layout(shape, seed, density=0.4):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=g) < density


def row_strings(layout):
    """The reference row text of a layout, cell by cell."""
    return tuple("".join("1" if kept else "0" for kept in row) for row in layout.tolist())


@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (17, 64), (40, 3)])
def test_block_sparse_reads_every_layout_form(shape):
    layout = random_layout(shape, seed=sum(shape))
    forms = [layout, layout.to(torch.int64), layout.numpy(), layout.tolist(), list(row_strings(layout)),
             layout.T.contiguous().T]  # column-major strides
    for form in forms:
        p = P.BlockSparse(form, (16, 8))
        assert p.rows == row_strings(layout)
        assert p.block == (16, 8)
        assert torch.equal(p.mask(shape[0] * 16, shape[1] * 8),
                           brute_mask(lambda i, j: bool(layout[i // 16, j // 8]), shape[0] * 16, shape[1] * 8))


@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (17, 64), (40, 3)])
def test_trusted_block_sparse_is_the_validated_value(shape):
    base = random_layout((2 * shape[0], 3 * shape[1]), seed=sum(shape))
    strided = base[::2, 1::3]  # a view with strides, not contiguous
    checked = P.BlockSparse(strided.contiguous(), (16, 8))
    for layout in (strided, strided.contiguous(), strided.numpy(), strided.T.contiguous().T):
        fast = P.BlockSparse.from_trusted_layout(layout, (16, 8))
        assert type(fast) is P.BlockSparse
        assert fast == checked and hash(fast) == hash(checked)
        assert fast.rows == row_strings(strided) and fast.block == (16, 8)
        assert fast.to_json() == checked.to_json()
        again = P.from_json(fast.to_json())
        assert again == fast and hash(again) == hash(fast)
        assert torch.equal(fast.layout, strided)
        assert {checked: "x"}[fast] == "x"


def test_block_sparse_hash_is_cached_and_fields_are_frozen(monkeypatch):
    layout = random_layout((6, 9), seed=7)
    patterns = [P.BlockSparse(layout, (4, 2)), P.BlockSparse.from_trusted_layout(layout, (4, 2))]
    expected = hash(P.BlockSparse(layout, (4, 2)))

    def recomputed(self):
        raise AssertionError("the hash of a BlockSparse was recomputed")

    monkeypatch.setattr(P.BlockSparse, "_key", recomputed)  # what the hash would be computed from
    for p in patterns:
        assert hash(p) == expected and hash(p) == expected
        for name, value in (("rows", ("1",)), ("block", (1, 1)), ("_hash", 0)):
            with pytest.raises(AttributeError, match="immutable"):
                setattr(p, name, value)
    assert hash(patterns[0]) == expected


def test_head_pattern_count_must_match():
    with pytest.raises(ValueError, match="3 patterns for 4 query heads"):
        P.normalize_head_patterns([P.Dense()] * 3, 4)
    assert P.normalize_head_patterns(P.Dense(), 2) == (P.Dense(), P.Dense())


def test_repr_is_readable():
    assert repr(P.Window(64, 0)) == "Window(left=64, right=0)"
    assert repr(P.Skip("zero")) == "Skip(fill='zero')"
    assert "BlockSparse(layout=<2x2, 3 kept>" in repr(P.BlockSparse([[1, 1], [0, 1]], 16))


small = st.integers(0, 6)
atoms = st.one_of(
    st.just(P.Dense()),
    st.builds(P.Window, small, small),
    st.builds(P.MultiDiagonal, st.lists(st.integers(-8, 8), min_size=1, max_size=3), small),
    st.builds(P.Columns, st.lists(st.integers(0, 12), min_size=1, max_size=3)),
    st.builds(P.AShape, small, small),
    st.builds(P.VerticalSlash, st.lists(st.integers(0, 12), min_size=1, max_size=2),
              st.lists(st.integers(-5, 5), max_size=2)),
    st.builds(lambda bits: P.BlockSparse(torch.tensor(bits).reshape(2, 3), (5, 4)),
              st.lists(st.booleans(), min_size=6, max_size=6)),
)
any_pattern = st.one_of(atoms, st.builds(lambda a, b: a | b if a != b else a, atoms, atoms),
                        st.sampled_from([P.Skip("mean"), P.Skip("zero")]))


@settings(max_examples=60, deadline=None)
@given(any_pattern)
def test_json_round_trip(pattern):
    text = pattern.to_json()
    again = P.from_json(text)
    assert again == pattern and hash(again) == hash(pattern)
    assert json.loads(text)["type"] == type(pattern).__name__
    assert torch.equal(again.mask(9, 12), pattern.mask(9, 12))


@settings(max_examples=40, deadline=None)
@given(any_pattern)
def test_pickle_and_copies_keep_the_value_and_its_hash(pattern):
    """Patterns cache their hash; a pickle carries the value, not the cached hash (str hashes
    differ between processes), and copies hash and compare as the original."""
    import copy
    import pickle

    expected = hash(pattern)
    for again in (pickle.loads(pickle.dumps(pattern)), copy.deepcopy(pattern), copy.copy(pattern)):
        assert again == pattern and hash(again) == expected
        assert torch.equal(again.mask(9, 12), pattern.mask(9, 12))
    assert "_hash_cache" not in pickle.dumps(pattern).decode("latin-1")


def test_from_dict_rejects_malformed():
    with pytest.raises(ValueError, match="unknown pattern type"):
        P.from_dict({"type": "Diagonal"})
    with pytest.raises(ValueError, match="missing field"):
        P.from_dict({"type": "Union"})
    with pytest.raises(ValueError, match="bad fields"):
        P.from_dict({"type": "Window", "left": 1})
    layout = [[True, False], [False, True]]  # every class refuses fields it does not take
    with pytest.raises(ValueError, match=r"bad fields for pattern BlockSparse: unknown \['blokc'\]"):
        P.from_dict({"type": "BlockSparse", "layout": layout, "block": [16, 16], "blokc": [32, 32]})
    with pytest.raises(ValueError, match=r"bad fields for pattern Union: unknown \['prts'\]"):
        P.from_dict({"type": "Union", "parts": [P.Dense().to_dict()] * 2, "prts": []})
    assert P.from_dict({"type": "BlockSparse", "layout": layout, "block": 32}).block == (32, 32)  # as the class takes
    for bad in ({"type": []}, {"type": None}, ["Window"]):
        with pytest.raises(ValueError, match="'type' key naming its class"):
            P.from_dict(bad)
