"""Gateway settings: command-line flags, else ``FAAR_*`` environment variables, else defaults.

Every field maps to ``FAAR_<FIELD>`` (``FAAR_MODEL_REPOSITORY``, ``FAAR_ENGINE``,
``FAAR_API_KEY``...); lists are JSON (``FAAR_CORS_ORIGINS='["https://a.example"]'``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

MiB = 1 << 20


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FAAR_", protected_namespaces=(), extra="ignore")

    model_repository: Path = Field(description="Triton model repository written by faar-export")
    model: str = Field("faar", description="model folder inside the repository")
    model_version: int | None = Field(None, ge=1, description="version to serve; default: the highest")
    engine: Literal["onnx", "triton"] = Field("onnx", description="embedded ONNX Runtime, or a Triton server")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="onnx engine: auto = CUDA when onnxruntime-gpu sees a GPU, else CPU")
    triton_url: str = Field(
        "127.0.0.1:8001", description="host:port of Triton's gRPC or HTTP endpoint; with gRPC also several "
        "replicas, balanced round-robin: dns:///name:port (every address of the name) or ipv4:h1:p1,h2:p2")
    triton_protocol: Literal["grpc", "http"] = Field("grpc", description="how to talk to Triton")
    triton_timeout_s: float = Field(10.0, gt=0, description="deadline of every call to Triton")
    host: str = Field("127.0.0.1", description="address to bind (0.0.0.0 in a container)")
    port: int = Field(8080, ge=0, le=65535, description="port to bind")
    max_batch_size: int | None = Field(
        None, ge=1, description="images per engine call, at most config.pbtxt's max_batch_size; default: that "
        "limit, except 1 for the onnx engine on the CPU, where batches add latency and memory but no throughput")
    max_queue_delay_ms: float = Field(
        5.0, ge=0, description="onnx engine: how long the first image of a batch waits for company")
    cpu_spin_wait: bool = Field(
        False, description="onnx engine on CPU: ONNX Runtime threads busy-wait between operators; lower "
        "latency when idle, less throughput under load (they take the cores that decode and encode)")
    max_queue: int = Field(64, ge=1, description="images in the gateway at once (decode to encode); then 503")
    max_batch_images: int = Field(16, ge=1, description="images per /v1/predict/batch (max_queue at most)")
    max_upload_bytes: int = Field(32 * MiB, ge=1, description="request body limit, checked while streaming")
    max_image_pixels: int = Field(40_000_000, ge=1, description="width x height limit per image (else 413)")
    retry_after_s: int = Field(1, ge=0, description="Retry-After of 503 answers")
    api_key: SecretStr | None = Field(None, description="if set, /v1/* needs 'Authorization: Bearer <key>'")
    cors_origins: list[str] = Field(default_factory=list, description="origins CORS allows; empty: off")
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"

    def describe(self) -> dict[str, Any]:
        """The effective settings for the start-up log (the API key masked)."""
        return {k: ("***" if k == "api_key" and v is not None else str(v) if isinstance(v, Path) else v)
                for k, v in self.model_dump().items()}
