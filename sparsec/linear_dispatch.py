"""The body of sparsec::linear: run the kernel a compiled layer chose, on a guarded packed weight.

    linear(x, weight, bias, kernel="bsr64x64", min_tokens=0, max_tokens=None, site="fc1#3")

`kernel` is the IR Linear op's choice (passes/choose_linear_kernels.py): "dense", "bsrRxC",
"nmN:M", "semi2:4" or "unstructured". A sparse kernel runs when the call's token count (x's leading dims) is in
[min_tokens, max_tokens]; the weight is packed on the first such call and kept per kernel and
executor in a PackedWeight (codegen/weight_guard.py), which compares the weight's (data_ptr,
_version) on every call: an in-place change re-packs, and a weight that lost its structure (a
group over n nonzeros for N:M, no zero block left for BSR) runs the dense GEMM until it changes
again. Never a stale pack.

Packs are held weakly by their weight tensor: an entry goes when the tensor it was packed from is
freed (the model deleted and its compiled graphs released), never earlier. Compiled Linear ops
(`site`s, named in logs) that share a weight, such as the graphs of a recompiled model, share its
pack instead of each packing it again.

Executors (one place decides, `_executor`):
  - CUDA tensors: the Triton kernels (codegen/linear_triton.py); "semi2:4": torch's
    semi-structured 2:4 kernels.
  - CPU tensors: the CPU executors (codegen/linear_cpu.py); "semi2:4" has none: dense.
  - "unstructured" runs only on the CPU executor (its native kernels, float32 or bfloat16): elsewhere
    dense.
  - SPARSEC_LINEAR_BACKEND=triton forces the Triton kernels (on CPU tensors that needs
    TRITON_INTERPRET=1; that is how the tests run them), =cpu the CPU executors, =auto (default)
    decides by device.
Anything an executor cannot run (dtype or device mismatch, Triton limits) runs the dense GEMM,
with a debug log line. `kernel_calls` counts what ran, by executor name ("bsr_linear_cpu",
"nm_linear_triton", "semi_structured_linear", "dense"): tests read it.
"""
from __future__ import annotations

import itertools
import logging
import math
import os
from collections import Counter
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.utils.weak import WeakIdKeyDictionary

from sparsec.codegen.weight_guard import PackedWeight
from sparsec.ir.ops import linear_kernel_format

__all__ = ["BACKENDS", "kernel_calls", "linear", "new_site", "packed_weight_count", "packed_weights"]

log = logging.getLogger(__name__)

BACKENDS = ("auto", "triton", "cpu")
_BACKEND_ENV = "SPARSEC_LINEAR_BACKEND"

kernel_calls: Counter[str] = Counter()
# weight tensor -> {(kernel, executor): PackedWeight}. Keyed by the tensor object, weakly: the
# values hold copies of the weight, never the tensor itself, or no entry would ever be freed.
_packed: WeakIdKeyDictionary = WeakIdKeyDictionary()
_site_numbers = itertools.count()


def new_site(label: str) -> str:
    """A process-unique site name for one compiled Linear op (log lines name it)."""
    return f"{label}#{next(_site_numbers)}"


def packed_weights(weight: torch.Tensor) -> dict[tuple[str, str], PackedWeight]:
    """(kernel, executor) -> the PackedWeight kept for `weight` (tests and logs read `.packs`)."""
    return dict(_packed.get(weight, {}))


def packed_weight_count() -> int:
    """How many weight tensors have packs alive now."""
    return len(_packed)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, kernel: str = "dense",
           min_tokens: int = 0, max_tokens: int | None = None, site: str = "") -> torch.Tensor:
    """x @ weight.T + bias, by `kernel` where the token count is in range, else dense."""
    if kernel != "dense" and _in_range(x, min_tokens, max_tokens):
        y = _sparse(x, weight, bias, kernel, site)
        if y is not None:
            return y
    kernel_calls["dense"] += 1
    return F.linear(x, weight, bias)


def _in_range(x: torch.Tensor, min_tokens: int, max_tokens: int | None) -> bool:
    tokens = math.prod(x.shape[:-1])
    return min_tokens <= tokens and (max_tokens is None or tokens <= max_tokens)


# -- executors ---------------------------------------------------------------------------------


def _backend() -> str:
    backend = os.environ.get(_BACKEND_ENV, "auto") or "auto"
    if backend not in BACKENDS:
        raise ValueError(f"{_BACKEND_ENV}={backend!r} is not one of {BACKENDS}")
    return backend


def _executor(kind: str, x: torch.Tensor) -> str | None:
    """"triton", "cpu", "semi" or None (no executor for this kernel and device)."""
    if kind == "semi":
        return "semi" if x.is_cuda else None
    backend = _backend()
    if kind == "unstructured":
        return "cpu" if x.device.type == "cpu" and backend != "triton" else None
    if backend == "auto":
        return "triton" if x.is_cuda else "cpu"
    if backend == "cpu" and x.device.type != "cpu":
        return None
    return backend


def _mismatch(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> str | None:
    if x.dtype != weight.dtype or (bias is not None and bias.dtype != x.dtype):
        return f"dtypes differ (x {x.dtype}, weight {weight.dtype})"
    if x.device != weight.device or (bias is not None and bias.device != x.device):
        return f"devices differ (x {x.device}, weight {weight.device})"
    return None


def _sparse(x, weight, bias, kernel: str, site: str) -> torch.Tensor | None:
    kind, params = linear_kernel_format(kernel)
    executor = _executor(kind, x)
    reason = _mismatch(x, weight, bias) or (None if executor else f"no {kernel} executor for {x.device}")
    if reason is not None:
        log.debug("sparsec linear %s: %s; dense", site, reason)
        return None
    packs = _packed.setdefault(weight, {})
    if (kernel, executor) not in packs:
        packs[kernel, executor] = PackedWeight(_packer(kind, params, executor), name=f"weight of {site} ({kernel})")
    packed = packs[kernel, executor].get(weight)
    if packed is None:
        return None
    run, name = _runner(kind, executor)
    if executor == "triton":
        from sparsec.codegen.linear_triton import supports

        reason = supports(x, packed, bias)
        if reason is not None:
            log.debug("sparsec linear %s: the Triton kernel cannot run this call (%s); dense", site, reason)
            return None
    kernel_calls[name] += 1
    return run(x, packed, bias)


def _structured_bsr(weight: torch.Tensor, block: tuple[int, int]):
    from sparsec.codegen.weight_packing import pack_bsr

    bsr = pack_bsr(weight, block)
    if bsr.density >= 1.0:
        raise ValueError(f"no {block[0]}x{block[1]} block of the weight is zero")
    return bsr


def _unstructured(weight: torch.Tensor):
    from sparsec.codegen import linear_cpu_native

    if weight.dtype not in linear_cpu_native.VALUE_DTYPES:
        raise ValueError(f"the native kernels run float32 or bfloat16 weights, this one is {weight.dtype}")
    if not linear_cpu_native.native_linear_available():
        raise ValueError(f"the native kernels are unavailable ({linear_cpu_native.native_status()})")
    if bool((weight != 0).all()):
        raise ValueError("no element of the weight is zero")
    return linear_cpu_native.pack_sparse_rows(weight)


def _packer(kind: str, params: tuple[int, ...], executor: str) -> Callable:
    from sparsec.codegen import linear_cpu, weight_packing

    if kind == "bsr" and executor == "cpu":
        return lambda w: linear_cpu.pack_block_rows(_structured_bsr(w, params))
    if kind == "bsr":
        return lambda w: _structured_bsr(w, params)
    if kind == "nm" and executor == "cpu":
        return lambda w: linear_cpu.pack_nm_rows(weight_packing.pack_nm(w, params[0], params[1]))
    if kind == "nm":
        return lambda w: weight_packing.pack_nm(w, params[0], params[1])
    if kind == "unstructured":
        return _unstructured
    return weight_packing.pack_semi_structured


def _runner(kind: str, executor: str) -> tuple[Callable, str]:
    from sparsec.codegen import linear_cpu, linear_triton

    if executor == "semi":
        return linear_triton.semi_structured_linear, "semi_structured_linear"
    module = linear_cpu if executor == "cpu" else linear_triton
    name = f"{kind}_linear_{executor}"
    return getattr(module, name), name
