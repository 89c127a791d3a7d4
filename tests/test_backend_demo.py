"""The bundled tiny DiT and the demo, on a shrunken config (the real demo is the same code)."""
from __future__ import annotations

import torch

from sparsec.demo import demo_patterns, run_demo
from sparsec.models import TinyDiTConfig, tiny_dit

SMALL = TinyDiTConfig(frames=3, height=8, width=8, dim=32, heads=4, depth=1, text_len=4, text_dim=16)


def test_tiny_dit_round_trips_the_video_shape():
    model, (latents, timestep, text) = tiny_dit(SMALL, batch=2)
    with torch.no_grad():
        out = model(latents, timestep, text)
    assert out.shape == latents.shape and torch.isfinite(out).all()
    patches = model.patchify(latents)
    assert patches.shape == (2, SMALL.tokens, SMALL.in_channels * SMALL.patch ** 2)
    torch.testing.assert_close(model.unpatchify(patches, latents.shape), latents, atol=0, rtol=0)


def test_demo_checks_pass_and_report_everything():
    lines: list[str] = []
    result = run_demo(SMALL, repeats=1, write=lines.append)
    assert result.dense_error < 1e-5
    assert result.sparse_error < 1e-4
    assert result.sparse_vs_dense > 1e-3  # the patterns do change the output
    assert 0 < result.density < 1
    text = "\n".join(lines)
    assert text.count("OK") == 2 and "MISMATCH" not in text
    assert "blocks.0.attn" in text and set(result.timings) == {"eager", "sparsec dense", "sparsec sparse"}


def test_demo_patterns_follow_the_frame_stride():
    patterns = demo_patterns(SMALL)
    assert len(patterns) == SMALL.heads
    assert SMALL.tokens_per_frame in patterns[1].offsets


def test_tuned_demo_tunes_the_positional_model_and_reports_it():
    from sparsec.demo import run_tuned_demo
    from sparsec.patterns import Dense
    from tests.planted import cheap_calls_cpu

    config = TinyDiTConfig(frames=4, height=16, width=16, dim=64, heads=4, depth=1, text_len=4, text_dim=16)
    lines: list[str] = []
    result = run_tuned_demo(config, repeats=1, target=cheap_calls_cpu(), write=lines.append)
    layer = result.plan.layers["blocks.0.attn"]
    assert any(not isinstance(p, Dense) for p in layer.patterns)  # the positional heads are found
    assert 0 < result.sparse_vs_dense < 0.1
    assert set(result.timings) == {"sparsec dense", "sparsec tuned"}
    text = "\n".join(lines)
    assert "blocks.0.attn:" in text and "relative L2" in text
