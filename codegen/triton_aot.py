"""Compile sparsec's Triton kernels ahead of time for a GPU that is not here.

The CPU tests run the kernels through Triton's interpreter: that checks what they compute, not
that Triton's GPU compiler accepts them, nor what they cost a GPU (shared memory, registers,
spills, which matrix instructions, whether loads are pipelined). `compile_call` takes the exact
launch an entry point would make (a KernelCall from attention_triton.kernel_call or
linear_triton.bsr_kernel_call / nm_kernel_call, built from CPU tensors of the real shapes) and
compiles it with Triton's own pipeline and ptxas for a named target, the way Triton's JIT would on
that GPU: same arguments, same specialization (integers equal to 1, 16-byte alignment), same
num_warps and num_stages. No driver or device is needed: Triton's active driver is replaced, for
the compile only, by one that names the target.

The compile runs in a child Python process without TRITON_INTERPRET: in a process that imported
Triton interpreted (the test suite), its own library functions (tl.max, tl.sum, ...) are
interpreter objects that the compiler refuses. Tensors travel to the child as (dtype, shape,
strides, 16-byte alignment) and are re-created there uninitialized: compiling reads no values.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import importlib.util
import os
import pickle
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sparsec.codegen.kernel_call import KernelCall

__all__ = ["ARCHITECTURES", "AOTCompileError", "CompileReport", "compile_call", "compile_calls", "target_arch"]

# Compute capability -> the most shared memory one block may use (opt-in maximum), bytes.
ARCHITECTURES = {80: 166912, 86: 101376, 89: 101376, 90: 232448}
_PROFILE_ARCH = {"a100": 80, "h100": 90, "h200": 90}
_WORKER = "from sparsec.codegen.triton_aot import _worker; _worker()"
_BUFFERS = re.compile(r"!ttg\.memdesc<(\d+)x\d+x\d+x")  # a leading stage dimension on a 2-D tile
_RESOURCES = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")


class AOTCompileError(RuntimeError):
    """Triton's compiler (or ptxas) refused a kernel for the target."""


@dataclass(frozen=True)
class CompileReport:
    """What one kernel launch costs the target GPU, read from its compiled binary."""

    kernel: str
    arch: int
    num_warps: int
    num_stages: int
    shared_bytes: int                # dynamic shared memory the launch needs
    registers: int | None            # per thread; None when cuobjdump is not available
    spill_bytes: int | None          # stack + local memory per thread (register spills)
    mma: str                         # "wgmma", "mma" (mma.sync) or "none" (CUDA-core FMA dots)
    async_loads: bool                # cp.async or TMA copies: loads pipelined ahead of the dots
    seconds: float                   # compile time on this machine
    constexprs: dict = field(default_factory=dict)
    error: str | None = None         # why Triton or ptxas refused the kernel
    pipeline_buffers: tuple[int, ...] = ()  # depths of the multi-buffered shared tiles, e.g. (2, 3)
    async_copies: int = 0            # asynchronous global -> shared copies in the code (prologues included)

    @property
    def shared_limit(self) -> int:
        return ARCHITECTURES[self.arch]

    def problems(self) -> list[str]:
        """Why this launch would fail or run badly on the target (empty when none)."""
        found = [self.error] if self.error else []
        if self.shared_bytes > self.shared_limit:
            found.append(f"needs {self.shared_bytes} B of shared memory, sm_{self.arch} allows {self.shared_limit} B")
        if self.spill_bytes:
            found.append(f"spills {self.spill_bytes} B of registers per thread to local memory")
        return found


def target_arch(target: str | int) -> int:
    """The compute capability (as 90 for sm_90) of a hardware profile name, "sm_90" or 90."""
    if isinstance(target, int) and not isinstance(target, bool):
        arch = target
    elif isinstance(target, str) and target.lower() in _PROFILE_ARCH:
        arch = _PROFILE_ARCH[target.lower()]
    elif isinstance(target, str) and re.fullmatch(r"sm_?\d+a?", target.lower()):
        arch = int(re.sub(r"\D", "", target))
    else:
        raise ValueError(f"unknown GPU target {target!r}: give a profile ({sorted(_PROFILE_ARCH)}) or sm_XX")
    if arch not in ARCHITECTURES:
        raise ValueError(f"GPU target sm_{arch} is not supported; known: {sorted(ARCHITECTURES)}")
    return arch


def compile_call(call: KernelCall, target: str | int = "h100") -> CompileReport:
    """Compile `call` for `target` as Triton's JIT would on that GPU, and read what it costs.
    Raises AOTCompileError when Triton or ptxas refuses it."""
    report = compile_calls([call], target)[0]
    if report.error:
        raise AOTCompileError(report.error)
    return report


def compile_calls(calls: Sequence[KernelCall], target: str | int = "h100", *, workers: int = 1,
                  timeout: float = 3600) -> list[CompileReport]:
    """Compile each call for `target` in child processes (`workers` of them, calls split between
    them in order); a call that fails to compile gives a report whose `error` says why, and the
    others still compile. Reports come back in the calls' order."""
    arch = target_arch(target)
    for call in calls:
        if not isinstance(call, KernelCall):
            raise TypeError(f"compile_calls: expected KernelCalls, got {type(call).__name__}")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"compile_calls: workers must be an int >= 1, got {workers!r}")
    portable = [_portable(call) for call in calls]
    chunks = [portable[i::workers] for i in range(min(workers, len(portable)))]
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, len(chunks))) as pool:
        results = list(pool.map(lambda chunk: _run_child(arch, chunk, timeout), chunks))
    reports: list[CompileReport] = [None] * len(calls)  # type: ignore[list-item]
    for i, chunk in enumerate(results):
        reports[i::len(chunks)] = chunk
    return reports


def _run_child(arch: int, calls: list[KernelCall], timeout: float) -> list[CompileReport]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", _WORKER], input=pickle.dumps((arch, calls)),
                            capture_output=True, env=env, timeout=timeout)
    if result.returncode:
        tail = result.stderr.decode(errors="replace")[-2000:]
        raise AOTCompileError(f"the compile process for sm_{arch} failed (exit {result.returncode}):\n{tail}")
    return [CompileReport(**fields) for fields in pickle.loads(result.stdout)]


# -- the child process ------------------------------------------------------------------------------


@dataclass(frozen=True)
class _TensorSpec:
    dtype: torch.dtype
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    aligned: bool  # data_ptr % 16 == 0, which Triton specializes on

    def make(self) -> torch.Tensor:
        """An uninitialized tensor of this layout (CPU allocations are 64-byte aligned; starting one
        element in breaks 16-byte alignment for every dtype)."""
        size = 1 + sum((n - 1) * st for n, st in zip(self.shape, self.stride)) if all(self.shape) else 0
        start = 0 if self.aligned else 1
        return torch.empty(size + 1, dtype=self.dtype)[start:].as_strided(self.shape, self.stride)


def _portable(call: KernelCall) -> KernelCall:
    def spec(x):
        if isinstance(x, torch.Tensor):
            return _TensorSpec(x.dtype, tuple(x.shape), tuple(x.stride()), x.data_ptr() % 16 == 0)
        return x
    return KernelCall(Path(call.path), call.kernel, tuple(call.grid), tuple(spec(a) for a in call.args),
                      {k: spec(v) for k, v in call.kwargs.items()})


def _worker() -> None:
    """Child process: read (arch, calls) from stdin, compile each, write the reports' fields."""
    arch, calls = pickle.loads(sys.stdin.buffer.read())
    reports = []
    for call in calls:
        args = tuple(a.make() if isinstance(a, _TensorSpec) else a for a in call.args)
        kwargs = {k: v.make() if isinstance(v, _TensorSpec) else v for k, v in call.kwargs.items()}
        reports.append(dataclasses.asdict(_compile_here(dataclasses.replace(call, args=args, kwargs=kwargs), arch)))
    sys.stdout.buffer.write(pickle.dumps(reports))


def _compile_here(call: KernelCall, arch: int) -> CompileReport:
    constexprs = {k: v for k, v in call.kwargs.items() if k not in ("num_warps", "num_stages")}
    start = time.perf_counter()
    try:
        kernel = _compiled_kernel(call.path, call.kernel)
        with _driver_for(arch):
            binary = kernel.run(*call.args, grid=call.grid, warmup=True, **call.kwargs)
    except Exception as e:  # Triton raises many types (CompilationError, RuntimeError from ptxas, ...)
        return CompileReport(kernel=call.kernel, arch=arch, num_warps=call.kwargs.get("num_warps", 0),
                             num_stages=call.kwargs.get("num_stages", 0), shared_bytes=0, registers=None,
                             spill_bytes=None, mma="none", async_loads=False, seconds=time.perf_counter() - start,
                             constexprs=constexprs, error=f"{call.kernel} for sm_{arch}: {_explain(e)}")
    seconds = time.perf_counter() - start
    ptx = binary.asm.get("ptx", "")
    registers, spills = _resource_usage(binary.asm.get("cubin"))
    return CompileReport(
        kernel=call.kernel, arch=arch, num_warps=binary.metadata.num_warps,
        num_stages=binary.metadata.num_stages, shared_bytes=int(binary.metadata.shared),
        registers=registers, spill_bytes=spills, mma=_mma_kind(ptx),
        async_loads=bool(re.search(r"cp\.async", ptx)), seconds=seconds, constexprs=constexprs,
        pipeline_buffers=tuple(sorted({int(n) for n in _BUFFERS.findall(binary.asm.get("ttgir", ""))})),
        async_copies=binary.asm.get("ttgir", "").count("ttg.async_copy_global_to_local"),
    )


def _explain(error: BaseException) -> str:
    """The error and its causes: Triton reports a failure inside an inlined helper at each caller,
    and only the innermost cause says what failed."""
    parts = []
    while error is not None and len(parts) < 8:
        parts.append(f"{type(error).__name__}: {error}")
        error = error.__cause__ or error.__context__
    return "\n-- caused by --\n".join(parts)


def _mma_kind(ptx: str) -> str:
    if "wgmma.mma_async" in ptx:
        return "wgmma"
    if re.search(r"\bmma\.sync", ptx):
        return "mma"
    return "none"


# -- the kernel, compiled, and a driver that names the target ---------------------------------------

_kernels: dict[tuple[Path, str], object] = {}


def _compiled_kernel(path: Path, name: str):
    """`name` from the source file `path`, imported once per process."""
    key = (Path(path), name)
    if key not in _kernels:
        import triton

        module_name = f"sparsec_aot_{Path(path).stem}"
        spec = importlib.util.spec_from_file_location(module_name, path)
        if spec is None or spec.loader is None:
            raise AOTCompileError(f"cannot import kernel source {path}")
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module  # dataclasses in the source look their module up there
        spec.loader.exec_module(module)
        kernel = getattr(module, name, None)
        if not isinstance(kernel, triton.runtime.jit.JITFunction):
            raise AOTCompileError(f"{path} has no @triton.jit kernel named {name!r}")
        _kernels[key] = kernel
    return _kernels[key]


class _TargetDriver:
    """Stands in for Triton's CUDA driver during a warm-up compile: it names the target; nothing runs."""

    def __init__(self, arch: int) -> None:
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", arch, 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self) -> int:
        return -1  # not a real device: the kernel's per-device caches never mix with a real GPU's

    def get_current_stream(self, device=None) -> int:
        return 0


@contextlib.contextmanager
def _driver_for(arch: int):
    from triton.runtime.driver import driver

    previous = driver._active  # may be None (not created yet): set_active(None) restores that
    driver.set_active(_TargetDriver(arch))
    try:
        yield
    finally:
        driver.set_active(previous)


def _resource_usage(cubin: bytes | None) -> tuple[int | None, int | None]:
    """(registers, spilled bytes) per thread from cuobjdump; (None, None) without the tool."""
    tool = _cuobjdump()
    if tool is None or not cubin:
        return None, None
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "kernel.cubin"
        path.write_bytes(cubin)
        result = subprocess.run([tool, "--dump-resource-usage", str(path)], capture_output=True, text=True)
    found = _RESOURCES.search(result.stdout)
    if result.returncode or found is None:
        return None, None
    registers, stack, _, local = (int(x) for x in found.groups())
    return registers, stack + local


def _cuobjdump() -> str | None:
    import triton

    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    return str(bundled) if bundled.exists() else shutil.which("cuobjdump")
