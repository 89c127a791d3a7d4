"""Attention sparsity patterns: which (query i, key j) pairs a head keeps.

Every pattern is an immutable, hashable value with one reference semantics, `keep(i, j, Sq, Sk)`,
from which `mask()` and `density()` follow. Kernels and executors may compute the same set in
closed form, but tests always compare against `mask()`.

    Dense()                        every pair
    Skip(fill="mean" | "zero")     the head is not computed (see DESIGN.md for the fill)
    Window(left, right)            i - left <= j <= i + right
    MultiDiagonal(offsets, width)  some o in offsets with |j - (i + o)| <= width
    Columns(ranges)                j in any [start, end) of ranges (an int c means [c, c + 1))
    AShape(sink, window)           Columns([(0, sink)]) | Window(window, 0)
    VerticalSlash(columns, offsets)  Columns(columns) | MultiDiagonal(offsets, 0)
    BlockSparse(layout, block)     layout[i // bq, j // bk], layout of shape (ceil(Sq/bq), ceil(Sk/bk))
    p1 | p2                        union of masks
"""
from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from typing import Any, ClassVar

import numpy as np
import torch

__all__ = [
    "Pattern", "Dense", "Skip", "Window", "MultiDiagonal", "Columns", "AShape", "VerticalSlash",
    "BlockSparse", "Union", "union_of", "from_json", "from_dict", "normalize_head_patterns",
]

# Rows of the mask evaluated at once by density(): bounds memory at long sequence lengths.
_DENSITY_ROW_CHUNK = 1024
# The byte of '0': a bool layout + _ZERO is the ASCII text of its rows.
_ZERO = ord("0")


# Positions, widths and offsets are int64 in every mask and kernel table: larger ones are refused.
INT_LIMIT = 2 ** 62


def _check_int(name: str, value: Any, *, minimum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    if abs(value) >= INT_LIMIT:
        raise ValueError(f"{name} must be below 2**62 in size, got {value}")
    return value


def _check_lengths(Sq: int, Sk: int) -> None:
    _check_int("Sq", Sq, minimum=1)
    _check_int("Sk", Sk, minimum=1)


class Pattern:
    """Base of all patterns. Subclasses define `family`, `_key()`, `keep()` and `to_dict()`."""

    __slots__ = ("_hash_cache",)  # patterns key caches on every call of a compiled layer: hash once
    family: ClassVar[str]

    def _key(self) -> tuple:
        raise NotImplementedError

    def keep(self, i: torch.Tensor, j: torch.Tensor, Sq: int, Sk: int) -> torch.Tensor:
        """Bool tensor: whether query rows `i` keep key columns `j` (int64 tensors that broadcast)."""
        raise NotImplementedError

    def to_dict(self) -> dict:
        raise NotImplementedError

    # -- derived semantics ---------------------------------------------------------------

    def mask(self, Sq: int, Sk: int) -> torch.Tensor:
        """The reference semantics: a (Sq, Sk) bool tensor of the kept pairs."""
        _check_lengths(Sq, Sk)
        i = torch.arange(Sq, dtype=torch.int64)[:, None]
        j = torch.arange(Sk, dtype=torch.int64)[None, :]
        return self.keep(i, j, Sq, Sk).expand(Sq, Sk).clone()

    def density(self, Sq: int, Sk: int, causal: bool = False) -> float:
        """Kept fraction of the pairs (of the causally allowed pairs when `causal`)."""
        _check_lengths(Sq, Sk)
        j = torch.arange(Sk, dtype=torch.int64)[None, :]
        kept = allowed = 0
        for start in range(0, Sq, _DENSITY_ROW_CHUNK):
            i = torch.arange(start, min(Sq, start + _DENSITY_ROW_CHUNK), dtype=torch.int64)[:, None]
            rows = self.keep(i, j, Sq, Sk).expand(i.shape[0], Sk)
            if causal:
                allowed_rows = j <= i + (Sk - Sq)
                rows = rows & allowed_rows
                allowed += int(allowed_rows.sum())
            else:
                allowed += i.shape[0] * Sk
            kept += int(rows.sum())
        return kept / allowed if allowed else 0.0

    # -- value semantics -----------------------------------------------------------------

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and self._key() == other._key()  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        try:
            return self._hash_cache
        except AttributeError:
            value = hash((type(self).__name__, self._key()))
            object.__setattr__(self, "_hash_cache", value)
            return value

    def __reduce__(self):
        # Pickle (and deepcopy) the value, not the slots: a cached str hash is per process.
        return (from_dict, (self.to_dict(),))

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"{type(self).__name__} is immutable")

    def _init(self, **fields: Any) -> None:
        for name, value in fields.items():
            object.__setattr__(self, name, value)

    def __or__(self, other: Pattern) -> Pattern:
        if not isinstance(other, Pattern):
            return NotImplemented
        return union_of((self, other))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"))


class Dense(Pattern):
    """Every (i, j) pair: ordinary attention."""

    __slots__ = ()
    family = "dense"

    def _key(self) -> tuple:
        return ()

    def keep(self, i, j, Sq, Sk):
        return torch.ones(torch.broadcast_shapes(i.shape, j.shape), dtype=torch.bool)

    def to_dict(self) -> dict:
        return {"type": "Dense"}

    def __repr__(self) -> str:
        return "Dense()"


class Skip(Pattern):
    """The head is not computed. fill="mean": the mean of V over the keys the causal rule
    allows (uniform attention); fill="zero": zeros. Its mask is empty."""

    __slots__ = ("fill",)
    family = "skip"
    FILLS: ClassVar[tuple[str, ...]] = ("mean", "zero")

    def __init__(self, fill: str = "mean"):
        if fill not in self.FILLS:
            raise ValueError(f"Skip fill must be one of {self.FILLS}, got {fill!r}")
        self._init(fill=fill)

    def _key(self) -> tuple:
        return (self.fill,)

    def keep(self, i, j, Sq, Sk):
        return torch.zeros(torch.broadcast_shapes(i.shape, j.shape), dtype=torch.bool)

    def to_dict(self) -> dict:
        return {"type": "Skip", "fill": self.fill}

    def __or__(self, other: Pattern) -> Pattern:
        raise ValueError("Skip is not a mask and cannot be combined with |; use Skip alone")

    def __ror__(self, other: Pattern) -> Pattern:
        return self.__or__(other)

    def __repr__(self) -> str:
        return f"Skip(fill={self.fill!r})"


class Window(Pattern):
    """Diagonal band: i - left <= j <= i + right."""

    __slots__ = ("left", "right")
    family = "window"

    def __init__(self, left: int, right: int):
        self._init(left=_check_int("Window left", left, minimum=0),
                   right=_check_int("Window right", right, minimum=0))

    def _key(self) -> tuple:
        return (self.left, self.right)

    def keep(self, i, j, Sq, Sk):
        return (j >= i - self.left) & (j <= i + self.right)

    def to_dict(self) -> dict:
        return {"type": "Window", "left": self.left, "right": self.right}

    def __repr__(self) -> str:
        return f"Window(left={self.left}, right={self.right})"


class MultiDiagonal(Pattern):
    """Several bands: some o in offsets with |j - (i + o)| <= width (e.g. offsets = k * frame
    for the same position in neighbouring video frames)."""

    __slots__ = ("offsets", "width")
    family = "multi_diagonal"

    def __init__(self, offsets: Iterable[int], width: int):
        offsets = tuple(sorted({_check_int("MultiDiagonal offset", o) for o in offsets}))
        if not offsets:
            raise ValueError("MultiDiagonal needs at least one offset")
        self._init(offsets=offsets, width=_check_int("MultiDiagonal width", width, minimum=0))

    def _key(self) -> tuple:
        return (self.offsets, self.width)

    def keep(self, i, j, Sq, Sk):
        shape = torch.broadcast_shapes(i.shape, j.shape)
        kept = torch.zeros(shape, dtype=torch.bool)
        for o in self.offsets:
            kept |= (j - (i + o)).abs() <= self.width
        return kept

    def to_dict(self) -> dict:
        return {"type": "MultiDiagonal", "offsets": list(self.offsets), "width": self.width}

    def __repr__(self) -> str:
        return f"MultiDiagonal(offsets={list(self.offsets)}, width={self.width})"


def _canonical_ranges(ranges: Iterable[int | Sequence[int]], what: str) -> tuple[tuple[int, int], ...]:
    """Sorted, merged [start, end) ranges; an int c stands for [c, c + 1)."""
    spans = []
    for r in ranges:
        if isinstance(r, int) and not isinstance(r, bool):
            start, end = r, r + 1
        else:
            try:
                start, end = r  # type: ignore[misc]
            except (TypeError, ValueError):
                raise TypeError(f"{what}: each entry must be an int or a (start, end) pair, got {r!r}") from None
        _check_int(f"{what} start", start, minimum=0)
        _check_int(f"{what} end", end)
        if end <= start:
            raise ValueError(f"{what}: range ({start}, {end}) is empty; need start < end")
        spans.append((start, end))
    merged: list[list[int]] = []
    for start, end in sorted(spans):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return tuple((s, e) for s, e in merged)


def _keep_columns(ranges: tuple[tuple[int, int], ...], i, j) -> torch.Tensor:
    kept = torch.zeros(torch.broadcast_shapes(i.shape, j.shape), dtype=torch.bool)
    for start, end in ranges:
        kept |= (j >= start) & (j < end)
    return kept


class Columns(Pattern):
    """Vertical stripes: j in any [start, end) of ranges, for every query."""

    __slots__ = ("ranges",)
    family = "columns"

    def __init__(self, ranges: Iterable[int | Sequence[int]]):
        ranges = _canonical_ranges(ranges, "Columns")
        if not ranges:
            raise ValueError("Columns needs at least one range")
        self._init(ranges=ranges)

    def _key(self) -> tuple:
        return self.ranges

    def keep(self, i, j, Sq, Sk):
        return _keep_columns(self.ranges, i, j)

    def to_dict(self) -> dict:
        return {"type": "Columns", "ranges": [list(r) for r in self.ranges]}

    def __repr__(self) -> str:
        return f"Columns({[tuple(r) for r in self.ranges]})"


class AShape(Pattern):
    """Attention sink plus local window: Columns([(0, sink)]) | Window(window, 0)."""

    __slots__ = ("sink", "window")
    family = "a_shape"

    def __init__(self, sink: int, window: int):
        self._init(sink=_check_int("AShape sink", sink, minimum=0),
                   window=_check_int("AShape window", window, minimum=0))

    def _key(self) -> tuple:
        return (self.sink, self.window)

    def keep(self, i, j, Sq, Sk):
        return (j < self.sink) | ((j >= i - self.window) & (j <= i))

    def to_dict(self) -> dict:
        return {"type": "AShape", "sink": self.sink, "window": self.window}

    def __repr__(self) -> str:
        return f"AShape(sink={self.sink}, window={self.window})"


class VerticalSlash(Pattern):
    """MInference's vertical-slash: Columns(columns) | MultiDiagonal(offsets, 0)."""

    __slots__ = ("columns", "offsets")
    family = "vertical_slash"

    def __init__(self, columns: Iterable[int | Sequence[int]], offsets: Iterable[int]):
        columns = _canonical_ranges(columns, "VerticalSlash columns")
        offsets = tuple(sorted({_check_int("VerticalSlash offset", o) for o in offsets}))
        if not columns and not offsets:
            raise ValueError("VerticalSlash needs at least one column or one offset")
        self._init(columns=columns, offsets=offsets)

    def _key(self) -> tuple:
        return (self.columns, self.offsets)

    def keep(self, i, j, Sq, Sk):
        kept = _keep_columns(self.columns, i, j)
        for o in self.offsets:
            kept = kept | (j == i + o)
        return kept

    def to_dict(self) -> dict:
        return {"type": "VerticalSlash", "columns": [list(r) for r in self.columns],
                "offsets": list(self.offsets)}

    def __repr__(self) -> str:
        return f"VerticalSlash(columns={[tuple(r) for r in self.columns]}, offsets={list(self.offsets)})"


class BlockSparse(Pattern):
    """Block layout: (i, j) is kept when layout[i // bq, j // bk]. The layout must have shape
    (ceil(Sq / bq), ceil(Sk / bk)) for the lengths it is used with.

    Stored as one '0'/'1' string per layout row. Layouts can be large (256 x 512 at S = 16K) and
    tuning builds thousands and keys dicts by them, so the rows are read from the tensor's bytes
    in one pass and the hash is computed once, at construction (the value is immutable; it goes
    into the hash cache every Pattern has).
    `from_trusted_layout` is the internal fast path for layouts sparsec built itself."""

    __slots__ = ("rows", "block")
    family = "block_sparse"

    def __init__(self, layout: Any, block: int | Sequence[int]):
        if isinstance(block, int) and not isinstance(block, bool):
            block = (block, block)
        try:
            bq, bk = block  # type: ignore[misc]
        except (TypeError, ValueError):
            raise TypeError(f"BlockSparse block must be an int or a (bq, bk) pair, got {block!r}") from None
        _check_int("BlockSparse bq", bq, minimum=1)
        _check_int("BlockSparse bk", bk, minimum=1)
        self._set(_layout_rows(_layout_tensor(layout)), (bq, bk))

    @classmethod
    def from_trusted_layout(cls, layout: torch.Tensor | np.ndarray, block: tuple[int, int]) -> BlockSparse:
        """BlockSparse(layout, block) without checking the arguments: the same value (equal, same
        hash, same JSON), for layouts sparsec computed itself (candidate fitting, cost models).

        The caller guarantees that `layout` is a non-empty 2-D bool array on the host, a CPU
        torch.bool tensor or a numpy bool array (any strides), and `block` a pair of ints >= 1.
        Nothing else is checked, so user input must go through the constructor, which names what
        is wrong with it."""
        pattern = object.__new__(cls)
        pattern._set(_layout_rows(layout), (int(block[0]), int(block[1])))
        return pattern

    def _set(self, rows: tuple[str, ...], block: tuple[int, int]) -> None:
        self._init(rows=rows, block=block)
        hash(self)  # computed now, into Pattern's hash cache: tuning keys dicts by these at once

    @property
    def layout(self) -> torch.Tensor:
        """The block layout as a (rows, cols) bool tensor (read from the row strings in one pass)."""
        rows, cols = self.layout_shape
        text = bytearray("".join(self.rows), "ascii")
        return torch.frombuffer(text, dtype=torch.uint8).view(rows, cols) == ord("1")

    @property
    def layout_shape(self) -> tuple[int, int]:
        return (len(self.rows), len(self.rows[0]))

    def check_lengths(self, Sq: int, Sk: int) -> None:
        bq, bk = self.block
        want = (math.ceil(Sq / bq), math.ceil(Sk / bk))
        if self.layout_shape != want:
            raise ValueError(
                f"BlockSparse layout has shape {self.layout_shape}, but Sq={Sq}, Sk={Sk} with "
                f"block={self.block} need {want}")

    def _key(self) -> tuple:
        return (self.rows, self.block)

    def keep(self, i, j, Sq, Sk):
        self.check_lengths(Sq, Sk)
        bq, bk = self.block
        return self.layout[i // bq, j // bk]

    def to_dict(self) -> dict:
        return {"type": "BlockSparse", "layout": list(self.rows), "block": list(self.block)}

    def __repr__(self) -> str:
        r, c = self.layout_shape
        kept = sum(row.count("1") for row in self.rows)
        return f"BlockSparse(layout=<{r}x{c}, {kept} kept>, block={self.block})"


def _layout_tensor(layout: Any) -> torch.Tensor:
    if isinstance(layout, (list, tuple)) and layout and isinstance(layout[0], str):
        if any(set(row) - {"0", "1"} for row in layout):
            raise ValueError("BlockSparse layout rows given as strings may only hold '0' and '1'")
        layout = [[c == "1" for c in row] for row in layout]
    try:
        t = torch.as_tensor(layout)
    except (TypeError, ValueError, RuntimeError) as e:
        raise TypeError(f"BlockSparse layout must be a 2-D bool tensor or nested lists: {e}") from None
    if t.dim() != 2 or t.shape[0] == 0 or t.shape[1] == 0:
        raise ValueError(f"BlockSparse layout must be a non-empty 2-D tensor, got shape {tuple(t.shape)}")
    if t.dtype != torch.bool:
        if t.is_floating_point() or not bool(((t == 0) | (t == 1)).all()):
            raise ValueError("BlockSparse layout must be boolean (or 0/1 integers)")
        t = t.bool()
    return t.cpu()


def _layout_rows(layout: torch.Tensor | np.ndarray) -> tuple[str, ...]:
    """The rows of a 2-D bool array on the host (CPU tensor or numpy) as '0'/'1' strings, from its
    bytes in one pass (cell by cell in Python takes ~10 ms at 256 x 512)."""
    cols = layout.shape[1]
    text = (np.asarray(layout).view(np.uint8) + _ZERO).tobytes().decode("ascii")
    return tuple([text[start:start + cols] for start in range(0, len(text), cols)])


class Union(Pattern):
    """The union of several masks (written p1 | p2)."""

    __slots__ = ("parts",)
    family = "union"

    def __init__(self, parts: Iterable[Pattern]):
        flat: set[Pattern] = set()
        for p in parts:
            if not isinstance(p, Pattern):
                raise TypeError(f"Union parts must be Patterns, got {type(p).__name__}")
            if isinstance(p, Skip):
                raise ValueError("Skip is not a mask and cannot be part of a union")
            flat.update(p.parts if isinstance(p, Union) else (p,))
        if len(flat) < 2:
            raise ValueError("a Union needs at least two distinct patterns")
        self._init(parts=tuple(sorted(flat, key=lambda p: (type(p).__name__, repr(p._key())))))

    def _key(self) -> tuple:
        return self.parts

    def keep(self, i, j, Sq, Sk):
        kept = self.parts[0].keep(i, j, Sq, Sk)
        for p in self.parts[1:]:
            kept = kept | p.keep(i, j, Sq, Sk)
        return kept

    def to_dict(self) -> dict:
        return {"type": "Union", "parts": [p.to_dict() for p in self.parts]}

    def __repr__(self) -> str:
        return " | ".join(repr(p) for p in self.parts)


def union_of(parts: Iterable[Pattern]) -> Pattern:
    """The union of `parts` (Unions among them flattened): the pattern itself where they are all
    one pattern, else a Union (which refuses Skip)."""
    distinct: dict[Pattern, None] = {}
    for p in parts:
        distinct.update(dict.fromkeys(p.parts if isinstance(p, Union) else (p,)))
    return next(iter(distinct)) if len(distinct) == 1 else Union(distinct)


_BY_NAME: dict[str, type[Pattern]] = {
    cls.__name__: cls
    for cls in (Dense, Skip, Window, MultiDiagonal, Columns, AShape, VerticalSlash, BlockSparse, Union)
}


def from_dict(d: dict) -> Pattern:
    """Inverse of `Pattern.to_dict()`."""
    if not isinstance(d, dict) or not isinstance(d.get("type"), str):
        raise ValueError(f"a pattern must be a dict with a 'type' key naming its class, got {d!r}")
    cls = _BY_NAME.get(d["type"])
    if cls is None:
        raise ValueError(f"unknown pattern type {d['type']!r}; known: {sorted(_BY_NAME)}")
    args = {k: v for k, v in d.items() if k != "type"}
    fields = {Union: {"parts"}, BlockSparse: {"layout", "block"}}.get(cls)
    if fields is not None and set(args) - fields:
        raise ValueError(f"bad fields for pattern {d['type']}: unknown {sorted(set(args) - fields)} "
                         f"(it takes {sorted(fields)})")
    try:
        if cls is Union:
            return Union([from_dict(p) for p in args["parts"]])
        if cls is BlockSparse:
            block = args["block"]
            return BlockSparse(args["layout"], block if isinstance(block, int) else tuple(block))
        return cls(**args)
    except KeyError as e:
        raise ValueError(f"pattern {d['type']} is missing field {e}") from None
    except TypeError as e:
        raise ValueError(f"bad fields for pattern {d['type']}: {e}") from None


def from_json(text: str) -> Pattern:
    """Inverse of `Pattern.to_json()`."""
    return from_dict(json.loads(text))


def normalize_head_patterns(patterns: Pattern | Sequence[Pattern], num_heads: int) -> tuple[Pattern, ...]:
    """One Pattern for every head, from a single Pattern or a sequence of `num_heads` Patterns."""
    if isinstance(patterns, Pattern):
        return (patterns,) * num_heads
    if isinstance(patterns, (str, bytes)) or not isinstance(patterns, Sequence):
        raise TypeError(f"patterns must be a Pattern or a sequence of Patterns, got {type(patterns).__name__}")
    patterns = tuple(patterns)
    if len(patterns) != num_heads:
        raise ValueError(f"got {len(patterns)} patterns for {num_heads} query heads; need one per head")
    for h, p in enumerate(patterns):
        if not isinstance(p, Pattern):
            raise TypeError(f"patterns[{h}] is {type(p).__name__}, not a Pattern")
    return patterns
