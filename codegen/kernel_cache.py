"""Generated Triton sources, cached by content hash.

`load_source(source, name)` writes the source once to the cache directory ($SPARSEC_CACHE_DIR, or
~/.cache/sparsec/kernels) under a name that carries its hash, and imports it from there: @triton.jit
reads a kernel's source back with `inspect`, so generated kernels must live in real files. The
imported module is memoized per process, so a source is hashed, written and imported once.

`dump(directory)` copies the sources this process loaded into a folder, for reading; with
$SPARSEC_DUMP_DIR set, every loaded source is also copied to $SPARSEC_DUMP_DIR/kernels/ as it loads
(like Inductor's output_code.py).
"""
from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

__all__ = ["CacheInfo", "cache_dir", "cache_info", "clear_memory", "dump", "load_source", "loaded_sources", "source_digest"]

log = logging.getLogger(__name__)

_CACHE_ENV = "SPARSEC_CACHE_DIR"
_DUMP_ENV = "SPARSEC_DUMP_DIR"
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@dataclass(frozen=True, slots=True)
class CacheInfo:
    """Counters since the process started (or since `clear_memory`)."""

    files_written: int  # sources generated for the first time (no file with their hash existed)
    files_reused: int  # sources found on disk from an earlier process: imported, not rewritten
    memory_hits: int  # loads answered by the in-process memo


_modules: dict[str, ModuleType] = {}  # digest -> imported module
_paths: dict[str, Path] = {}  # kernel file name -> path of a source loaded in this process
_counts = {"files_written": 0, "files_reused": 0, "memory_hits": 0}


def cache_dir() -> Path:
    """Where generated sources live: $SPARSEC_CACHE_DIR, or ~/.cache/sparsec/kernels."""
    configured = os.environ.get(_CACHE_ENV)
    return Path(configured) if configured else Path.home() / ".cache" / "sparsec" / "kernels"


def source_digest(source: str) -> str:
    """The content hash that names a source's file (20 hex digits of SHA-256)."""
    return hashlib.sha256(source.encode()).hexdigest()[:20]


def load_source(source: str, name: str) -> ModuleType:
    """The module built from `source`: written once to the cache directory, imported once per process."""
    if not isinstance(source, str) or not source.strip():
        raise ValueError("kernel_cache.load_source: the source is empty")
    if not _NAME.fullmatch(name):
        raise ValueError(f"kernel_cache.load_source: {name!r} is not a valid Python identifier")
    digest = source_digest(source)
    module = _modules.get(digest)
    if module is not None:
        _counts["memory_hits"] += 1
        return module
    path = _write_once(source, f"{name}_{digest}.py")
    module = _import(path, f"sparsec_generated_{name}_{digest}")
    _modules[digest] = module
    _paths[path.name] = path
    _copy_to_dump_dir(path)
    return module


def _write_once(source: str, file_name: str) -> Path:
    directory = cache_dir()
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / file_name
    if path.exists() and path.read_text() == source:
        _counts["files_reused"] += 1
        return path
    # Write to a private name and rename: another process may be loading the same kernel.
    partial = directory / f".{file_name}.{os.getpid()}.tmp"
    partial.write_text(source)
    os.replace(partial, path)
    _counts["files_written"] += 1
    log.debug("sparsec: wrote kernel source %s", path)
    return path


def _import(path: Path, module_name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"kernel_cache: cannot import generated source {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[module_name]
        raise
    return module


def _copy_to_dump_dir(path: Path) -> None:
    dump_root = os.environ.get(_DUMP_ENV)
    if dump_root:
        dump(Path(dump_root) / "kernels", [path])


def loaded_sources() -> dict[str, Path]:
    """File name -> cached path of every source loaded in this process."""
    return dict(_paths)


def dump(directory: str | Path, paths: list[Path] | None = None) -> list[Path]:
    """Copy the sources loaded in this process (or `paths`) into `directory`; returns the copies."""
    target = Path(directory)
    target.mkdir(parents=True, exist_ok=True)
    copies = []
    for path in paths if paths is not None else list(_paths.values()):
        copies.append(Path(shutil.copyfile(path, target / path.name)))
    return copies


def cache_info() -> CacheInfo:
    return CacheInfo(**_counts)


def clear_memory() -> None:
    """Forget the in-process memo and counters (the files stay): the next load reads the disk."""
    _modules.clear()
    _paths.clear()
    for key in _counts:
        _counts[key] = 0
