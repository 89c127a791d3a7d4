"""The tiny DiT's positional heads: each role puts its attention mass where it says (float64 maps
from the model's own q and k on fresh inputs), roles rotate per block, bad roles are refused, and
sparsec.tune finds the planted structure."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch

import sparsec
from sparsec.models import TinyDiTConfig, example_inputs, positional_dit, tiny_dit, with_roles
from sparsec.models.positional_heads import POSITION_DIMS, positional_terms

# 4 frames of 8 x 8 patches (256 tokens), head_dim 32
SMALL = TinyDiTConfig(frames=4, height=16, width=16, dim=128, heads=4, depth=2, text_len=4, text_dim=16)


def _attention_maps(model, inputs) -> dict[int, tuple[tuple[str, ...], torch.Tensor]]:
    """block -> (its heads' roles, (heads, S, S) float64 attention probabilities)."""
    maps = {}

    def hook(index):
        def record(module, args, _):
            x = args[0]
            B, S, D = x.shape
            q, k, _ = module.qkv(x).view(B, S, 3, module.heads, D // module.heads).permute(2, 0, 3, 1, 4)
            q, k = q * module.keep + module.q_term, k * module.keep + module.k_term
            logits = q[0].double() @ k[0].double().transpose(-1, -2) / math.sqrt(D // module.heads)
            maps[index] = (module.roles, logits.softmax(dim=-1))
        return record

    for index, block in enumerate(model.blocks):
        block.attn.register_forward_hook(hook(index))
    with torch.no_grad():
        model(*inputs)
    return maps


def _regions(config: TinyDiTConfig) -> dict[str, torch.Tensor]:
    """(S, S) bool: where each role's mass should be."""
    frames, rows, columns = config.grid
    token = torch.arange(config.tokens)
    t, y, x = token // (rows * columns), (token // columns) % rows, token % columns
    near = lambda c, r: (c[:, None] - c[None, :]).abs() <= r  # noqa: E731
    return {
        "local": (t[:, None] == t[None, :]) & near(y, 2) & near(x, 2),
        "temporal": near(y, 1) & near(x, 1),
        "sink": (token[None, :] < columns).expand(config.tokens, -1) | ((t[:, None] == t[None, :]) & near(y, 3) & near(x, 3)),
    }


def test_each_role_puts_its_mass_where_it_says():
    config = with_roles(SMALL)
    model, _ = tiny_dit(config)
    maps = _attention_maps(model, example_inputs(config, seed=7))  # fresh inputs, not the factory's
    regions = _regions(config)
    sink_columns = torch.arange(config.tokens) < config.grid[2]
    seen = set()
    for roles, probabilities in maps.values():
        for role, p in zip(roles, probabilities):
            seen.add(role)
            if role == "content":  # by content: spread over most keys
                assert (p.max(dim=-1).values < 0.2).all()
                continue
            inside = (p * regions[role]).sum(dim=-1)
            assert inside.min() > 0.9, (role, inside.min())
            if role == "sink":
                assert (p[:, sink_columns].sum(dim=-1) > 0.5).float().mean() > 0.9
    assert seen == {"local", "temporal", "sink", "content"}


def test_roles_rotate_per_block_and_content_heads_are_untouched():
    model, _ = positional_dit(SMALL)
    assert [b.attn.roles for b in model.blocks] == [("local", "temporal", "sink", "content"),
                                                     ("temporal", "sink", "content", "local")]
    terms = positional_terms(("content", "local"), *SMALL.grid, 32)
    assert (terms.q_term[0] == 0).all() and (terms.keep[0] == 1).all()
    assert (terms.keep[1, 0, :POSITION_DIMS] == 0).all() and (terms.keep[1, 0, POSITION_DIMS:] == 1).all()
    plain, _ = tiny_dit(SMALL)
    assert all(not b.attn.roles for b in plain.blocks)
    assert set(model.state_dict()) == set(plain.state_dict())  # the terms are not parameters


def test_bad_roles_are_refused_by_name():
    with pytest.raises(ValueError, match="unknown head role"):
        dataclasses.replace(SMALL, head_roles=("local", "diagonal", "sink", "content"))
    with pytest.raises(ValueError, match="3 role"):
        dataclasses.replace(SMALL, head_roles=("local", "sink", "content"))
    with pytest.raises(ValueError, match="head_dim >= 14"):
        dataclasses.replace(SMALL, dim=32, head_roles=("local",) * 4)


def test_the_model_runs_in_bfloat16():
    config = with_roles(dataclasses.replace(SMALL, depth=1))
    model, _ = tiny_dit(config)
    inputs = example_inputs(config, seed=3)
    with torch.no_grad():
        reference = model(*inputs)
        out = model.to(torch.bfloat16)(*example_inputs(config, seed=3, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16
    assert ((out.double() - reference.double()).norm() / reference.double().norm()) < 0.05


def test_tune_finds_the_planted_heads():
    """Positional heads get sparse patterns, content heads stay (nearly) dense, and the tuned model's
    output on fresh inputs stays close to the dense one."""
    from tests.planted import cheap_calls_cpu

    config = with_roles(dataclasses.replace(SMALL, height=32, width=32, depth=1))  # 1024 tokens: worth it
    model, calibration = tiny_dit(config)
    plan = sparsec.tune(model, calibration, target=cheap_calls_cpu(), budget=0.05, progress=False)
    layer = plan.layers["blocks.0.attn"]
    for role, pattern in zip(model.blocks[0].attn.roles, layer.patterns):
        density = pattern.density(config.tokens, config.tokens)
        if role == "content":  # dense, or a band keeping most keys (the native CPU kernel runs it a
            assert density > 0.6, (role, pattern)  # little faster than dense SDPA, within the budget)
        else:
            assert density < 0.35, (role, pattern)
    fresh = example_inputs(config, seed=11)
    with torch.no_grad():
        dense = model(*fresh)
        sparse = torch.compile(model, backend="sparsec", options={"inner": "eager", "plan": plan})(*fresh)
    assert 0 < ((sparse - dense).norm() / dense.norm()) < 0.05
