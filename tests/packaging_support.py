"""Reading the package metadata and the Dockerfile in tests (this module holds no tests).

The requirements come from ``pyproject.toml`` itself (the venv's installed ``faar`` metadata
may be older than the checkout); what each requirement pulls in is read from the installed
distributions' metadata, so the closure is what pip would install, offline.
"""

from __future__ import annotations

import ast
import re
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).parents[1]
GPU_TO_CPU = {"onnxruntime-gpu": "onnxruntime"}  # what is installed here stands in for the GPU build


def dockerfile() -> list[tuple[str, str]]:
    """(instruction, arguments) with line continuations joined and comments dropped."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def instructions(name: str) -> list[str]:
    return [args for ins, args in dockerfile() if ins == name]


def image_env() -> dict[str, str]:
    """The environment the Dockerfile's ENV instructions give the container."""
    return dict(re.findall(r"(\w+)=(\S+)", " ".join(instructions("ENV"))))


def project() -> dict[str, Any]:
    tomllib = pytest.importorskip("tomllib", reason="tomllib is Python 3.11+")
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def requirements(extras: list[str]) -> list[str]:
    """What installing the project with ``extras`` asks for."""
    optional = project()["optional-dependencies"]
    missing = set(extras) - set(optional)
    assert not missing, f"extras not in pyproject.toml: {missing}"
    return [*project()["dependencies"], *(r for e in extras for r in optional[e])]


def closure(specs: list[str]) -> set[str]:
    """Every distribution that installing ``specs`` brings (markers and extras evaluated)."""
    names: set[str] = set()
    seen: set[tuple[str, frozenset[str]]] = set()
    todo = [Requirement(s) for s in specs]
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        name = GPU_TO_CPU.get(name, name)
        if (name, frozenset(req.extras)) in seen:
            continue
        seen.add((name, frozenset(req.extras)))
        names.add(name)
        try:
            requires = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue
        for dep in map(Requirement, requires):
            if dep.marker is None or any(dep.marker.evaluate({"extra": e}) for e in req.extras or {""}):
                todo.append(dep)
    return names


def third_party_imports(*folders: str, skip: tuple[str, ...] = ()) -> set[str]:
    """Top-level modules imported anywhere under ``folders`` that are neither stdlib nor ours."""
    ours = {"faar", "faar_serve", *folders} | {p.stem for f in folders for p in (ROOT / f).glob("*.py")}
    needed: set[str] = set()
    for folder in folders:
        for path in (ROOT / folder).rglob("*.py"):
            if any(part in skip for part in path.relative_to(ROOT).parts):
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    needed |= {a.name.split(".")[0] for a in node.names}
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    needed.add(node.module.split(".")[0])
    return needed - set(sys.stdlib_module_names) - ours


def not_installed_by(modules: set[str], installed: set[str]) -> set[str]:
    """The modules that no distribution in ``installed`` provides."""
    dists = metadata.packages_distributions()
    return {m for m in modules if not {canonicalize_name(d) for d in dists.get(m, [m])} & installed}
