"""Gateway settings: command-line flags, else ``FAAR_*`` environment variables, else defaults.

Every field maps to ``FAAR_<FIELD>`` (``FAAR_MODEL_REPOSITORY``, ``FAAR_ENGINE``,
``FAAR_API_KEY``...). Lists take a plain comma-separated string or JSON
(``FAAR_CORS_ORIGINS=https://a.example,https://b.example`` or ``'["https://a.example"]'``).

Defaults that protect the process (issue 14, measured in bench/RESULTS.md): request headers
at most 16 KiB (431), 10 s to send them, 60 s for the body (408), at most 1024 connections
per worker, 10 s for a request from admission to answer, and a memory budget for the
images in flight of a quarter of the machine's (or container's) memory, divided among
the workers (each worker admits on its own).

``model_repository`` is required by the embedded engine only: with ``engine=triton`` the
gateway reads the model (manifest, batch limit, version) from Triton, so it needs no copy
of the repository, and a repository given anyway is not read.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

MiB = 1 << 20
BUDGET_SHARE = 0.25  # of the machine's memory, for images in flight (decode to encode), split among workers


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity, which container runtimes set)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def machine_memory_bytes() -> int:
    """Physical memory, or the container's cgroup limit where that is smaller."""
    total = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                total = int(line.split()[1]) * 1024
    except OSError:
        pass
    for limit_file in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(limit_file).read_text().strip()
        except OSError:
            continue
        if text.isdigit() and (not total or int(text) < total):
            total = int(text)
    return total or 4 << 30  # unknown: assume a small machine


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FAAR_", protected_namespaces=(), extra="ignore")

    model_repository: Path | None = Field(
        None, description="model repository written by faar-export; the onnx engine reads the model there "
        "(required), the triton engine reads it from Triton (not needed)")
    model: str = Field("faar", description="model name: its folder in the repository, its name in Triton")
    model_version: int | None = Field(None, ge=1, description="version to serve; default: the highest")
    engine: Literal["onnx", "triton"] = Field("onnx", description="embedded ONNX Runtime, or a Triton server")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="onnx engine: auto = CUDA when onnxruntime-gpu sees a GPU, else CPU")
    cuda_tf32: bool = Field(
        False, description="onnx engine on CUDA: let fp32 MatMul/Conv use TF32 (Ampere and newer; faster, but "
        "not the fp32 the export's parity gate checked); ONNX Runtime's own default is on")
    triton_url: str = Field(
        "127.0.0.1:8001", description="host:port of Triton's gRPC or HTTP endpoint; with gRPC also several "
        "replicas, balanced round-robin: dns:///name:port (every address of the name) or ipv4:h1:p1,h2:p2")
    triton_protocol: Literal["grpc", "http"] = Field("grpc", description="how to talk to Triton")
    triton_timeout_s: float | None = Field(
        None, gt=0, description="deadline of every call to Triton; default: --request-timeout-s")
    host: str = Field("127.0.0.1", description="address to bind (0.0.0.0 in a container)")
    port: int = Field(8080, ge=0, le=65535, description="port to bind")
    workers: int = Field(1, ge=1, le=64, description="gateway processes on the one port (each with its own "
                         "engine client or embedded model, and its own share of the memory budget)")
    max_batch_size: int | None = Field(
        None, ge=1, description="images per engine call, at most config.pbtxt's max_batch_size; default: that "
        "limit, except 1 for the onnx engine on the CPU, where batches add latency and memory but no throughput")
    max_queue_delay_ms: float = Field(
        5.0, ge=0, description="onnx engine: how long the first image of a batch waits for company")
    cpu_spin_wait: bool = Field(
        False, description="onnx engine on CPU: ONNX Runtime threads busy-wait between operators; lower "
        "latency when idle, less throughput under load (they take the cores that decode and encode)")
    inference_streams: int = Field(
        1, ge=1, description="onnx engine: model runs at once, each on its own session (a copy of the model) "
        "with cores / N threads. On the CPU a small model serves more images with N = cores (the demo model "
        "about 1.6x); a large one keeps every core busy in one run, where more streams only add latency and "
        "memory (bench/RESULTS.md)")
    render_threads: int = Field(
        default_factory=usable_cores, ge=1,
        description="threads that resize and encode one answer's maps in parallel (OpenCV, zlib-ng and fpng "
        "release the GIL) while fewer images than this are in the gateway, i.e. while cores are idle; under "
        "load each answer renders on one thread. 1: never in parallel. Default: the usable cores "
        "(bench/RESULTS.md, data path)")
    request_timeout_s: float = Field(
        10.0, gt=0, description="deadline of a request from admission to answer: refused at once (503 + "
        "Retry-After) when the queue ahead says it cannot make it; queued work past it is dropped")
    max_inflight_bytes: int | None = Field(
        None, ge=MiB, description="memory budget of the images in flight, decode to encode, in bytes (per "
        "worker); an image over it is refused with 413, work over it waits briefly, then 503; default: a "
        "quarter of the machine's memory divided by --workers")
    admission_wait_s: float = Field(
        1.0, ge=0, description="how long work over the memory budget waits for room before 503")
    max_queue: int = Field(64, ge=1, description="images in the gateway at once (decode to encode); then 503")
    max_batch_images: int = Field(16, ge=1, description="images per /v1/predict/batch (max_queue at most)")
    max_upload_bytes: int = Field(32 * MiB, ge=1, description="request body limit, checked while streaming")
    max_image_pixels: int = Field(40_000_000, ge=1, description="width x height limit per image (else 413)")
    max_header_bytes: int = Field(16384, ge=8192, description="request line and headers at most (else 431)")
    header_timeout_s: float = Field(
        10.0, gt=0, le=60, description="seconds a client has to send its request headers; also how long an "
        "idle keep-alive connection waits for the next request (the server times both with one clock)")
    body_timeout_s: float = Field(60.0, gt=0, description="seconds a client has to send the whole body (else 408)")
    keep_alive: bool = Field(True, description="HTTP/1.1 keep-alive (idle connections close after "
                             "--header-timeout-s)")
    max_connections: int = Field(1024, ge=1, description="connections served at once per worker; more wait "
                                 "in the listen backlog")
    retry_after_s: int = Field(1, ge=0, description="Retry-After of 503 answers (at least)")
    api_key: SecretStr | None = Field(None, description="if set, /v1/* (and /metrics) need 'Authorization: "
                                      "Bearer <key>', checked before the body is read")
    metrics_public: bool = Field(False, description="serve /metrics without the API key even when one is set")
    expose_manifest: bool = Field(False, description="/v1/model also returns the whole export manifest "
                                  "(training run path and configuration included)")
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="origins CORS allows, comma-separated or a JSON list; empty: off")
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"

    @model_validator(mode="after")
    def _repository_for_onnx(self) -> Settings:
        if self.engine == "onnx" and self.model_repository is None:
            raise ValueError("the onnx engine needs model_repository (--model-repository or "
                             "FAAR_MODEL_REPOSITORY); only --engine triton reads the model from Triton")
        return self

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _origins(cls, value: Any) -> Any:
        """``a,b`` or ``["a", "b"]`` (environment) or a list (flags, code)."""
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                try:
                    return json.loads(text)
                except ValueError as exc:
                    raise ValueError(f"not a JSON list ({exc}); or give origins comma-separated") from None
            return [o.strip() for o in text.split(",") if o.strip()]
        if isinstance(value, list) and len(value) == 1 and "," in str(value[0]):
            return cls._origins(value[0])
        return value

    @property
    def budget_bytes(self) -> int:
        """This worker's memory budget for images in flight."""
        if self.max_inflight_bytes is not None:
            return self.max_inflight_bytes
        return int(machine_memory_bytes() * BUDGET_SHARE / self.workers)

    @property
    def triton_deadline_s(self) -> float:
        return self.triton_timeout_s or self.request_timeout_s

    def describe(self) -> dict[str, Any]:
        """The effective settings for the start-up log (the API key masked)."""
        return {k: ("***" if k == "api_key" and v is not None else str(v) if isinstance(v, Path) else v)
                for k, v in self.model_dump().items()} | {"budget_bytes": self.budget_bytes}

    def to_environment(self) -> str:
        """These settings as JSON for worker processes (``from_environment``), the key included."""
        data = self.model_dump(mode="json")
        data["api_key"] = self.api_key.get_secret_value() if self.api_key else None
        return json.dumps(data)
