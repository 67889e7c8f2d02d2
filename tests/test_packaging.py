"""What every distribution ships and declares: its license, its README, its real dependencies."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = sorted(p for p in (ROOT / "packages").iterdir() if (p / "pyproject.toml").is_file())


def _project(package: Path) -> dict:
    return tomllib.loads((package / "pyproject.toml").read_text())


def test_every_package_is_checked():
    assert {p.name for p in PACKAGES} >= {"flash-core", "flash-triton", "flash-cuda", "flash-bench"}


@pytest.mark.parametrize("package", PACKAGES, ids=lambda p: p.name)
def test_the_license_ships_in_every_distribution(package):
    text = (ROOT / "LICENSE").read_text()
    assert text.startswith("BSD 3-Clause License") and "Copyright (c) 2026, the flash developers" in text
    assert (package / "LICENSE").read_text() == text
    data = _project(package)
    assert data["project"]["license"] == "BSD-3-Clause"
    assert data["project"]["license-files"] == ["LICENSE"]
    # License expressions and license-files are read from setuptools 77 on; older ones reject them.
    assert "setuptools>=77" in data["build-system"]["requires"]


@pytest.mark.parametrize("package", PACKAGES, ids=lambda p: p.name)
def test_the_readme_exists(package):
    assert (package / _project(package)["project"]["readme"]).is_file()


@pytest.mark.parametrize("package", PACKAGES, ids=lambda p: p.name)
def test_a_module_level_numpy_import_is_a_declared_dependency(package):
    importers = [
        path.relative_to(package / "src")
        for path in (package / "src").rglob("*.py")
        if re.search(r"^(import numpy|from numpy)", path.read_text(), re.MULTILINE)
    ]
    project = _project(package)["project"]
    declared = [re.split(r"[<>=!~\[; ]", dep)[0] for dep in project.get("dependencies", [])]
    extras = [
        re.split(r"[<>=!~\[; ]", dep)[0] for deps in project.get("optional-dependencies", {}).values() for dep in deps
    ]
    if package.name == "flash-triton":  # only the interpreter patch, imported only under the interpreter
        assert [str(p) for p in importers] == ["flash_triton/interpreter_patch.py"]
        assert "numpy" in extras
    elif importers:
        assert "numpy" in declared, importers


@pytest.mark.parametrize("name", ["flash-core", "flash-bench"])
def test_torch_lower_bound_is_the_oldest_tested(name):
    assert "torch>=2.11" in _project(ROOT / "packages" / name)["project"]["dependencies"]
