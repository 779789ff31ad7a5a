"""Typed answers of the HTTP API (they also document it at /docs).

``/v1/model`` answers ``ModelInfo``, the public view of the export manifest
(``faar_serve.manifest.Manifest``): what a client needs to send images and read the maps
(tasks with their classes, palettes, units and conventions; the input size and
normalisation; the version; the parity summary; the ONNX file's hash to pin it), and
nothing about where or how the model was trained (the run's path, its configuration,
ranks, package versions). The whole manifest is added only with ``--expose-manifest``.
"""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, Field

from .manifest import AccuracyGate, InputTensor, LabelAgreement, Manifest, MapError, ModelRef, ParityTolerance, Task

__all__ = ["BatchPrediction", "ErrorBody", "Health", "Manifest", "ModelInfo", "Prediction", "Readiness",
           "TaskMap"]


class TaskMap(BaseModel):
    """One task's map at the answer's size, as a base64 PNG, and how to read its pixels."""

    kind: str = Field(description="labels | probability | normals | depth")
    description: str
    encoding: str = Field(description="png-palette | png-8bit | png-16bit | png-rgb")
    png: str = Field(description="base64 PNG")
    classes: list[str] | None = Field(None, description="labels: class name per pixel value")
    palette: list[list[int]] | None = Field(None, description="labels: RGB per class (also in the PNG)")
    classes_present: list[str] | None = None
    scale: float | None = Field(None, description="value = pixel * scale (in units)")
    units: str | None = None
    range: list[float] | None = None
    min: float | None = Field(None, description="depth: smallest value of the model's map (the resized map "
                                                "lies within [min, max])")
    max: float | None = None
    convention: str | None = Field(None, description="normals: axes and pixel encoding")


class Prediction(BaseModel):
    model: str
    version: int
    width: int = Field(description="of every map in this answer: the upload's (size=original), the model's "
                                   "(size=model) or scaled to the longest side asked for")
    height: int
    image_width: int = Field(description="of the upload, after EXIF orientation")
    image_height: int
    tasks: dict[str, TaskMap]
    timings_ms: dict[str, float] = Field(description="server stages decode, resize, queue, inference, encode in "
                                          "ms; their sum is the server time (HTTP parsing excluded)")


class BatchPrediction(BaseModel):
    model: str
    version: int
    results: list[Prediction] = Field(description="one per uploaded image, in upload order")


class ErrorBody(BaseModel):
    error: str = Field(description="stable code, e.g. not_an_image, too_many_pixels, overloaded")
    detail: str = Field(description="what is wrong, for people")


class Health(BaseModel):
    status: str


class Readiness(BaseModel):
    ready: bool
    engine: str = Field(description="onnx (embedded ONNX Runtime) or triton")
    model: str
    version: int | None = Field(description="null while the gateway has not read the model from Triton yet")
    provider: str | None = Field(description="what runs the graph: ONNX Runtime's execution provider now "
                                 "(e.g. CUDAExecutionProvider, CPUExecutionProvider), or Triton's instance kind "
                                 "(KIND_GPU, KIND_CPU); null while unknown")
    detail: str | None = Field(None, description="why it is not ready, when known")


class ParitySummary(BaseModel):
    """How closely the served ONNX file matched the trained model when it was exported."""

    passed: bool
    reference: str = Field(description="what it was compared with (model, DFT backend, runtime)")
    candidate: str
    tolerance: ParityTolerance
    outputs: dict[str, LabelAgreement | MapError]
    failures: list[str]
    gate: AccuracyGate | None = Field(None, description="fp16 / int8 exports: task metrics against the fp32 graph")


class ModelInfo(BaseModel):
    """The public view of the served model's manifest."""

    model: ModelRef
    created: datetime
    input_size: tuple[int, int] = Field(description="(height, width) the model runs at; uploads of any size are "
                                        "resized to it and maps back")
    input: InputTensor
    tasks: dict[str, Task]
    precision: str | None = Field(None, description="fp32 | fp16 | int8, as exported (null: fp32, older exports)")
    parity: ParitySummary
    onnx_sha256: str
    manifest: Manifest | None = Field(None, description="the whole export manifest (only with --expose-manifest)")

    @classmethod
    def of(cls, manifest: Manifest) -> ModelInfo:
        parity = manifest.parity
        ref = parity.reference
        summary = ParitySummary(passed=parity.passed, candidate=parity.candidate, tolerance=parity.tolerance,
                                outputs=parity.outputs, failures=parity.failures, gate=parity.gate,
                                reference=f"{ref.model}; DFT {ref.fft_backend}; {ref.runtime}")
        return cls(model=manifest.model, created=manifest.created, input_size=manifest.input_size,
                   input=manifest.image, tasks=manifest.tasks, parity=summary, onnx_sha256=manifest.onnx.sha256,
                   precision=manifest.export.options.precision)
