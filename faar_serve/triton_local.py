"""Start and stop a real Triton Inference Server from the ``nvidia-pytriton`` wheel, without Docker.

The wheel ships the ``tritonserver`` binary and the Python backend but no ONNX Runtime
backend. ``build_backend_dir`` therefore lays out a backend directory with real copies of
the Python backend (the server refuses symlinks), the stub for this interpreter's Python,
and a Python-based backend named ``onnxruntime`` (``triton_backend/model.py``), so an
exported repository (``backend: "onnxruntime"``) loads unchanged. NVIDIA's container
uses its native backend for the same folder.

The repository is a folder, or a cloud URL that Triton's own loaders read
(``s3://[host:port/]bucket/prefix`` with the usual ``AWS_*`` variables, ``gs://``, ``as://``).
``extra_args`` passes any other server option (``--model-control-mode=explicit``,
``--grpc-max-connection-age``...); ``metrics_port`` turns Triton's Prometheus metrics on.
``explicit_models`` gives the options that load only the models named (Triton's explicit
model control), e.g. ``faar`` from a repository that also holds ``faar_gpu``, whose
KIND_GPU instances cannot load on a machine without a GPU (and would stop the server: it
runs with ``--exit-on-error``).

The model code runs in this interpreter's environment (numpy<2 is required there: with
numpy 2 inputs arrive as zeros without any error). A stub that cannot load its libpython
leaves the server "loading" forever, so readiness is always awaited with a deadline.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType

import numpy as np

from .net import free_port, http_ok

BACKEND_MODEL = Path(__file__).with_name("triton_backend") / "model.py"
PYTHON_BACKEND_FILES = ("libtriton_python.so", "triton_python_backend_utils.py")
STUB = "triton_python_backend_stub"
REMOTE_REPOSITORIES = ("s3://", "gs://", "as://")  # Triton's cloud storage loaders


class TritonStartError(RuntimeError):
    """The server did not come up; the message holds the end of its log."""


def explicit_models(names: Sequence[str]) -> list[str]:
    """Server options that load only ``names`` (none: every model in the repository)."""
    if not names:
        return []
    return ["--model-control-mode=explicit", *(f"--load-model={name}" for name in names)]


def _site_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise TritonStartError(f"package {package!r} is not installed (pip install nvidia-pytriton)")
    return Path(next(iter(spec.submodule_search_locations)))


def pytriton_server_dir() -> Path:
    """``<site-packages>/pytriton/tritonserver`` (found without importing pytriton)."""
    return _site_dir("pytriton") / "tritonserver"


def build_backend_dir(dest: str | os.PathLike) -> Path:
    """Write ``dest/python/`` (Python backend + stub) and ``dest/onnxruntime/model.py``."""
    if np.__version__.split(".")[0] != "1":
        raise TritonStartError(f"numpy {np.__version__}: Triton's Python backend stub needs numpy<2 "
                               "(with numpy 2 inputs arrive as zeros)")
    src = pytriton_server_dir()
    dest = Path(dest)
    python = dest / "python"
    python.mkdir(parents=True, exist_ok=True)
    for name in PYTHON_BACKEND_FILES:
        shutil.copy2(src / "backends" / "python" / name, python / name)
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = src / "python_backend_stubs" / version / STUB
    if not stub.is_file():
        raise TritonStartError(f"nvidia-pytriton has no Python backend stub for Python {version}")
    shutil.copy2(stub, python / STUB)
    onnx = dest / "onnxruntime"
    onnx.mkdir(exist_ok=True)
    shutil.copy2(BACKEND_MODEL, onnx / "model.py")
    return dest


def server_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The stub needs this interpreter's libpython and the wheel's bundled libraries, and finds
    its Python through ``python3`` on PATH (it ignores PYTHONPATH). ``extra`` adds variables
    (object-store credentials, for example)."""
    env = {**os.environ, **(extra or {})}
    libs = [sysconfig.get_config_var("LIBDIR"), str(_site_dir("pytriton").parent / "nvidia_pytriton.libs")]
    env["LD_LIBRARY_PATH"] = os.pathsep.join([*libs, *filter(None, [env.get("LD_LIBRARY_PATH")])])
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


def _group_alive(group: int) -> bool:
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    return True


class LocalTriton:
    """One ``tritonserver`` process serving ``model_repository``; a context manager.

    Ports default to free ones. ``start`` returns once every model is ready or raises
    ``TritonStartError`` (server exited, or not ready within ``timeout_s``) after stopping it.
    """

    def __init__(self, model_repository: str | os.PathLike, http_port: int | None = None,
                 grpc_port: int | None = None, workdir: str | os.PathLike | None = None,
                 host: str = "127.0.0.1", log_verbose: int = 0, *, metrics_port: int | None = None,
                 extra_args: Sequence[str] = (), env: Mapping[str, str] | None = None) -> None:
        if str(model_repository).startswith(REMOTE_REPOSITORIES):
            self.model_repository: str | Path = str(model_repository)
        else:
            self.model_repository = Path(model_repository).resolve()
            if not self.model_repository.is_dir():
                raise TritonStartError(f"model repository {self.model_repository} is not a directory")
        self.metrics_port = metrics_port
        self.extra_args = list(extra_args)
        self.env = dict(env or {})
        self.host = host
        self.http_port = http_port or free_port()
        self.grpc_port = grpc_port or free_port()
        self._own_workdir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="faar-triton-"))
        self.log_path = self.workdir / "tritonserver.log"
        self.log_verbose = log_verbose
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def http_url(self) -> str:
        return f"{self._client_host}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self._client_host}:{self.grpc_port}"

    @property
    def metrics_url(self) -> str | None:
        return f"http://{self._client_host}:{self.metrics_port}/metrics" if self.metrics_port else None

    @property
    def _client_host(self) -> str:
        return "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host

    def command(self) -> list[str]:
        return [
            str(pytriton_server_dir() / "bin" / "tritonserver"),
            f"--model-repository={self.model_repository}",
            f"--backend-directory={self.workdir / 'backends'}",
            f"--http-address={self.host}",
            f"--http-port={self.http_port}",
            f"--grpc-address={self.host}",
            f"--grpc-port={self.grpc_port}",
            *self._metrics_args(),
            "--allow-gpu-metrics=false",
            "--pinned-memory-pool-byte-size=0",
            "--disable-auto-complete-config",
            "--exit-on-error=true",
            "--exit-timeout-secs=5",
            f"--log-verbose={self.log_verbose}",
            *self.extra_args,
        ]

    def _metrics_args(self) -> list[str]:
        if not self.metrics_port:
            return ["--allow-metrics=false"]
        return ["--allow-metrics=true", f"--metrics-address={self.host}", f"--metrics-port={self.metrics_port}"]

    def start(self, timeout_s: float = 60.0) -> LocalTriton:
        if self.running():
            return self
        if not (self.workdir / "backends" / "onnxruntime" / "model.py").is_file():  # a restart reuses it
            build_backend_dir(self.workdir / "backends")
        with open(self.log_path, "ab") as log:
            # Own session: a hard kill reaches the Python stubs it spawned, too.
            self.process = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT,
                                            env=server_env(self.env), start_new_session=True)
        try:
            self.wait_ready(timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def ready(self) -> bool:
        """Server up and every model loaded (Triton's strict readiness)."""
        return http_ok(f"http://{self.http_url}/v2/health/ready")

    def wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self.running():
                code = self.process.returncode if self.process else None
                raise TritonStartError(f"tritonserver exited (code {code}):\n{self.log_tail()}")
            if self.ready():
                return
            time.sleep(0.2)
        raise TritonStartError(f"tritonserver not ready after {timeout_s:.0f} s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM (Triton unloads its models and exits), then SIGKILL to whatever is left of its
        process group (the server, or Python stubs that outlive it)."""
        if self.process is None:
            return
        group = self.process.pid  # start_new_session: the group id is the server's pid
        self.process.terminate()
        try:
            self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            pass
        deadline = time.monotonic() + timeout_s / 2
        while _group_alive(group) and time.monotonic() < deadline:
            time.sleep(0.05)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(group, signal.SIGKILL)
        self.process.wait()
        self.process = None

    def close(self) -> None:
        self.stop()
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> LocalTriton:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
