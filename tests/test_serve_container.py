"""Dockerfile and compose.yaml, checked without a Docker engine: what they reference exists,
what they install covers what the gateway imports, and their commands run here."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging_support import (
    ROOT,
    closure,
    image_env,
    instructions,
    not_installed_by,
    project,
    requirements,
    third_party_imports,
)

from faar_serve.net import free_port, wait_ready
from faar_serve.settings import Settings


def exec_form(args: str) -> list[str]:
    """A JSON-array CMD, with ``python`` as this interpreter."""
    return [sys.executable if a == "python" else a for a in json.loads(args)]


def build_args() -> dict[str, str]:
    return dict(arg.split("=", 1) for arg in instructions("ARG"))


def pip_installs(runtime: str) -> list[list[str]]:
    """The words of every ``pip install`` in the Dockerfile, with ``${RUNTIME}`` substituted."""
    runs = [r.replace("${RUNTIME}", runtime) for r in instructions("RUN") if "pip install" in r]
    return [shlex.split(r.split("pip install", 1)[1].split("&&")[0]) for r in runs]


def test_dockerfile_base_user_healthcheck() -> None:
    (base,) = instructions("FROM")
    assert re.fullmatch(r"python:3\.\d+-slim", base)
    (user,) = instructions("USER")
    assert user not in ("root", "0")
    assert "useradd" in " ".join(instructions("RUN")) and user in " ".join(instructions("RUN"))
    (health,) = instructions("HEALTHCHECK")
    assert "CMD" in health and "/healthz" in health


def test_dockerfile_copies_files_that_exist_and_are_not_ignored() -> None:
    ignore = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
              if line.strip() and not line.startswith("#")]
    allowed = [p[1:].rstrip("/") for p in ignore if p.startswith("!")]
    assert ignore[0] == "*"  # everything excluded, then the few things the image needs
    assert "faar" not in allowed  # the training package stays out of the image
    copies = instructions("COPY")
    assert copies
    for args in copies:
        *sources, _ = shlex.split(args)
        for source in sources:
            assert (ROOT / source).exists(), source
            assert any(source.rstrip("/") == a or source.startswith(a + "/") for a in allowed), source


@pytest.mark.parametrize("runtime", ["gpu", "cpu"])
def test_dockerfile_installs_the_gateway_from_the_package_metadata(runtime: str) -> None:
    assert build_args()["RUNTIME"] == "gpu"  # the default image is the GPU one
    installs = pip_installs(runtime)
    extras: list[str] = []
    for words in installs:
        targets = [w for w in words if not w.startswith("-")]
        # Only the project itself, never a package name: the dependency list lives in pyproject.toml.
        assert targets and all(t.startswith("/") for t in targets), words
        for target in targets:
            if "[" in target:
                extras += target[target.index("[") + 1:-1].split(",")
    assert sorted(extras) == sorted(["serve", runtime])
    installed = closure(requirements(extras))
    assert not installed & {"torch", "torchvision", "timm", "onnx"}, installed
    # triton_backend/model.py runs inside Triton, not in the gateway.
    missing = not_installed_by(third_party_imports("faar_serve", skip=("triton_backend",)), installed)
    assert not missing, f"imported by faar_serve but not installed by the Dockerfile: {missing}"


def test_the_gpu_runtime_is_pinned_and_excludes_the_cpu_one() -> None:
    gpu = [Requirement(r) for r in requirements(["gpu"])]
    (runtime,) = [r for r in gpu if canonicalize_name(r.name) == "onnxruntime-gpu"]
    (pin,) = runtime.specifier
    assert pin.operator == "==" and {"cuda", "cudnn"} <= runtime.extras  # CUDA libraries from NVIDIA's wheels
    # onnxruntime and onnxruntime-gpu both install the module `onnxruntime`: never both.
    assert "onnxruntime" not in {canonicalize_name(r.name) for r in gpu}


def test_the_image_command_and_healthcheck_run_outside_a_container(repo: Path, tmp_path: Path) -> None:
    (cmd,) = instructions("CMD")
    (health,) = instructions("HEALTHCHECK")
    env = image_env()
    port = free_port()
    env.update(FAAR_MODEL_REPOSITORY=str(repo), FAAR_HOST="127.0.0.1", FAAR_PORT=str(port),
               PYTHONPATH=str(ROOT))  # the image installs faar_serve; here the checkout stands in for it
    proc = subprocess.Popen(exec_form(cmd), cwd=tmp_path, env={**os.environ, **env}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        wait_ready(f"http://127.0.0.1:{port}", proc, timeout=60)
        check = exec_form(health.split("CMD", 1)[1].strip())
        assert subprocess.run(check, env={**os.environ, **env}, timeout=10).returncode == 0
    finally:
        proc.terminate()
        output = proc.communicate(timeout=20)[0]
    assert '"model_repository"' in output  # settings printed at start


def _compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "compose.yaml").read_text())


def test_compose_runs_nvidia_triton_and_the_gateway_in_triton_mode() -> None:
    services = _compose()["services"]
    triton, gateway = services["triton"], services["gateway"]
    assert re.fullmatch(r"nvcr\.io/nvidia/tritonserver:\d\d\.\d\d-py3", triton["image"])
    assert "--model-repository=/models" in triton["command"]
    env = gateway["environment"]
    fields = {f"FAAR_{name.upper()}" for name in Settings.model_fields}
    assert set(env) <= fields, set(env) - fields
    settings = Settings(**{k[5:].lower(): v for k, v in env.items()})
    # the gateway reads the model from Triton: no repository, the name faar-export gives GPU exports
    assert settings.engine == "triton" and settings.model_repository is None and "volumes" not in gateway
    assert settings.model == "faar_gpu"
    host, port = settings.triton_url.split(":")
    assert host in services and any(p.endswith(f":{port}") for p in triton["ports"])
    build = gateway["build"]
    assert (ROOT / build["context"] / "Dockerfile").is_file()
    # Forwarding to Triton needs no GPU runtime in the gateway: the small CPU image.
    assert build["args"]["RUNTIME"] == "cpu" and "cpu" in project()["optional-dependencies"]
    assert "gpu" in str(triton["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"])


def test_compose_mounts_paths_that_exist() -> None:
    for name, service in _compose()["services"].items():
        for volume in service.get("volumes", []):
            host, container = volume.split(":")[:2]
            assert (ROOT / host).is_dir(), f"{name}: {host}"
            assert container == "/models"
