"""The device harnesses (packages/flash-cuda/scripts/*.py) call flash_cuda the way it is now.

Their GPU phases run only on an H200, so a call left behind by a change of flash_cuda's API would
first fail there, in scarce device time (it did: ``hopper_bwd._rows`` after the PackedLaunch change).
On the CPU: every call ``<module>.<function>(...)`` in a script, where ``<module>`` is a flash_cuda
module, names a function that exists and binds its positional and keyword arguments.
"""

from __future__ import annotations

import ast
import importlib
import inspect
from pathlib import Path

import pytest

pytest.importorskip("flash_cuda")

# The harnesses that import flash_cuda (racecheck_probe.py, a bare CuPy kernel, does not).
SCRIPTS = sorted(
    path
    for path in (Path(__file__).parents[2] / "packages" / "flash-cuda" / "scripts").glob("*.py")
    if "from flash_cuda import" in path.read_text()
)


def _flash_cuda_modules(tree: ast.AST) -> set[str]:
    """Names bound by ``from flash_cuda import a, b`` anywhere in the script."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == "flash_cuda":
            names.update(alias.asname or alias.name for alias in node.names)
    return names


def _calls(script: Path) -> list[tuple[int, str, str, ast.Call]]:
    tree = ast.parse(script.read_text())
    modules = _flash_cuda_modules(tree)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            owner = node.func.value
            if isinstance(owner, ast.Name) and owner.id in modules:
                found.append((node.lineno, owner.id, node.func.attr, node))
    return found


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_calls_into_flash_cuda_bind(script: Path) -> None:
    calls = _calls(script)
    assert calls, f"{script.name}: no flash_cuda calls found (the check would prove nothing)"
    problems = []
    for line, module_name, name, call in calls:
        module = importlib.import_module(f"flash_cuda.{module_name}")
        target = getattr(module, name, None)
        if target is None:
            problems.append(f"{script.name}:{line}: flash_cuda.{module_name} has no {name}")
            continue
        if any(isinstance(arg, ast.Starred) for arg in call.args) or any(k.arg is None for k in call.keywords):
            continue  # *args / **kwargs: the count is not known statically
        try:
            signature = inspect.signature(target)
        except (TypeError, ValueError):  # a builtin or a class without a readable signature
            continue
        args = [object()] * len(call.args)
        kwargs = {k.arg: object() for k in call.keywords if k.arg is not None}
        try:
            signature.bind(*args, **kwargs)
        except TypeError as error:
            problems.append(f"{script.name}:{line}: {module_name}.{name}{signature}: {error}")
    assert not problems, "\n".join(problems)
