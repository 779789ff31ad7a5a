"""Dockerfile and compose.yaml, checked without a Docker engine: what they reference exists,
what they install covers what the gateway imports, and their commands run here."""

from __future__ import annotations

import ast
import json
import os
import re
import shlex
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from faar_serve.net import free_port, wait_ready
from faar_serve.settings import Settings

ROOT = Path(__file__).parents[1]
GPU_TO_CPU = {"onnxruntime-gpu": "onnxruntime"}  # what is installed here stands in for the GPU build


def dockerfile() -> list[tuple[str, str]]:
    """(instruction, arguments) with line continuations joined and comments dropped."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def instructions(name: str) -> list[str]:
    return [args for ins, args in dockerfile() if ins == name]


def exec_form(args: str) -> list[str]:
    """A JSON-array CMD, with ``python`` as this interpreter."""
    return [sys.executable if a == "python" else a for a in json.loads(args)]


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
    copies = instructions("COPY")
    assert copies
    for args in copies:
        *sources, _ = shlex.split(args)
        for source in sources:
            assert (ROOT / source).exists(), source
            assert any(source.rstrip("/") == a or source.startswith(a + "/") for a in allowed), source


def _closure(specs: list[str]) -> set[str]:
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


def test_dockerfile_installs_what_the_gateway_imports() -> None:
    (install,) = [r for r in instructions("RUN") if "pip install" in r]
    words = shlex.split(install.split("pip install", 1)[1].split("&&")[0])
    installed = _closure([w for w in words if not w.startswith("-")])
    assert "torch" not in installed and "faar" not in installed
    dists = metadata.packages_distributions()
    stdlib = set(sys.stdlib_module_names)
    needed: set[str] = set()
    for path in (ROOT / "faar_serve").rglob("*.py"):
        if path.parent.name == "triton_backend":  # runs inside Triton, not in the gateway
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                needed |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                needed.add(node.module.split(".")[0])
    missing = {m for m in needed - stdlib - {"faar_serve"}
               if not {canonicalize_name(d) for d in dists.get(m, [m])} & installed}
    assert not missing, f"imported by faar_serve but not installed by the Dockerfile: {missing}"


def test_the_image_command_and_healthcheck_run_outside_a_container(repo: Path) -> None:
    (cmd,) = instructions("CMD")
    (health,) = instructions("HEALTHCHECK")
    env_lines = " ".join(instructions("ENV"))
    env = dict(re.findall(r"(\w+)=(\S+)", env_lines))
    port = free_port()
    env.update(FAAR_MODEL_REPOSITORY=str(repo), FAAR_HOST="127.0.0.1", FAAR_PORT=str(port))
    proc = subprocess.Popen(exec_form(cmd), cwd=ROOT, env={**os.environ, **env}, stdout=subprocess.PIPE,
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
    assert settings.engine == "triton" and settings.model_repository == Path("/models")
    host, port = settings.triton_url.split(":")
    assert host in services and any(p.endswith(f":{port}") for p in triton["ports"])
    assert (ROOT / gateway["build"] / "Dockerfile").is_file()


def test_compose_mounts_paths_that_exist() -> None:
    for name, service in _compose()["services"].items():
        for volume in service.get("volumes", []):
            host, container = volume.split(":")[:2]
            assert (ROOT / host).is_dir(), f"{name}: {host}"
            assert container == "/models"
