"""The package metadata: extras by role, torch's exact pin in the install path only, and every
third-party import of each part of the project covered by the extras that part is installed with."""

from __future__ import annotations

import re
import shlex
from importlib import metadata

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging_support import ROOT, closure, not_installed_by, project, requirements, third_party_imports

TORCH = {"torch", "torchvision"}


def names(specs: list[str]) -> set[str]:
    return {canonicalize_name(Requirement(s).name) for s in specs}


def constraints() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            req = Requirement(line)
            (spec,) = req.specifier
            assert spec.operator == "==", line
            pins[canonicalize_name(req.name)] = spec.version
    return pins


def test_the_core_is_torch_free_and_names_no_onnxruntime() -> None:
    core = names(project()["dependencies"])
    assert not core & (TORCH | {"onnxruntime", "onnxruntime-gpu", "timm"})
    assert not closure(project()["dependencies"]) & TORCH


def test_cpu_and_gpu_runtimes_are_alternatives() -> None:
    extras = project()["optional-dependencies"]
    assert names(extras["cpu"]) == {"onnxruntime"} and names(extras["gpu"]) == {"onnxruntime-gpu"}
    for name, specs in extras.items():
        if name not in ("cpu", "gpu"):
            assert not names(specs) & {"onnxruntime", "onnxruntime-gpu"}, name


def test_torch_is_pinned_by_the_install_path_not_by_the_metadata() -> None:
    for spec in project()["optional-dependencies"]["train"]:
        req = Requirement(spec)
        if canonicalize_name(req.name) in TORCH:
            assert all(s.operator != "==" for s in req.specifier), spec
    pins = constraints()
    assert set(pins) == TORCH
    # The environment the suite runs in is the one the constraints describe.
    for name, version in pins.items():
        assert metadata.version(name).split("+")[0] == version, name
    make = (ROOT / "Makefile").read_text()
    (install,) = [line for line in make.splitlines() if "pip install" in line and not line.lstrip().startswith("#")]
    words = shlex.split(install.split("pip install", 1)[1])
    assert words[words.index("-c") + 1] == "constraints.txt"
    (target,) = [w for w in words if w.startswith(".[")]
    extras = re.fullmatch(r"\.\[(.*)\]", target).group(1).split(",")
    assert set(extras) == {"train", "serve", "cpu", "dev"}


@pytest.mark.parametrize(("folders", "extras"), [
    (("faar_serve",), ["serve", "cpu"]),
    (("faar",), ["train", "cpu", "s3"]),
    (("faar", "faar_serve", "tests", "clients", "bench"), ["train", "serve", "cpu", "dev"]),
])
def test_each_part_imports_only_what_its_extras_install(folders: tuple[str, ...], extras: list[str]) -> None:
    # triton_backend/model.py runs inside Triton, in the interpreter that serves the model.
    imported = third_party_imports(*folders, skip=("triton_backend",))
    installed = closure(requirements(extras))
    missing = not_installed_by(imported, installed)
    assert not missing, f"{folders} import {missing}, which [{','.join(extras)}] does not install"
