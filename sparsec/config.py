"""The backend's options, parsed strictly into one frozen `SparsecConfig`.

    torch.compile(model, backend="sparsec", options={
        "inner": "inductor" | "eager",      # what runs the rewritten graph (default "inductor")
        "dump_dir": "dumps/",               # default: env SPARSEC_DUMP_DIR (unset: no dumps)
        "verify": True,                     # verify the IR after every pass (default: env SPARSEC_VERIFY=1)
        "attention_patterns": {             # module path or fnmatch glob -> Pattern, or one per query head
            "blocks.*.attn": P.Window(64, 0),
        },
        "fallback": "inductor" | "raise",   # on an internal failure: compile the original graph, or re-raise
        "plan": plan or "plan.json",        # a sparsec.Plan (or its file): per-layer patterns and tiles
        "tune": {"budget": 0.02},           # tune on the first call (keys of sparsec.tune: target, budget)
        "target": "auto" | "h100" | ...,    # hardware the cost model prices (auto: this device)
        "weight_sparsity": "auto" | "off" | "always",  # sparse linear kernels where the cost model
                                            # says they win / never / wherever a weight has structure
        "rewrite_dense": False,             # True: dense attention and linear layers run through
                                            # sparsec's ops too (default: they stay the model's own ops)
        "mask_bands": "auto" | "on" | "off",  # layers whose mask is a sliding window (Mistral, Gemma)
                                            # run it as a band pattern; auto: where the target is the CPU
    })

An unknown key or a bad value raises at once (ValueError / TypeError naming the key and what is
allowed); nothing is silently ignored. `attention_patterns` keys are tried in the order given,
exact paths before globs, so a specific entry can override a broad glob. `attention_patterns`
overrides `plan` for the layers it names; `plan` and `tune` exclude each other.

What sparsec does not accelerate stays the model's own op: an SDPA call left dense and a linear
layer left on the dense kernel keep their original nodes, so Inductor compiles them exactly as it
would without sparsec (hand-written attention, matmul-softmax-matmul, is still replaced by the
fused op: that is an acceleration). `rewrite_dense=True` routes every matched layer through
sparsec's ops; sparsec.tune's recorder uses it to see every attention layer's operands.
"""
from __future__ import annotations

import fnmatch
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from sparsec.patterns import Pattern

__all__ = ["SparsecConfig", "SparsecUserError", "parse_options", "HeadPatterns"]

INNER_CHOICES = ("inductor", "eager")
WEIGHT_SPARSITY_CHOICES = ("auto", "off", "always")
MASK_BANDS_CHOICES = ("auto", "on", "off")
TUNE_KEYS = ("target", "budget")
FALLBACK_CHOICES = ("inductor", "raise")
DUMP_DIR_ENV = "SPARSEC_DUMP_DIR"
VERIFY_ENV = "SPARSEC_VERIFY"

# A Pattern for every head, or one Pattern per query head.
HeadPatterns = Pattern | tuple[Pattern, ...]


@dataclass(frozen=True)
class SparsecConfig:
    """Every option of the sparsec backend; build it with `parse_options`."""

    inner: str = "inductor"
    dump_dir: str | None = None
    verify: bool = False
    attention_patterns: tuple[tuple[str, HeadPatterns], ...] = field(default=())
    fallback: str = "inductor"
    plan: Any = None                    # sparsec.Plan or None
    tune: tuple[tuple[str, Any], ...] | None = None   # sparsec.tune keyword arguments, or None
    target: str = "auto"
    weight_sparsity: str = "auto"
    rewrite_dense: bool = False
    mask_bands: str = "auto"

    def __post_init__(self):
        if self.plan is not None and self.tune is not None:
            raise ValueError("sparsec options 'plan' and 'tune' exclude each other: "
                             "give a plan, or ask sparsec to tune one")

    def hardware(self):
        """The HardwareProfile the cost model prices choices on: `target`, or this machine's."""
        from sparsec.cost_models.hardware import get_profile, profile_for_device
        import torch

        if self.target != "auto":
            return get_profile(self.target)
        return profile_for_device("cuda" if torch.cuda.is_available() else "cpu")

    def patterns_for(self, module_path: str) -> HeadPatterns | None:
        """The patterns the user gave for the attention layer at `module_path`, if any."""
        for key, patterns in self.attention_patterns:
            if key == module_path:
                return patterns
        for key, patterns in self.attention_patterns:
            if fnmatch.fnmatchcase(module_path, key):
                return patterns
        return None

    def unmatched_pattern_keys(self, module_paths) -> list[str]:
        """The `attention_patterns` keys that name none of `module_paths` (exactly or as a glob)."""
        return [key for key, _ in self.attention_patterns
                if not any(key == path or fnmatch.fnmatchcase(path, key) for path in module_paths)]


def _parse_choice(key: str, value: Any, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"sparsec option {key!r} must be one of {choices}, got {value!r}")
    return value


def _parse_dump_dir(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, (str, os.PathLike)):
        raise TypeError(f"sparsec option 'dump_dir' must be a path (str), got {type(value).__name__} {value!r}")
    return os.fspath(value) or None


def _parse_flag(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"sparsec option {key!r} must be True or False, got {value!r}")
    return value


def _parse_head_patterns(key: str, value: Any) -> HeadPatterns:
    where = f"sparsec option 'attention_patterns'[{key!r}]"
    if isinstance(value, Pattern):
        return value
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise TypeError(f"{where} must be a Pattern or a list of one Pattern per query head, "
                        f"got {type(value).__name__}")
    if not value:
        raise ValueError(f"{where} is an empty list; give one Pattern per query head")
    for h, p in enumerate(value):
        if not isinstance(p, Pattern):
            raise TypeError(f"{where}[{h}] is {type(p).__name__}, not a sparsec Pattern")
    return tuple(value)


def _parse_attention_patterns(value: Any) -> tuple[tuple[str, HeadPatterns], ...]:
    if not isinstance(value, Mapping):
        raise TypeError("sparsec option 'attention_patterns' must be a dict mapping a module path "
                        f"or glob (e.g. 'blocks.*.attn') to patterns, got {type(value).__name__}")
    parsed = []
    for key, patterns in value.items():
        if not isinstance(key, str) or not key:
            raise TypeError(f"sparsec option 'attention_patterns' keys must be non-empty module paths, got {key!r}")
        parsed.append((key, _parse_head_patterns(key, patterns)))
    return tuple(parsed)


def _parse_plan(value: Any):
    from sparsec.plan import Plan

    if isinstance(value, Plan):
        return value
    if isinstance(value, (str, os.PathLike)):
        try:
            return Plan.load(value)
        except ValueError as e:
            raise ValueError(f"sparsec option 'plan': {e}") from None
    raise TypeError(f"sparsec option 'plan' must be a sparsec.Plan or the path of a saved plan, got {type(value).__name__}")


def _parse_tune(value: Any) -> tuple[tuple[str, Any], ...]:
    if value is True:
        value = {}
    if not isinstance(value, Mapping):
        raise TypeError(f"sparsec option 'tune' must be True or a dict with keys {TUNE_KEYS}, got {type(value).__name__}")
    unknown = sorted(str(k) for k in value if k not in TUNE_KEYS)
    if unknown:
        raise ValueError(f"unknown key(s) {', '.join(map(repr, unknown))} in sparsec option 'tune'; known: {', '.join(TUNE_KEYS)}")
    if "target" in value:
        _parse_target(value["target"])
    budget = value.get("budget", 0.02)
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not budget >= 0:
        raise ValueError(f"sparsec option 'tune': budget must be a non-negative number, got {budget!r}")
    return tuple(sorted(value.items()))


def _parse_target(value: Any) -> str:
    from sparsec.cost_models.hardware import get_profile

    if not isinstance(value, str):
        raise TypeError(f"sparsec option 'target' must be a hardware name (str), got {type(value).__name__}")
    if value != "auto":
        try:
            get_profile(value, calibrated=False)
        except ValueError as e:
            raise ValueError(f"sparsec option 'target': {e}") from None
    return value


_PARSERS = {
    "inner": lambda v: _parse_choice("inner", v, INNER_CHOICES),
    "dump_dir": _parse_dump_dir,
    "verify": lambda v: _parse_flag("verify", v),
    "attention_patterns": _parse_attention_patterns,
    "fallback": lambda v: _parse_choice("fallback", v, FALLBACK_CHOICES),
    "plan": _parse_plan,
    "tune": _parse_tune,
    "target": _parse_target,
    "weight_sparsity": lambda v: _parse_choice("weight_sparsity", v, WEIGHT_SPARSITY_CHOICES),
    "rewrite_dense": lambda v: _parse_flag("rewrite_dense", v),
    "mask_bands": lambda v: _parse_choice("mask_bands", v, MASK_BANDS_CHOICES),
}


def _defaults_from_env() -> dict[str, Any]:
    return {
        "dump_dir": os.environ.get(DUMP_DIR_ENV) or None,
        "verify": os.environ.get(VERIFY_ENV, "") == "1",
    }


def parse_options(options: Mapping[str, Any] | SparsecConfig | None = None) -> SparsecConfig:
    """The config for `options` (torch.compile's options dict); env vars give some defaults."""
    if isinstance(options, SparsecConfig):
        return options
    if options is None:
        options = {}
    if not isinstance(options, Mapping):
        raise TypeError(f"sparsec options must be a dict, got {type(options).__name__}")
    unknown = sorted(str(k) for k in options if k not in _PARSERS)
    if unknown:
        raise ValueError(f"unknown sparsec option(s) {', '.join(map(repr, unknown))}; "
                         f"known options: {', '.join(_PARSERS)}")
    values = _defaults_from_env()
    values.update({key: _PARSERS[key](value) for key, value in options.items()})
    return SparsecConfig(**values)  # checks what no single option can (plan and tune together)


class SparsecUserError(ValueError):
    """The user's input (options, patterns) does not fit the model: raised, never a fallback."""
