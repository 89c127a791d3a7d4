"""Where measured (calibrated) hardware profiles live on disk, keyed by device name.

Measured autotuning times candidate kernels on the present device, refits a profile's
coefficients and stores it here; `hardware.get_profile` prefers a stored profile.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from sparsec.cost_models.hardware import HardwareProfile


def cache_dir() -> Path:
    root = os.environ.get("SPARSEC_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "sparsec")
    return Path(root)


def calibrated_profile_path(name: str) -> Path:
    safe = re.sub(r"[^a-z0-9_.-]+", "_", name.lower())
    return cache_dir() / "profiles" / f"{safe}.json"


def save_calibrated_profile(profile: HardwareProfile) -> Path:
    """Store `profile` as its device's calibrated profile. The CPU executor's choices, cached per
    pattern and shape, were priced with the profile before: they are forgotten, so that this
    process (e.g. `sparsec tune --measure`, which tunes right after calibrating) uses the new one."""
    from sparsec.codegen.attention_cpu_choice import choose_split

    path = calibrated_profile_path(profile.name)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(profile.to_json())
    tmp.replace(path)  # atomic: a concurrent reader never sees half a file
    choose_split.cache_clear()
    return path
