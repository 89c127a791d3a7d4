"""The Triton attention kernels (through TRITON_INTERPRET=1 on CPU; see conftest.py), against the
float64 reference built from pattern.mask() (tests/reference.py). Shapes are tiny: the
interpreter is slow."""
from __future__ import annotations

import importlib.util
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from reference import reference_attention
from sparsec import patterns as P
from sparsec.codegen import attention_triton as at
from sparsec.codegen import kernel_cache
from sparsec.codegen.tiles import AttentionTiles, default_tiles, fit_stages, shared_memory_bytes, tiles_for

pytestmark = pytest.mark.triton

TILES = AttentionTiles(16, 16, num_warps=1, num_stages=1)
TOLERANCE = {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}
needs_coverage = pytest.mark.skipif(
    importlib.util.find_spec("sparsec.codegen.block_coverage") is None,
    reason="codegen/block_coverage.py (the block tables of block_sparse and union) is not there yet")


def random_qkv(B, Hq, Hkv, Sq, Sk, D, dtype=torch.float32, Dv=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, Sq, D, generator=g).to(dtype)
    k = torch.randn(B, Hkv, Sk, D, generator=g).to(dtype)
    v = torch.randn(B, Hkv, Sk, Dv or D, generator=g).to(dtype)
    return q, k, v


def check(q, k, v, head_patterns, *, causal, tiles=TILES, scale=None):
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    out = at.triton_attention(q, k, v, tuple(head_patterns), causal=causal, scale=scale, tiles=tiles)
    assert out.dtype == q.dtype and out.shape == (*q.shape[:3], v.shape[-1])
    expected = reference_attention(q, k, v, head_patterns, causal=causal, scale=scale)
    tol = TOLERANCE[q.dtype]
    torch.testing.assert_close(out.double(), expected, atol=tol, rtol=tol)
    return out


class LaunchCounter:
    def __init__(self):
        self.launches = []

    def __enter__(self):
        self._remove = at.add_launch_hook(self.launches.append)
        return self

    def __exit__(self, *exc):
        self._remove()


# Two heads per family with different parameters (and different parameter counts), so every
# case also runs head fusion with a per-head parameter table.
CLOSED_FORM = {
    "dense": (P.Dense(), P.Dense()),
    "window": (P.Window(5, 3), P.Window(0, 20)),
    "multi_diagonal": (P.MultiDiagonal([-16, 0, 16], 2), P.MultiDiagonal([3], 0)),
    "columns": (P.Columns([(0, 3), (20, 40)]), P.Columns([5, 17])),
    "a_shape": (P.AShape(4, 8), P.AShape(0, 3)),
    "vertical_slash": (P.VerticalSlash([(0, 2), 9], [0, -7]), P.VerticalSlash([], [1])),
}


def block_sparse(Sq, Sk, block, seed):
    g = torch.Generator().manual_seed(seed)
    shape = (-(-Sq // block[0]), -(-Sk // block[1]))
    return P.BlockSparse(torch.rand(shape, generator=g) < 0.4, block)


def table_driven(Sq, Sk):
    return {
        "block_sparse": (block_sparse(Sq, Sk, (8, 12), 1), block_sparse(Sq, Sk, (32, 16), 2)),
        "union": (P.Window(3, 0) | P.Columns([(30, 33)]),
                  P.AShape(2, 5) | P.MultiDiagonal([-20], 1) | block_sparse(Sq, Sk, (16, 8), 3)),
    }


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("family", sorted(CLOSED_FORM))
def test_closed_form_family_matches_reference(family, causal):
    q, k, v = random_qkv(1, 2, 1, 37, 45, 16, seed=sorted(CLOSED_FORM).index(family))
    with LaunchCounter() as counter:
        check(q, k, v, CLOSED_FORM[family], causal=causal)
    assert [launch.family for launch in counter.launches] == [family]


@pytest.mark.parametrize("Sq, Sk, causal", [(1, 64, True), (8, 64, False), (70, 20, False)])
def test_bands_wholly_past_the_keys_keep_nothing(Sq, Sk, causal):
    """A band whose centre lies past every key (|o| > Sq + Sk, or o - width past Sk) keeps
    nothing; clamping the centre to the reachable range once pulled it back onto the keys
    (found by the dry run of the compiled-kernel checks, bench/cuda_check.py --smoke)."""
    q, k, v = random_qkv(1, 4, 1, Sq, Sk, 16, seed=Sq + Sk)
    heads = [P.MultiDiagonal([0, 100], 16), P.MultiDiagonal([-300, 300], 50),
             P.Window(2, 0) | P.MultiDiagonal([100], 16), P.Columns([(0, 3)]) | P.MultiDiagonal([-90, 90], 20)]
    check(q, k, v, heads, causal=causal)


@pytest.mark.parametrize("Sq, Sk, causal", [(1, 1, False), (1, 40, True), (3, 4, False), (20, 9, False)])
def test_bands_wider_than_the_reach_keep_their_edges(Sq, Sk, causal):
    """A width beyond Sq + Sk (every |j - i| is below that) once was cut to it alone, which moved
    the band's edges o -/+ width inward and dropped kept keys (found by fuzzing: MultiDiagonal([3], 3)
    at 1 x 1 gave 0)."""
    q, k, v = random_qkv(1, 4, 1, Sq, Sk, 16, seed=Sq * Sk)
    heads = [P.MultiDiagonal([3], 3), P.MultiDiagonal([-10], 77), P.MultiDiagonal([-60, 2 * (Sq + Sk) + 1], Sq + Sk),
             P.MultiDiagonal([-200, 190], 180)]
    check(q, k, v, heads, causal=causal)


@needs_coverage
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("family", ["block_sparse", "union"])
def test_table_driven_family_matches_reference(family, causal):
    Sq, Sk = 45, 37
    q, k, v = random_qkv(1, 2, 2, Sq, Sk, 16, seed=7)
    with LaunchCounter() as counter:
        check(q, k, v, table_driven(Sq, Sk)[family], causal=causal)
    assert len(counter.launches) == 1


def single_query_block_cases():
    """One query block (16 rows) against 6 key blocks; each pattern needs only some key blocks."""
    return {
        "window": P.Window(3, 40),
        "multi_diagonal": P.MultiDiagonal([0, 64], 1),
        "columns": P.Columns([(0, 5), (70, 75)]),
        "a_shape": P.AShape(4, 8),
        "vertical_slash": P.VerticalSlash([(50, 52)], [40]),
        "block_sparse": P.BlockSparse([[True, False, False, True, False, False]], 16),
        "union": P.Window(2, 0) | P.Columns([(80, 82)]),
    }


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("family", sorted(single_query_block_cases()))
def test_unneeded_key_blocks_are_never_read(family, causal):
    # NaN in K and V of every key block the pattern does not need: reading one, even masked,
    # would turn the output into NaN (0 * NaN in P @ V).
    Sq, Sk = 16, 96
    pattern = single_query_block_cases()[family]
    q, k, v = random_qkv(1, 1, 1, Sq, Sk, 16, seed=12)
    kept = pattern.mask(Sq, Sk)
    if causal:
        kept &= torch.arange(Sk)[None, :] <= torch.arange(Sq)[:, None] + (Sk - Sq)
    needed = kept.reshape(Sq, Sk // 16, 16).any(dim=2).any(dim=0)
    assert 0 < int(needed.sum()) < len(needed)
    unneeded_keys = (~needed).repeat_interleave(16)
    poisoned_k, poisoned_v = k.clone(), v.clone()
    poisoned_k[:, :, unneeded_keys] = float("nan")
    poisoned_v[:, :, unneeded_keys] = float("nan")
    out = at.triton_attention(q, poisoned_k, poisoned_v, (pattern,), causal=causal, scale=0.25, tiles=TILES)
    expected = reference_attention(q, k, v, (pattern,), causal=causal, scale=0.25)
    torch.testing.assert_close(out.double(), expected, atol=2e-5, rtol=2e-5)


def test_one_launch_per_family_with_gqa():
    heads = (P.Window(3, 1), P.Columns([(0, 4)]), P.Window(0, 7), P.Skip("mean"),
             P.Columns([(5, 9), (20, 22), 30]), P.Window(9, 9), P.MultiDiagonal([-8, 8], 1), P.Skip("zero"))
    q, k, v = random_qkv(2, 8, 2, 33, 33, 16, seed=3)
    with LaunchCounter() as counter:
        check(q, k, v, heads, causal=True)
    assert sorted(launch.family for launch in counter.launches) == ["columns", "multi_diagonal", "window"]
    by_family = {launch.family: launch for launch in counter.launches}
    assert by_family["window"].heads == (0, 2, 5)
    assert by_family["window"].grid == (3, 2 * 3)  # query blocks x (batch x heads of the group)


@pytest.mark.parametrize("Sq, Sk", [(1, 40), (50, 17), (17, 50), (16, 16)])
@pytest.mark.parametrize("causal", [False, True])
def test_lengths(Sq, Sk, causal):
    q, k, v = random_qkv(1, 3, 1, Sq, Sk, 16, seed=Sq * 100 + Sk)
    check(q, k, v, (P.Dense(), P.Window(4, 2), P.AShape(3, 6)), causal=causal)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(dtype):
    q, k, v = random_qkv(1, 3, 3, 29, 41, 32, dtype=dtype, seed=11)
    check(q, k, v, (P.Dense(), P.Window(7, 7), P.Columns([(2, 30)])), causal=True)


@pytest.mark.parametrize("D, Dv", [(24, 16), (80, 96)])
def test_padded_head_dims_and_value_dim(D, Dv):
    # Head dims that are not powers of two load into power-of-two tiles with masks.
    q, k, v = random_qkv(1, 2, 1, 21, 33, D, Dv=Dv, seed=5)
    check(q, k, v, (P.Dense(), P.MultiDiagonal([0, 5], 1)), causal=False)


def test_non_contiguous_inputs():
    g = torch.Generator().manual_seed(2)
    q = torch.randn(2, 19, 4, 16, generator=g).transpose(1, 2)  # (B, H, S, D) view of (B, S, H, D)
    kv = torch.randn(2, 2, 16, 27, generator=g).transpose(2, 3)  # stride(-1) != 1
    v = torch.randn(2, 2, 27, 32, generator=g)[..., ::2]
    assert not (q.is_contiguous() or kv.is_contiguous() or v.is_contiguous())
    check(q, kv, v, (P.Dense(), P.Window(2, 2), P.Skip("mean"), P.Columns([1, 7])), causal=True)


def test_scale_is_used():
    q, k, v = random_qkv(1, 1, 1, 20, 20, 16, seed=9)
    check(q, k, v, (P.Window(6, 6),), causal=False, scale=0.9)


@pytest.mark.parametrize("causal", [False, True])
def test_skip_heads_never_read_keys(causal):
    q, k, v = random_qkv(1, 3, 3, 24, 30, 16, seed=4)
    k[:, 0] = float("nan")  # only the Skip heads use kv heads 0 and 2
    k[:, 2] = float("nan")
    with LaunchCounter() as counter:
        out = check(q, k, v, (P.Skip("mean"), P.Window(3, 3), P.Skip("zero")), causal=causal)
    assert [launch.family for launch in counter.launches] == ["window"]
    assert torch.equal(out[:, 2], torch.zeros_like(out[:, 2]))


def test_rows_without_keys_give_zero():
    # Causal with Sq > Sk leaves the first Sq - Sk rows no key; the columns start late.
    q, k, v = random_qkv(1, 2, 1, 40, 24, 16, seed=6)
    out = check(q, k, v, (P.Columns([(10, 20)]), P.Window(2, 0)), causal=True)
    assert torch.equal(out[:, :, :16], torch.zeros_like(out[:, :, :16]))
    assert out[:, 0, 27:].abs().sum() > 0


def test_whole_blocks_in_window_and_columns():
    # Wide patterns at 16 x 16 tiles make whole (unmasked) blocks between partial ones.
    q, k, v = random_qkv(1, 2, 1, 80, 80, 16, seed=8)
    check(q, k, v, (P.Window(40, 5), P.Columns([(16, 64)])), causal=True)


# -- property test ------------------------------------------------------------------------


def pattern_strategy(Sq, Sk):
    offset = st.integers(-(Sq + Sk + 10), Sq + Sk + 10)  # past every key too: bands that keep nothing
    column = st.tuples(st.integers(0, Sk), st.integers(1, 12)).map(lambda t: (t[0], t[0] + t[1]))
    simple = st.one_of(
        st.just(P.Dense()),
        st.builds(P.Window, st.integers(0, Sk), st.integers(0, Sk)),
        st.builds(P.MultiDiagonal, st.lists(offset, min_size=1, max_size=4), st.integers(0, 6)),
        st.builds(P.Columns, st.lists(column, min_size=1, max_size=3)),
        st.builds(P.AShape, st.integers(0, 10), st.integers(0, 20)),
        st.builds(P.VerticalSlash, st.lists(column, max_size=2), st.lists(offset, min_size=1, max_size=3)),
        st.builds(P.Skip, st.sampled_from(P.Skip.FILLS)),
    )
    if importlib.util.find_spec("sparsec.codegen.block_coverage") is None:
        return simple
    layout = st.tuples(st.integers(4, 24), st.integers(4, 24), st.integers(0, 1000))
    sparse = layout.map(lambda t: block_sparse(Sq, Sk, (t[0], t[1]), t[2]))
    unions = st.lists(st.one_of(simple.filter(lambda p: not isinstance(p, P.Skip)), sparse), min_size=2, max_size=3)
    return st.one_of(simple, sparse, unions.filter(lambda ps: len(set(ps)) > 1).map(lambda ps: P.Union(ps)))


@st.composite
def attention_case(draw):
    Sq, Sk = draw(st.integers(1, 70)), draw(st.integers(1, 70))
    Hkv, group = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    heads = tuple(draw(pattern_strategy(Sq, Sk)) for _ in range(Hkv * group))
    return Sq, Sk, Hkv, group, heads, draw(st.booleans()), draw(st.integers(0, 2**16))


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(attention_case())
def test_random_patterns_and_shapes(case):
    Sq, Sk, Hkv, group, heads, causal, seed = case
    q, k, v = random_qkv(1, Hkv * group, Hkv, Sq, Sk, 16, seed=seed)
    check(q, k, v, heads, causal=causal)


# -- source, cache, support checks, tiles ------------------------------------------------


def test_kernel_source_is_readable_triton_per_family():
    sources = {family: at.kernel_source(family) for family in at.FAMILY_TEMPLATES}
    for family, source in sources.items():
        compile(source, f"attention_{family}", "exec")  # valid Python
        assert f"def attention_{family}_kernel(" in source and "@triton.jit" in source
        assert "BLOCK_M: tl.constexpr" in source and "BLOCK_N: tl.constexpr" in source
        assert "$" not in source  # every template placeholder was filled
    assert "(j >= i - left) & (j <= i + right)" in sources["window"]
    assert "_attend_table" in sources["union"] and "_attend_table" not in sources["window"]
    assert len(set(sources.values())) == len(sources)
    with pytest.raises(ValueError, match="no attention kernel template"):
        at.kernel_source("nonsense")


def test_kernel_cache_writes_each_source_once(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSEC_CACHE_DIR", str(tmp_path))
    source = at.kernel_source("window") + "\n# cache test\n"
    kernel_cache.clear_memory()
    try:
        first = kernel_cache.load_source(source, "cache_test")
        files = list(tmp_path.glob("cache_test_*.py"))
        assert len(files) == 1 and files[0].read_text() == source
        assert kernel_cache.source_digest(source) in files[0].name
        assert kernel_cache.load_source(source, "cache_test") is first
        assert kernel_cache.cache_info() == kernel_cache.CacheInfo(files_written=1, files_reused=0, memory_hits=1)
        written = files[0].stat().st_mtime_ns
        kernel_cache.clear_memory()  # a new process: the file is found and imported, not rewritten
        kernel_cache.load_source(source, "cache_test")
        assert kernel_cache.cache_info().files_reused == 1 and kernel_cache.cache_info().files_written == 0
        assert files[0].stat().st_mtime_ns == written
        copies = kernel_cache.dump(tmp_path / "dump")
        assert [c.read_text() for c in copies] == [source]
    finally:
        kernel_cache.clear_memory()


def test_kernel_cache_rejects_bad_input():
    with pytest.raises(ValueError, match="empty"):
        kernel_cache.load_source("   ", "x")
    with pytest.raises(ValueError, match="identifier"):
        kernel_cache.load_source("x = 1\n", "not a name")


def test_supports_names_the_problem(monkeypatch):
    q, k, v = random_qkv(1, 4, 2, 8, 8, 16)
    heads = (P.Dense(),) * 4
    assert at.supports(q, k, v, heads) is None
    assert "dtypes" in at.supports(q.double(), k.double(), v.double(), heads)
    assert "multiple" in at.supports(q[:, :3], k, v, heads[:3])
    assert "4 query heads" in at.supports(q, k, v, heads[:3])
    assert "head dims" in at.supports(*random_qkv(1, 1, 1, 4, 4, 300), (P.Dense(),))
    wrong_layout = P.BlockSparse([[True]], 4)
    assert "head 1" in at.supports(q, k, v, (P.Dense(), wrong_layout, P.Dense(), P.Dense()))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert "TRITON_INTERPRET" in at.supports(q, k, v, heads)
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        at.triton_attention(q, k, v, heads, causal=False, scale=0.25)


def test_tiles():
    assert default_tiles(128, torch.bfloat16) == AttentionTiles(128, 64, num_warps=8, num_stages=3)
    assert default_tiles(64, torch.float16) == AttentionTiles(128, 64, num_warps=8, num_stages=3)
    assert default_tiles(96, torch.bfloat16) == default_tiles(128, torch.bfloat16)
    assert default_tiles(256, torch.bfloat16) == AttentionTiles(64, 32, num_warps=8, num_stages=2)
    decode = default_tiles(64, torch.bfloat16, q_len=1)
    assert (decode.block_m, decode.block_n, decode.num_warps) == (16, 64, 4)
    # A plan's (block_m, block_n) keeps the default's stages; fewer rows than the default's run on 4 warps.
    assert tiles_for(128, 32, 128, torch.bfloat16) == AttentionTiles(128, 32, num_warps=8, num_stages=3)
    assert tiles_for(64, 64, 64, torch.bfloat16) == AttentionTiles(64, 64, num_warps=4, num_stages=3)
    assert tiles_for(64, 64, 64, torch.float32) == AttentionTiles(64, 64, num_warps=4, num_stages=2)
    assert default_tiles(128, torch.float32) == AttentionTiles(32, 16, num_warps=4, num_stages=2)
    # Shared memory: Q, and K and V buffered num_stages + 1 deep (one deep without pipelining).
    big = AttentionTiles(128, 128, num_warps=8, num_stages=3)
    assert shared_memory_bytes(big, 128, torch.bfloat16) == 2 * (128 * 128 + 4 * 128 * 256)
    assert shared_memory_bytes(big, 80, torch.float16, value_dim=64) == 2 * (128 * 128 + 4 * 128 * (128 + 64))
    assert fit_stages(big, 128, torch.bfloat16, 232448) == AttentionTiles(128, 128, num_warps=8, num_stages=2)
    assert fit_stages(big, 64, torch.bfloat16, 232448) is big
    assert fit_stages(big, 256, torch.float32, 232448) is None
    for bad in (dict(block_m=24, block_n=16), dict(block_m=8, block_n=16), dict(block_m=16, block_n=16, num_warps=3)):
        with pytest.raises(ValueError):
            AttentionTiles(**bad)
    with pytest.raises(ValueError, match="head_dim"):
        default_tiles(512, torch.float16)


@pytest.mark.parametrize("tiles", [TILES, AttentionTiles(16, 64, num_warps=1, num_stages=1),
                                   AttentionTiles(32, 32, num_warps=1, num_stages=1)])
@pytest.mark.parametrize("causal", [False, True])
def test_many_diagonals_read_from_the_diagonal_bits(tiles, causal):
    # Dozens of diagonals of both signs (some outside the matrix, some 32 apart so that a tile's
    # rows read across word boundaries of the bit string), columns among them, Sq != Sk, odd sizes;
    # two heads with different counts share the launch.
    Sq, Sk = 45, 83
    g = torch.Generator().manual_seed(int(causal) * 10 + tiles.block_n)
    offsets = sorted(set(torch.randint(-Sq - 5, Sk + 5, (40,), generator=g).tolist()) | {-32, 0, 32, 64})
    heads = (P.VerticalSlash([(3, 5), 40], offsets), P.VerticalSlash([], offsets[::3]))
    q, k, v = random_qkv(1, 2, 2, Sq, Sk, 16, seed=tiles.block_n)
    check(q, k, v, heads, causal=causal, tiles=tiles)
    # The union kernel folds the same diagonals (and width-0 MultiDiagonal bands) into diagonal bits,
    # columns into a key map, next to its bands and layouts.
    layout = torch.rand(-(-Sq // 16), -(-Sk // 16), generator=g) < 0.3
    unions = (P.Window(3, 0) | P.VerticalSlash([(3, 5), 40], offsets) | P.BlockSparse(layout, 16),
              P.MultiDiagonal(offsets[::2], 0) | P.Columns([(10, 12)]))
    check(q, k, v, unions, causal=causal, tiles=tiles)
    # MultiDiagonal's bands are diagonal bits too: many offsets, overlapping bands, a wide one.
    bands = (P.MultiDiagonal(offsets, 2), P.MultiDiagonal(offsets[::5], 11))
    check(q, k, v, bands, causal=causal, tiles=tiles)


@pytest.mark.parametrize("tiles", [AttentionTiles(32, 64, num_warps=1, num_stages=1),
                                   AttentionTiles(16, 16, num_warps=1, num_stages=1)])
@pytest.mark.parametrize("causal", [False, True])
def test_layouts_whose_blocks_do_not_match_the_tiles_read_their_bit_rows(tiles, causal):
    # Layout blocks smaller than, larger than and not aligned with the tiles, with more than 32
    # layout columns (a tile's columns then cross a word of the bit rows), odd lengths, Sq != Sk.
    Sq, Sk = 77, 200
    g = torch.Generator().manual_seed(tiles.block_n * 2 + int(causal))
    blocks = [(16, 5), (24, 40), (7, 3)]
    heads = tuple(P.BlockSparse(torch.rand(-(-Sq // bq), -(-Sk // bk), generator=g) < 0.4, (bq, bk))
                  for bq, bk in blocks)
    q, k, v = random_qkv(1, 3, 3, Sq, Sk, 16, seed=tiles.block_m)
    check(q, k, v, heads, causal=causal, tiles=tiles)
    unions = (heads[0] | P.Window(2, 2), heads[1] | heads[2], P.Columns([(0, 4)]) | heads[2])
    check(q, k, v, unions, causal=causal, tiles=tiles)


def test_a_layers_launch_is_built_once_and_takes_each_calls_tensors():
    """kernel_call reuses the cached launch (grid, tables, strides, constexprs) of a layer and
    puts the call's own q, k, v and out in it; other strides build another launch."""
    patterns = (P.Window(3, 3), P.Window(5, 0))
    group = at.group_heads(patterns)[0]
    tiles = default_tiles(16, torch.float32, 40, 40)
    make = lambda: [torch.randn(1, 2, 40, 16) for _ in range(4)]  # noqa: E731
    first, second = make(), make()
    a = at.kernel_call(group, *first, False, 0.25, tiles, interpreted=True)
    b = at.kernel_call(group, *second, False, 0.25, tiles, interpreted=True)
    assert all(x is y for x, y in zip(a.args[:4], first)) and all(x is y for x, y in zip(b.args[:4], second))
    assert all(x is y for x, y in zip(a.args[4:], b.args[4:])) and a.grid == b.grid and a.kwargs == b.kwargs
    q_t = torch.randn(1, 40, 2, 16).transpose(1, 2)  # the same shape, other strides
    c = at.kernel_call(group, q_t, *second[1:], False, 0.25, tiles, interpreted=True)
    assert c.args[0] is q_t and c.args[4:] != b.args[4:]
    assert at.kernel_call(group, *second, False, 0.25, tiles, interpreted=False).kwargs["DOT_PRECISION"] == "ieee"


@settings(max_examples=200, deadline=None)
@given(offsets=st.lists(st.integers(-400, 400), min_size=1, max_size=4), width=st.integers(0, 400),
       Sq=st.integers(1, 60), Sk=st.integers(1, 60))
def test_multi_diagonal_packing_keeps_every_pair(offsets, width, Sq, Sk):
    """The kernel's (width, offsets) of a MultiDiagonal, bounded for int32 arithmetic
    (multi_diagonal._bounded), keep exactly the diagonals j - i the pattern keeps."""
    from sparsec.codegen.templates.multi_diagonal import _bounded

    offsets = sorted(set(offsets))
    bounded_width, bounded = _bounded(offsets, width, Sq + Sk)
    assert bounded_width <= 2 * (Sq + Sk) and all(abs(o) <= 3 * (Sq + Sk) for o in bounded)
    assert bounded == sorted(bounded)  # the kernel visits the bands in order
    for d in range(-(Sq - 1), Sk):
        assert any(abs(d - o) <= width for o in offsets) == any(abs(d - o) <= bounded_width for o in bounded), d
