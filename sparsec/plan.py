"""`sparsec.Plan`: what the search chose for every attention layer, as versioned JSON.

    plan.save("plan.json"); plan = Plan.load("plan.json"); print(plan); plan.plot("plan.png")
    plan.check_fingerprint(attention_fingerprint(layers))   # refuses a plan for another model

A plan names layers by module path and records, per layer, one pattern per query head, the head
groups (one launch each), the tiles, the measured relative error, the cost model's dense and
sparse seconds, and the layer's shape. Loading is strict: a malformed file, another version,
or a missing or unknown field raises a ValueError that names the problem.
"""
from __future__ import annotations

import functools
import hashlib
import io
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from sparsec.codegen.tiles import AttentionTiles
from sparsec.patterns import Pattern, from_dict

__all__ = ["PLAN_VERSION", "LayerPlan", "Plan", "attention_fingerprint"]

PLAN_VERSION = 1
_DTYPES = ("f32", "bf16", "f16")
_DENSITY_ROWS = 512            # a head's density in the table: from this many evenly spread query rows,
_DENSITY_ELEMENTS = 1 << 22    # fewer where they would hold more (row, key) pairs than this (long contexts),
_DENSITY_MIN_ROWS = 32         # but at least this many
_PATTERN_TEXT = 60   # characters of a pattern shown in the table


@dataclass(frozen=True, slots=True, kw_only=True)
class LayerPlan:
    """One attention layer's choice."""

    patterns: tuple[Pattern, ...]                # one per query head
    head_groups: tuple[tuple[int, ...], ...]     # heads run in one launch
    tiles: tuple[int, int]                       # (block_m, block_n)
    error: float                                 # ||O_sparse - O_dense|| / ||O_dense|| on calibration
    dense_seconds: float
    sparse_seconds: float
    num_heads: int
    num_kv_heads: int
    q_len: int
    kv_len: int
    head_dim: int
    dtype: str
    causal: bool

    def __post_init__(self):
        _check_layer(self)

    @property
    def speedup(self) -> float:
        return self.dense_seconds / self.sparse_seconds if self.sparse_seconds > 0 else math.inf

    def density(self, head: int) -> float:
        """Kept fraction of the causally allowed pairs of one head (0 for Skip); from at most
        _DENSITY_ROWS evenly spread query rows (fewer at long keys), so it stays cheap at long sequences."""
        return _sampled_density(self.patterns[head], self.q_len, self.kv_len, self.causal)

    def to_dict(self) -> dict:
        return {
            "patterns": [p.to_dict() for p in self.patterns],
            "head_groups": [list(g) for g in self.head_groups],
            "tiles": list(self.tiles),
            **{f: getattr(self, f) for f in _SCALAR_FIELDS},
        }

    @staticmethod
    def from_dict(data: Any, where: str) -> LayerPlan:
        _expect_fields(data, {f.name for f in fields(LayerPlan)}, where)
        try:
            patterns = tuple(from_dict(p) for p in _expect_list(data["patterns"], f"{where}.patterns"))
        except (ValueError, TypeError) as e:
            raise ValueError(f"{where}.patterns: {e}") from None
        groups = tuple(tuple(_expect_list(g, f"{where}.head_groups")) for g in _expect_list(data["head_groups"], f"{where}.head_groups"))
        tiles = tuple(_expect_list(data["tiles"], f"{where}.tiles"))
        try:
            return LayerPlan(patterns=patterns, head_groups=groups, tiles=tiles,  # type: ignore[arg-type]
                             **{f: data[f] for f in _SCALAR_FIELDS})
        except (ValueError, TypeError) as e:
            raise ValueError(f"{where}: {e}") from None


_SCALAR_FIELDS = ("error", "dense_seconds", "sparse_seconds", "num_heads", "num_kv_heads", "q_len", "kv_len",
                  "head_dim", "dtype", "causal")
_INT_FIELDS = ("num_heads", "num_kv_heads", "q_len", "kv_len", "head_dim")
_FLOAT_FIELDS = ("error", "dense_seconds", "sparse_seconds")


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check_layer(layer: LayerPlan) -> None:
    for name in _INT_FIELDS:
        if not _is_int(getattr(layer, name)) or getattr(layer, name) < 1:
            raise ValueError(f"{name} must be a positive int, got {getattr(layer, name)!r}")
    for name in _FLOAT_FIELDS:
        value = getattr(layer, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
            raise ValueError(f"{name} must be a non-negative number, got {value!r}")
    if layer.dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {_DTYPES}, got {layer.dtype!r}")
    if not isinstance(layer.causal, bool):
        raise ValueError(f"causal must be a bool, got {layer.causal!r}")
    if layer.num_heads % layer.num_kv_heads:
        raise ValueError(f"num_heads {layer.num_heads} is not a multiple of num_kv_heads {layer.num_kv_heads}")
    if len(layer.patterns) != layer.num_heads or not all(isinstance(p, Pattern) for p in layer.patterns):
        raise ValueError(f"need one Pattern per head: {layer.num_heads} heads, got {len(layer.patterns)} patterns")
    try:
        if len(layer.tiles) != 2:
            raise ValueError
        AttentionTiles(*layer.tiles)  # the kernels' own rule
    except (TypeError, ValueError):
        raise ValueError(f"tiles must be two powers of two >= 16 (block_m, block_n: the kernels' rule), "
                         f"got {layer.tiles!r}") from None
    heads = [h for g in layer.head_groups for h in g]
    if not all(_is_int(h) for h in heads) or sorted(heads) != list(range(layer.num_heads)):
        raise ValueError(f"head_groups must hold every head 0..{layer.num_heads - 1} exactly once, got {layer.head_groups!r}")


def _expect_fields(data: Any, names: set[str], where: str) -> None:
    if not isinstance(data, dict):
        raise ValueError(f"{where} must be a JSON object, got {type(data).__name__}")
    missing, unknown = names - set(data), set(data) - names
    if missing:
        raise ValueError(f"{where} is missing field(s) {sorted(missing)}")
    if unknown:
        raise ValueError(f"{where} has unknown field(s) {sorted(unknown)}")


def _expect_list(value: Any, where: str) -> list:
    if not isinstance(value, list):
        raise ValueError(f"{where} must be a JSON list, got {type(value).__name__}")
    return value


@dataclass(frozen=True, kw_only=True)
class Plan:
    """Per-layer attention plans for one model and target (see the module doc)."""

    target: str
    budget: float
    model_fingerprint: str
    layers: Mapping[str, LayerPlan] = field(default_factory=dict)
    version: int = PLAN_VERSION

    def __post_init__(self):
        if self.version != PLAN_VERSION:
            raise ValueError(f"plan version {self.version!r} is not supported; this sparsec reads version {PLAN_VERSION}")
        if not isinstance(self.target, str) or not isinstance(self.model_fingerprint, str):
            raise ValueError("plan target and model_fingerprint must be strings")
        if isinstance(self.budget, bool) or not isinstance(self.budget, (int, float)) or not self.budget >= 0:
            raise ValueError(f"plan budget must be a non-negative number, got {self.budget!r}")
        for path, layer in self.layers.items():
            if not isinstance(path, str) or not isinstance(layer, LayerPlan):
                raise ValueError(f"plan layers must map module paths to LayerPlans, got {path!r}: {type(layer).__name__}")
        object.__setattr__(self, "layers", dict(self.layers))

    # -- JSON ----------------------------------------------------------------------------------

    def to_dict(self) -> dict:
        return {"version": self.version, "target": self.target, "budget": self.budget,
                "model_fingerprint": self.model_fingerprint,
                "layers": {path: layer.to_dict() for path, layer in self.layers.items()}}

    @staticmethod
    def from_dict(data: Any) -> Plan:
        if isinstance(data, dict) and "version" in data and data["version"] != PLAN_VERSION:
            raise ValueError(f"plan version {data['version']!r} is not supported; this sparsec reads version {PLAN_VERSION}")
        _expect_fields(data, {"version", "target", "budget", "model_fingerprint", "layers"}, "plan")
        if not isinstance(data["layers"], dict):
            raise ValueError("plan.layers must be a JSON object mapping module paths to layer plans")
        layers = {path: LayerPlan.from_dict(layer, f"plan.layers[{path!r}]") for path, layer in data["layers"].items()}
        return Plan(version=data["version"], target=data["target"], budget=data["budget"],
                    model_fingerprint=data["model_fingerprint"], layers=layers)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    def save(self, path: str | Path) -> None:
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(self.to_json())
        tmp.replace(path)  # a reader never sees half a plan

    @staticmethod
    def load(path: str | Path) -> Plan:
        """Read a plan saved by `save`; a ValueError names what is wrong with a bad file."""
        try:
            text = Path(path).read_text()
        except OSError as e:
            raise ValueError(f"cannot read plan file {str(path)!r}: {e}") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"plan file {str(path)!r} is not valid JSON: {e}") from None
        try:
            return Plan.from_dict(data)
        except ValueError as e:
            raise ValueError(f"plan file {str(path)!r}: {e}") from None

    # -- checks --------------------------------------------------------------------------------

    def check_fingerprint(self, fingerprint: str) -> None:
        """Raise if this plan was made for a model with other attention layers."""
        if fingerprint != self.model_fingerprint:
            raise ValueError(
                f"this plan was made for another model (its attention fingerprint is {self.model_fingerprint!r}, "
                f"the model's is {fingerprint!r}): its layers, heads or head sizes differ; tune this model again")

    # -- reports -------------------------------------------------------------------------------

    def __str__(self) -> str:
        return _render(self)

    def plot(self, path: str | Path) -> None:
        """Save a figure: the chosen family per layer x head, and each head's density."""
        _plot(self, path)


def attention_fingerprint(layers: Sequence[tuple[str, int, int, int]]) -> str:
    """A stable hash of a model's attention layers: (module path, num_heads, num_kv_heads,
    head_dim) each, in order."""
    canonical = []
    for entry in layers:
        if len(entry) != 4:
            raise ValueError(f"attention_fingerprint: each layer must be (module_path, num_heads, num_kv_heads, head_dim), got {entry!r}")
        path, heads, kv_heads, head_dim = entry
        canonical.append([str(path), int(heads), int(kv_heads), int(head_dim)])
    digest = hashlib.sha256(json.dumps(canonical, separators=(",", ":")).encode()).hexdigest()
    return digest[:16]


# -- reports -------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1024)  # a plan's layers share patterns (the tuner rounds their parameters)
def _sampled_density(pattern: Pattern, Sq: int, Sk: int, causal: bool) -> float:
    import torch

    count = max(_DENSITY_MIN_ROWS, min(_DENSITY_ROWS, _DENSITY_ELEMENTS // Sk))  # cheap at long keys too
    rows = torch.linspace(0, Sq - 1, min(Sq, count)).round().long().unique()[:, None]
    cols = torch.arange(Sk)[None, :]
    kept = pattern.keep(rows, cols, Sq, Sk).expand(rows.shape[0], Sk)
    allowed = cols <= rows + (Sk - Sq) if causal else torch.ones_like(kept)
    total = int(allowed.sum())
    return int((kept & allowed).sum()) / total if total else 0.0


def _short(text: str) -> str:
    return text if len(text) <= _PATTERN_TEXT else text[: _PATTERN_TEXT - 3] + "..."


def _render(plan: Plan) -> str:
    """Every layer as a rich table: heads, patterns, groups, tiles, error, times, speedup."""
    from rich.console import Console
    from rich.table import Table

    out = io.StringIO()
    console = Console(file=out, width=120, force_terminal=False, color_system=None)
    console.print(f"sparsec plan v{plan.version}: target {plan.target}, budget {plan.budget:g}, "
                  f"{len(plan.layers)} attention layers, model {plan.model_fingerprint}")
    for path, layer in plan.layers.items():
        group_of = {h: g for g, heads in enumerate(layer.head_groups) for h in heads}
        console.print(_layer_title(path, layer))  # above the table: a title would wrap to its width
        table = Table()
        for column in ("head", "pattern", "group", "density"):
            table.add_column(column)
        for h, p in enumerate(layer.patterns):
            table.add_row(str(h), _short(repr(p)), str(group_of[h]), f"{layer.density(h):.3f}")
        console.print(table)
    return out.getvalue()


def _layer_title(path: str, layer: LayerPlan) -> str:
    shape = (f"{layer.num_heads} heads ({layer.num_kv_heads} kv), q {layer.q_len} x kv {layer.kv_len}, "
             f"d {layer.head_dim}, {layer.dtype}{', causal' if layer.causal else ''}")
    return (f"{path}: {shape}\n  {len(layer.head_groups)} group(s), tiles {layer.tiles[0]}x{layer.tiles[1]}, "
            f"error {layer.error:.4f}, dense {layer.dense_seconds * 1e6:.1f} us, sparse "
            f"{layer.sparse_seconds * 1e6:.1f} us, speedup {layer.speedup:.2f}x")


def _plot(plan: Plan, path: str | Path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("Plan.plot needs matplotlib, which is not installed; `pip install matplotlib` "
                          "(or sparsec[bench])") from None
    import numpy as np

    if not plan.layers:
        raise ValueError("Plan.plot: the plan has no layers to plot")
    families = sorted({p.family for layer in plan.layers.values() for p in layer.patterns})
    width = max(layer.num_heads for layer in plan.layers.values())
    chosen = np.full((len(plan.layers), width), np.nan)
    density = np.full((len(plan.layers), width), np.nan)
    for row, layer in enumerate(plan.layers.values()):
        for h, p in enumerate(layer.patterns):
            chosen[row, h] = families.index(p.family)
            density[row, h] = layer.density(h)
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 2 + 0.3 * len(plan.layers)), squeeze=True)
    image = left.imshow(chosen, aspect="auto", cmap=plt.get_cmap("tab10", len(families)),
                        vmin=-0.5, vmax=len(families) - 0.5, interpolation="nearest")
    bar = fig.colorbar(image, ax=left, ticks=range(len(families)))
    bar.ax.set_yticklabels(families)
    left.set_title("pattern family")
    shown = right.imshow(density, aspect="auto", cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
    fig.colorbar(shown, ax=right)
    right.set_title("density (kept fraction)")
    for ax in (left, right):
        ax.set_xlabel("head")
        ax.set_yticks(range(len(plan.layers)))
        ax.set_yticklabels(list(plan.layers), fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
