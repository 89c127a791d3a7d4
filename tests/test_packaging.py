"""The wheel ships every package of the DESIGN.md layout (ir/, passes/, codegen/, cost_models/
installed as sparsec.*): pyproject's package list must name every folder holding an __init__.py."""
from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_folder_is_in_the_wheel():
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    package_dir, listed = setuptools["package-dir"], set(setuptools["packages"])
    found = set()
    for package, folder in package_dir.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            relative = init.parent.relative_to(ROOT / folder)
            found.add(".".join([package, *relative.parts]))
    missing = {p for p in found if not any(p == q for q in listed)}
    assert not missing, f"packages missing from pyproject.toml: {sorted(missing)}"
    assert listed <= found, f"listed packages with no folder: {sorted(listed - found)}"
