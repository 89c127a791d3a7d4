"""The Triton kernels in frame-transposed token order (codegen/templates/frames_transposed.py,
codegen/triton_frame_order.py): run through Triton's interpreter at small sizes against the float64
reference built from pattern.mask() in natural order; the order's choice at GPU sizes, without
running a kernel."""
from __future__ import annotations

import math

import pytest
import torch

from sparsec import patterns as P
from sparsec.codegen import attention_triton
from sparsec.codegen.attention_triton import add_launch_hook, kernel_source, supports, triton_attention
from sparsec.codegen.block_coverage import row_intervals
from sparsec.codegen.frame_order import FramesTransposed
from sparsec.codegen.templates.tables import block_tables
from sparsec.codegen.tiles import AttentionTiles
from sparsec.codegen.triton_frame_order import choose_frame_order
from reference import reference_attention

TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}
TILES = AttentionTiles(16, 16, num_warps=4, num_stages=1)


def temporal(frame: int, frames: int, rows: tuple[int, ...] = (0,), width: int = 1) -> P.MultiDiagonal:
    return P.MultiDiagonal([k * frame + r for k in range(-frames + 1, frames) for r in rows], width)


@pytest.fixture
def interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def check(head_patterns, *, B=1, Hkv=None, S=48, D=16, Dv=16, causal=False, dtype=torch.float32, tiles=TILES, seed=0):
    torch.manual_seed(seed)
    Hq = len(head_patterns)
    q = torch.randn(B, Hq, S, D, dtype=dtype)
    k = torch.randn(B, Hkv or Hq, S, D, dtype=dtype)
    v = torch.randn(B, Hkv or Hq, S, Dv, dtype=dtype)
    launches = []
    remove = add_launch_hook(launches.append)
    try:
        out = triton_attention(q, k, v, tuple(head_patterns), causal=causal, scale=1 / math.sqrt(D), tiles=tiles,
                               frames=True)
    finally:
        remove()
    expected = reference_attention(q, k, v, head_patterns, causal=causal, scale=1 / math.sqrt(D))
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), expected, atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])
    return launches


@pytest.mark.triton  # runs the kernels through the interpreter (tests/conftest.py)
@pytest.mark.parametrize("causal", [False, True])
def test_temporal_heads_run_transposed_in_one_launch_and_match_the_reference(interpret, causal):
    heads = [temporal(12, 4, (0, 3), 1), P.Window(3, 3), temporal(12, 4, (-2,), 0), temporal(12, 4, (0,), 2)]
    launches = check(heads, causal=causal)
    transposed = [launch for launch in launches if launch.family == "frames_transposed"]
    assert len(transposed) == 1 and len(transposed[0].heads) == 3  # heads 0, 2, 3, on their gathered rows


@pytest.mark.triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_transposed_order_with_gqa_batch_and_value_width(interpret, dtype):
    heads = [temporal(8, 5, (0, 1), 1)] * 2 + [temporal(8, 5, (-3, 3), 0)] * 2
    check(heads, B=2, Hkv=2, S=40, Dv=24, dtype=dtype, causal=True, seed=2)


@pytest.mark.triton
def test_tiles_larger_than_a_frame_and_query_blocks_past_the_end(interpret):
    # 6 frames of 10 tokens: 60 rows in query blocks of 32 (the last one half padding), keys in 32s
    heads = [temporal(10, 6, (0, 2), 1)] * 2
    check(heads, S=60, tiles=AttentionTiles(32, 32, num_warps=4, num_stages=1), seed=4)


@pytest.mark.triton
def test_rows_without_keys_are_zero(interpret):
    heads = [P.MultiDiagonal([16, 24], 0)] * 2  # the last two frames' queries keep nothing
    check(heads, S=32)


def test_block_masks_hold_exactly_the_kept_pairs_of_each_partial_block():
    pattern = FramesTransposed(temporal(12, 4, (0, 5), 1), 12)
    for causal in (False, True):
        tables = block_tables([pattern], 48, 48, 16, 16, causal)
        masks = tables.masks.view(1, 3, tables.partial.shape[-1], 16, 1)
        lo, hi = row_intervals(pattern, 48, 48, causal)
        keys = torch.arange(48)
        kept = ((keys >= lo[..., None]) & (keys <= hi[..., None])).any(dim=1)  # (48, 48) from the intervals
        for qb in range(3):
            for slot in range(int(tables.num_partial[0, qb])):
                kb = int(tables.partial[0, qb, slot])
                word = masks[0, qb, slot, :, 0].to(torch.int64) & 0xFFFFFFFF
                bits = (word[:, None] >> torch.arange(16)) & 1
                assert torch.equal(bits.bool(), kept[qb * 16:qb * 16 + 16, kb * 16:kb * 16 + 16])


def test_kernel_source_is_readable_and_bad_bases_are_refused():
    source = kernel_source("frames_transposed")
    assert "BLOCK_MASKS" in source and "block_mask" in source
    q = torch.randn(1, 1, 48, 16)
    assert "bands only" in supports(q, q, q, [FramesTransposed(P.Columns([(0, 4)]), 12)])
    assert "Sq == Sk" in supports(q, q[:, :, :36], q[:, :, :36], [FramesTransposed(temporal(12, 3), 12)])
    with pytest.raises(ValueError, match="frames must be None, True or False"):
        triton_attention(q, q, q, [P.Dense()], causal=False, scale=0.25, frames="on")


def test_the_cost_model_transposes_temporal_heads_only_at_video_lengths():
    """16 frames of 32 x 32 patches (16K tokens), bf16 on the H100 profile: temporal heads run
    transposed at the 1024-token frame stride, in-frame local and dense heads stay."""
    S = 16 * 1024
    heads = (temporal(1024, 16, (-32, 0, 32), 2), P.MultiDiagonal([-64, -32, -1, 0, 1, 32, 64], 1), P.Dense()) * 2
    shape = (1, len(heads), S, 128)
    patterns, frame = choose_frame_order(heads, shape, shape, shape, torch.bfloat16, False, 128, 64, "h100")
    assert frame == 1024
    assert [isinstance(p, FramesTransposed) for p in patterns] == [True, False, False] * 2
    same, none = choose_frame_order(heads, shape, shape, shape, torch.bfloat16, False, 128, 64, "h100", frames=False)
    assert same == heads and none is None
    short = (1, 3, 1024, 64)  # 4 frames of 256: the gathers and the extra launch cost more than they save
    short_heads = (temporal(256, 4, (-16, 0, 16), 2), P.MultiDiagonal([-32, -16, -1, 0, 1, 16, 32], 1), P.Dense())
    kept, frame = choose_frame_order(short_heads, short, short, short, torch.bfloat16, False, 128, 64, "h100")
    assert kept == short_heads and frame is None


def test_kernel_calls_compile_the_transposed_launches_a_call_makes(interpret):
    S = 48
    q = torch.randn(1, 2, S, 16)
    heads = (FramesTransposed(temporal(12, 4), 12), P.Window(2, 2))
    families = [c.kernel for c in attention_triton.kernel_calls(q, q, q, heads, causal=True, scale=0.25, tiles=TILES)]
    assert families == ["attention_frames_transposed_kernel", "attention_window_kernel"]


def test_the_search_prices_temporal_heads_as_the_kernels_run_them():
    """On a GPU profile the search's head price of a temporal head is its frame-transposed price
    (cheaper there), a local head keeps its own; the exact layer price runs the transposed heads as
    one launch and adds the gathers: between the transposed kernels alone and token order."""
    from sparsec.cost_models.attention_cost import AttentionShape, estimate_attention, head_seconds_many
    from sparsec.cost_models.hardware import get_profile
    from sparsec.passes.search_patterns import CostTable

    S, hw, tiles = 16 * 1024, get_profile("h100"), (128, 64)
    shape = AttentionShape(batch=1, num_heads=8, num_kv_heads=8, q_len=S, kv_len=S, head_dim=128, value_dim=128,
                           dtype="bf16")
    temporal_head = temporal(1024, 16, (-32, 0, 32), 2)
    local_head = P.MultiDiagonal([-64, -32, -1, 0, 1, 32, 64], 1)
    natural, transposed, local = head_seconds_many(
        [temporal_head, FramesTransposed(temporal_head, 1024), local_head], shape, hw, block_m=128, block_n=64)
    assert transposed < natural / 2
    costs = CostTable(hw)
    assert costs.head_prices([temporal_head, local_head], shape, tiles) == pytest.approx([transposed, local])
    heads = (temporal_head, local_head) * 4
    run = (FramesTransposed(temporal_head, 1024), local_head) * 4

    def layer(patterns):
        return estimate_attention(patterns, shape, hw, block_m=128, block_n=64).seconds

    assert layer(run) < costs.layer_seconds(heads, shape, tiles) < layer(heads)
