"""`sparsec.prune`: magnitude pruning of nn.Linear weights to a structure sparsec can exploit.

    sparsec.prune(model, "2:4")                              # N:M along the input dimension
    sparsec.prune(model, {"block": (64, 64), "density": 0.3})  # keep 30% of the 64x64 blocks
    sparsec.prune(model, {"density": 0.2})                   # keep the largest 20% of the weights
    sparsec.prune(model, "2:4", filter=lambda name, m: "mlp" in name)

The model is changed in place (and returned): each selected weight is multiplied by a 0/1 mask
under no_grad, which bumps the weight's `_version`, so kernels specialised to the old weight see
the change (codegen/weight_guard.py). What is kept is chosen by magnitude: the N largest |w| of
every M consecutive inputs, the blocks of largest L2 norm, or the largest |w| of the whole matrix.
"""
from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["BlockSpec", "NMSpec", "UnstructuredSpec", "PruneSpec", "parse_spec", "prune", "prune_mask"]

log = logging.getLogger(__name__)

_NM_STRING = re.compile(r"\s*(\d+)\s*:\s*(\d+)\s*")


@dataclass(frozen=True, slots=True)
class NMSpec:
    """Keep the n largest-magnitude weights of every m consecutive inputs."""

    n: int
    m: int


@dataclass(frozen=True, slots=True)
class BlockSpec:
    """Keep the fraction `density` of the (rows, cols) blocks with the largest L2 norm."""

    block: tuple[int, int]
    density: float


@dataclass(frozen=True, slots=True)
class UnstructuredSpec:
    """Keep the fraction `density` of the weights with the largest magnitude."""

    density: float


PruneSpec = NMSpec | BlockSpec | UnstructuredSpec


def parse_spec(spec: str | Mapping | PruneSpec) -> PruneSpec:
    """The PruneSpec a user spec names: "N:M", {"block": b, "density": d} or {"density": d}."""
    if isinstance(spec, (NMSpec, BlockSpec, UnstructuredSpec)):
        return _checked(spec)
    if isinstance(spec, str):
        return _parse_nm(spec)
    if isinstance(spec, Mapping):
        return _parse_mapping(spec)
    raise TypeError(f"sparsec.prune: spec must be an 'N:M' string or a dict, got {type(spec).__name__} {spec!r}")


def _parse_nm(text: str) -> NMSpec:
    match = _NM_STRING.fullmatch(text)
    if match is None:
        raise ValueError(f"sparsec.prune: spec {text!r} is not of the form 'N:M' (e.g. '2:4')")
    return _checked(NMSpec(int(match[1]), int(match[2])))


def _parse_mapping(spec: Mapping) -> PruneSpec:
    unknown = set(spec) - {"block", "density"}
    if unknown:
        raise ValueError(f"sparsec.prune: unknown spec keys {sorted(map(str, unknown))}; "
                         "use {'block': (rows, cols) or int, 'density': d} or {'density': d}")
    if "density" not in spec:
        raise ValueError(f"sparsec.prune: spec {dict(spec)!r} needs a 'density' (the kept fraction, in (0, 1])")
    if "block" not in spec:
        return _checked(UnstructuredSpec(spec["density"]))
    block = spec["block"]
    if isinstance(block, int) and not isinstance(block, bool):
        block = (block, block)
    if not isinstance(block, (tuple, list)) or len(block) != 2:
        raise ValueError(f"sparsec.prune: block must be an int or a (rows, cols) pair, got {block!r}")
    return _checked(BlockSpec(tuple(block), spec["density"]))


def _checked(spec: PruneSpec) -> PruneSpec:
    if isinstance(spec, NMSpec):
        if not (_positive_int(spec.n) and _positive_int(spec.m) and spec.n < spec.m):
            raise ValueError(f"sparsec.prune: N:M needs integers 0 < N < M, got {spec.n}:{spec.m}")
        return spec
    density = spec.density
    if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0.0 < density <= 1.0:
        raise ValueError(f"sparsec.prune: density must be a number in (0, 1], got {density!r}")
    if isinstance(spec, BlockSpec) and not all(_positive_int(b) for b in spec.block):
        raise ValueError(f"sparsec.prune: block sizes must be positive ints, got {spec.block!r}")
    return spec


def _positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


# -- masks ---------------------------------------------------------------------------------------


def prune_mask(weight: torch.Tensor, spec: str | Mapping | PruneSpec) -> torch.Tensor:
    """The bool keep-mask of a 2-D weight (out_features, in_features) under `spec`."""
    spec = parse_spec(spec)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise ValueError(f"sparsec.prune: needs a 2-D weight (out_features, in_features), got {shape}")
    magnitude = weight.detach().abs().float()
    if isinstance(spec, NMSpec):
        return _nm_mask(magnitude, spec)
    if isinstance(spec, BlockSpec):
        return _block_mask(magnitude, spec)
    return _top_fraction(magnitude.flatten(), spec.density).view_as(magnitude)


def _nm_mask(magnitude: torch.Tensor, spec: NMSpec) -> torch.Tensor:
    rows, cols = magnitude.shape
    if cols % spec.m:
        raise ValueError(f"sparsec.prune: {spec.n}:{spec.m} needs in_features divisible by {spec.m}, "
                         f"got weight shape {(rows, cols)}")
    groups = magnitude.view(rows, cols // spec.m, spec.m)
    kept = groups.topk(spec.n, dim=-1).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, kept, True)
    return mask.view(rows, cols)


def _block_mask(magnitude: torch.Tensor, spec: BlockSpec) -> torch.Tensor:
    rows, cols = magnitude.shape
    (bo, bi) = spec.block
    if rows % bo or cols % bi:
        raise ValueError(f"sparsec.prune: block {spec.block} does not divide weight shape {(rows, cols)}")
    # Block score: the L2 norm of the block, so one large weight does not keep a block alive alone.
    scores = magnitude.square().view(rows // bo, bo, cols // bi, bi).sum(dim=(1, 3))
    kept_blocks = _top_fraction(scores.flatten(), spec.density).view_as(scores)
    return kept_blocks.repeat_interleave(bo, dim=0).repeat_interleave(bi, dim=1)


def _top_fraction(scores: torch.Tensor, density: float) -> torch.Tensor:
    """Bool mask keeping the round(density * n) largest scores (at least one)."""
    keep = max(1, round(density * scores.numel()))
    mask = torch.zeros_like(scores, dtype=torch.bool)
    mask[scores.topk(keep).indices] = True
    return mask


# -- the model -----------------------------------------------------------------------------------


def prune(
    model: nn.Module,
    spec: str | Mapping | PruneSpec,
    filter: Callable[[str, nn.Module], bool] | None = None,
) -> nn.Module:
    """Magnitude-prune, in place, the weight of every nn.Linear that `filter(name, module)` selects
    (all of them by default) to `spec`; returns `model`. Raises before changing anything if a
    selected layer's shape does not fit the spec."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"sparsec.prune: model must be an nn.Module, got {type(model).__name__}")
    spec = parse_spec(spec)
    selected = [(name, m) for name, m in model.named_modules()
                if isinstance(m, nn.Linear) and (filter is None or filter(name, m))]
    if not selected:
        log.warning("sparsec.prune: no nn.Linear selected in %s; nothing pruned", type(model).__name__)
    for name, m in selected:
        if m.weight.is_meta:
            raise ValueError(f"sparsec.prune: layer {name or '<root>'!r} has its weight on the meta device: no values "
                             "to prune by magnitude (load the weights first)")
    selected = [(name, m) for name, m in selected if m.weight.numel()]  # an empty layer: nothing to prune
    masks = [_layer_mask(name, m, spec) for name, m in selected]  # all checks before any change
    with torch.no_grad():
        for (name, module), mask in zip(selected, masks):
            module.weight.mul_(mask)
            log.info("sparsec.prune: %s %s kept %.1f%% of the weights", name or "<root>",
                     tuple(module.weight.shape), 100.0 * mask.float().mean().item())
    return model


def _layer_mask(name: str, module: nn.Linear, spec: PruneSpec) -> torch.Tensor:
    try:
        return prune_mask(module.weight, spec)
    except ValueError as e:
        raise ValueError(f"{e} (layer {name or '<root>'!r})") from None
