"""Builds and loads sparsec's native CPU kernels (codegen/native/*.cpp), once per machine.

`load_native(name)` compiles codegen/native/<name>.cpp into a shared library with the C++
compiler ($CXX, else c++ / g++ / clang++ on PATH) for this CPU (-O3 -march=native, OpenMP;
$SPARSEC_CPU_MARCH names another target, e.g. x86-64-v3 to build the AVX2 code on an AVX-512 machine),
linked against torch's libtorch_cpu (which carries the BLAS sgemm_ the kernels call) and its
OpenMP runtime, and opens it with ctypes. The library is cached on disk ($SPARSEC_CACHE_DIR, or
~/.cache/sparsec/kernels, under native/) by a hash of the source, the compiler, torch's version
and the CPU's flags, and in memory per process: the first call in a fresh environment compiles
(about a second), later ones only open the file.

The kernels are an optimisation: when there is no compiler, the build fails, the library does
not load, or $SPARSEC_CPU_NATIVE is 0, `load_native` returns None, says why once (a warning, and
`native_status`), and the CPU executor runs its torch path instead (SDPA, BLAS).
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch

__all__ = ["load_native", "native_entry", "native_status"]

_SOURCES = Path(__file__).with_name("native")
_ENABLE_ENV = "SPARSEC_CPU_NATIVE"
_FLAGS = ("-O3", "-fopenmp", "-fPIC", "-shared", "-std=c++17")
_MARCH_ENV = "SPARSEC_CPU_MARCH"
_STATUS: dict[str, str] = {}


def native_status(name: str) -> str:
    """'loaded', 'disabled', 'not loaded yet' or why the library `name` is unavailable."""
    return _STATUS.get(name, "not loaded yet")


def load_native(name: str) -> ctypes.CDLL | None:
    """The compiled library of codegen/native/<name>.cpp, or None (module docstring)."""
    if os.environ.get(_ENABLE_ENV, "1").strip() in ("0", "false", "no", "off"):
        _STATUS[name] = "disabled"
        return None
    return _load(name)


def native_entry(name: str, entry: str, argtypes: list):
    """The entry point `entry` of library `name` (ctypes, returning int), with its argument types
    set, or None where the library is unavailable (load_native)."""
    library = load_native(name)
    if library is None:
        return None
    function = getattr(library, entry)
    if function.argtypes is None:
        function.argtypes = argtypes
        function.restype = ctypes.c_int
    return function


@functools.lru_cache(maxsize=None)
def _load(name: str) -> ctypes.CDLL | None:
    try:
        library = ctypes.CDLL(str(_build(name)))
    except (OSError, RuntimeError, subprocess.SubprocessError) as error:
        _STATUS[name] = str(error)
        warnings.warn(f"sparsec: the native CPU kernel {name!r} is unavailable ({error}); the CPU executor "
                      "runs its torch path instead (torch's SDPA kernel, BLAS)", RuntimeWarning, stacklevel=3)
        return None
    _STATUS[name] = "loaded"
    return library


def _compiler() -> str:
    for candidate in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if candidate and shutil.which(candidate):
            return shutil.which(candidate)
    raise RuntimeError("no C++ compiler found ($CXX, c++, g++ or clang++)")


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    import platform
    return platform.processor() or platform.machine()


def _torch_lib() -> Path:
    return Path(torch.__file__).parent / "lib"


def _build(name: str) -> Path:
    source = _SOURCES / f"{name}.cpp"
    if not source.is_file():
        raise RuntimeError(f"no source {source}")
    compiler = _compiler()
    flags = (*_FLAGS, f"-march={os.environ.get(_MARCH_ENV, 'native')}")
    key = hashlib.sha256("\0".join([source.read_text(), compiler, " ".join(flags), torch.__version__,
                                    _cpu_flags()]).encode()).hexdigest()[:16]
    from sparsec.codegen.kernel_cache import cache_dir
    directory = cache_dir() / "native"
    library = directory / f"{name}_{key}.so"
    if library.is_file():
        return library
    directory.mkdir(parents=True, exist_ok=True)
    lib = _torch_lib()
    with tempfile.TemporaryDirectory(dir=directory) as scratch:
        built = Path(scratch) / library.name
        command = [compiler, *flags, str(source), "-o", str(built), f"-L{lib}", "-ltorch_cpu", f"-Wl,-rpath,{lib}"]
        done = subprocess.run(command, capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            raise RuntimeError(f"{Path(compiler).name} failed: {done.stderr.strip()[-600:]}")
        os.replace(built, library)  # atomic: another process may be building the same library
    return library
