"""sparsec.Plan: JSON round trips, strict loading, fingerprints, the printed table, the plot."""
from __future__ import annotations

import json

import pytest

from sparsec import patterns as P
from sparsec.plan import PLAN_VERSION, LayerPlan, Plan, attention_fingerprint


def layer(**changes) -> LayerPlan:
    fields = dict(
        patterns=(P.Window(16, 0), P.Columns([(0, 4), 100]), P.Skip("mean"),
                  P.BlockSparse([[1, 0, 0, 0], [1, 1, 0, 1]], (64, 32)),
                  P.Dense(), P.MultiDiagonal([-64, 0], 1)),
        head_groups=((0,), (1,), (2,), (3,), (4,), (5,)),
        tiles=(64, 32), error=0.0123, dense_seconds=2e-3, sparse_seconds=1e-3,
        num_heads=6, num_kv_heads=2, q_len=128, kv_len=128, head_dim=64, dtype="bf16", causal=True)
    fields.update(changes)
    return LayerPlan(**fields)


FINGERPRINT = attention_fingerprint([("blocks.0.attn", 6, 2, 64), ("blocks.1.attn", 6, 2, 64)])


def plan() -> Plan:
    return Plan(target="h100", budget=0.02, model_fingerprint=FINGERPRINT,
                layers={"blocks.0.attn": layer(), "blocks.1.attn": layer(causal=False, error=0.0)})


def test_round_trip(tmp_path):
    original = plan()
    path = tmp_path / "plan.json"
    original.save(path)
    loaded = Plan.load(path)
    assert loaded == original
    assert list(loaded.layers) == ["blocks.0.attn", "blocks.1.attn"]  # order kept
    assert loaded.layers["blocks.0.attn"].patterns[3] == original.layers["blocks.0.attn"].patterns[3]
    assert json.loads(path.read_text())["version"] == PLAN_VERSION


def write(tmp_path, data) -> str:
    path = tmp_path / "bad.json"
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return str(path)


@pytest.mark.parametrize("mutate,message", [
    (lambda d: d.update(version=99), "version 99"),
    (lambda d: d.pop("budget"), "missing field.*budget"),
    (lambda d: d.update(extra=1), "unknown field.*extra"),
    (lambda d: d["layers"]["blocks.0.attn"].pop("tiles"), "blocks.0.attn.*missing field.*tiles"),
    (lambda d: d["layers"]["blocks.0.attn"].update(tiles=[64]), "tiles"),
    (lambda d: d["layers"]["blocks.0.attn"].update(tiles=[48, 48]), r"tiles must be two powers of two >= 16"),
    (lambda d: d["layers"]["blocks.0.attn"].update(tiles=[8, 64]), r"tiles must be two powers of two >= 16"),
    (lambda d: d["layers"]["blocks.0.attn"].update(head_groups=[["0", 1, 2, 3, 4, 5]]), "head_groups"),
    (lambda d: d["layers"]["blocks.0.attn"].update(head_groups=[[0, 1]]), "head_groups"),
    (lambda d: d["layers"]["blocks.0.attn"]["patterns"].pop(), "one Pattern per head"),
    (lambda d: d["layers"]["blocks.0.attn"]["patterns"].__setitem__(0, {"type": "Nope"}), "unknown pattern type"),
    (lambda d: d["layers"]["blocks.0.attn"].update(dtype="f64"), "dtype"),
    (lambda d: d["layers"]["blocks.1.attn"].update(num_kv_heads=4), "multiple of num_kv_heads"),
    (lambda d: d.update(layers=[]), "layers must be a JSON object"),
])
def test_load_refuses_malformed_plans(tmp_path, mutate, message):
    data = plan().to_dict()
    mutate(data)
    with pytest.raises(ValueError, match=message):
        Plan.load(write(tmp_path, data))


def test_load_refuses_non_json_and_missing_files(tmp_path):
    with pytest.raises(ValueError, match="not valid JSON"):
        Plan.load(write(tmp_path, "{not json"))
    with pytest.raises(ValueError, match="JSON object"):
        Plan.load(write(tmp_path, "[1, 2]"))
    with pytest.raises(ValueError, match="cannot read plan file"):
        Plan.load(tmp_path / "absent.json")


def test_fingerprint_refuses_another_model():
    p = plan()
    p.check_fingerprint(FINGERPRINT)
    other = attention_fingerprint([("blocks.0.attn", 6, 2, 64), ("blocks.1.attn", 6, 6, 64)])
    assert other != FINGERPRINT
    with pytest.raises(ValueError, match="another model"):
        p.check_fingerprint(other)
    assert attention_fingerprint([("a", 1, 1, 8)]) != attention_fingerprint([("b", 1, 1, 8)])
    with pytest.raises(ValueError, match="module_path, num_heads"):
        attention_fingerprint([("a", 1, 1)])


def test_print_shows_every_layer_and_head():
    text = str(plan())
    for path in ("blocks.0.attn", "blocks.1.attn"):
        assert path in text
    assert "Window(left=16, right=0)" in text and "Skip(fill='mean')" in text
    assert "2.00x" in text and "tiles 64x32" in text and "0.0123" in text
    assert "2000.0 us" in text and "1000.0 us" in text
    assert text.count("MultiDiagonal(offsets=[-64, 0], width=1)") == 2


def test_density_in_table_matches_mask():
    lp = layer()
    for h, p in enumerate(lp.patterns):
        assert lp.density(h) == pytest.approx(p.density(128, 128, causal=True))


def test_density_at_a_long_context_comes_from_fewer_rows():
    """At 128K keys the table's density samples fewer rows (it built a 512 x 128K mask a head: a 4-layer
    plan took 33 s to print) and stays near the exact figure: a causal window of 512 keeps min(i, 512) + 1
    keys of row i."""
    from sparsec.plan import _DENSITY_ELEMENTS, _sampled_density

    S = 1 << 17
    exact = sum(min(i, 512) + 1 for i in range(S)) / (S * (S + 1) / 2)
    assert _sampled_density(P.Window(512, 0), S, S, True) == pytest.approx(exact, rel=0.05)
    assert _DENSITY_ELEMENTS // S < 512  # the sample did shrink


def test_plot_needs_matplotlib(tmp_path):
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="matplotlib"):
            plan().plot(tmp_path / "plan.png")
        return
    plan().plot(tmp_path / "plan.png")
    assert (tmp_path / "plan.png").stat().st_size > 0


def test_invalid_plans_are_refused_when_built():
    with pytest.raises(ValueError, match="version"):
        Plan(target="h100", budget=0.02, model_fingerprint="x", version=2)
    with pytest.raises(ValueError, match="budget"):
        Plan(target="h100", budget=-1, model_fingerprint="x")
    with pytest.raises(ValueError, match="LayerPlans"):
        Plan(target="h100", budget=0.02, model_fingerprint="x", layers={"a": 3})
