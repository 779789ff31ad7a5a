"""The export manifest: the one contract between ``faar-export`` and whatever serves its models.

``faar-export`` writes ``<repo>/<name>/config.pbtxt`` (Triton's view: the batch limit) and
``<repo>/<name>/<version>/manifest.json``, which it builds from the models below and writes
as their JSON; the gateway reads it back through the same models (``load_manifest``), so
what one writes the other can read. Torch-free: ``faar`` imports this module, never the
other way round.

Decisions:

* Every part is typed and unknown keys are refused: a typo in the exporter fails the
  export, a hand-edited file fails at gateway start, each with the field named, never at
  the first request.
* ``FORMAT_VERSION`` changes when a field is removed or renamed or changes meaning; a
  reader refuses any other version with one line naming the version and the file.
  Optional fields (default ``None``) may be added within a version, e.g. the INT8
  export's precision, calibration and quantisation-gate results under ``export`` and
  ``parity``; a reader older than such a field refuses the file and names the field.
* A task is one of four kinds, told apart by ``kind``; each kind carries its own fields
  (labels: classes and a palette; probability: range; normals: convention; depth: units).
* ``parse_manifest`` takes the decoded JSON from anywhere (a file, or a copy that
  config.pbtxt carries for a gateway that only talks to Triton); ``load_manifest`` reads
  the file, ``manifest_from_model_config`` the copy in a model configuration as Triton's
  model-config API answers it: one parameter ``faar_manifest_v<version>`` per version,
  since config.pbtxt is shared by every version of a model (``faar.export.triton``).
* Written as it was read: fields a manifest did not carry (one written before an optional
  field existed) stay out of ``to_json``, so an old file round-trips unchanged.
* The decoder's 2-D DFT is named as in the run's config (``matmul`` | ``torch``);
  ``dft``, faar-export's earlier name for ``torch``, is read as ``torch``.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_serializer,
    field_validator,
    model_validator,
)

FORMAT_VERSION = 1
TaskKind = Literal["labels", "probability", "normals", "depth"]
KINDS: tuple[str, ...] = get_args(TaskKind)
FFTBackend = Literal["matmul", "torch"]
Precision = Literal["fp32", "fp16", "int8"]
FFT_ALIASES = {"dft": "torch"}  # faar-export's earlier spelling
DType = Literal["uint8", "float32"]
SHA256 = r"^[0-9a-f]{64}$"
Count = Annotated[int, Field(ge=0)]
Channel = Annotated[int, Field(ge=0, le=255)]


class ManifestError(ValueError):
    """The repository does not hold a model the gateway can serve; the message says why."""


class Schema(BaseModel):
    model_config = ConfigDict(extra="forbid")


# --- what the graph takes and gives -------------------------------------------------------------
class Tensor(Schema):
    name: str = Field(min_length=1)
    dtype: DType
    shape: list[int] = Field(min_length=2, description="-1 first (the dynamic batch axis), then fixed dims")
    meaning: str

    @field_validator("shape")
    @classmethod
    def _batch_first(cls, shape: list[int]) -> list[int]:
        if shape[0] != -1 or any(d < 1 for d in shape[1:]):
            raise ValueError(f"shape {shape}: want -1 (batch) and then positive dims")
        return shape


class Normalization(Schema):
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    formula: str


class InputTensor(Tensor):
    dtype: Literal["uint8"]
    layout: Literal["NHWC"]
    color: Literal["RGB"]
    range: tuple[int, int]
    normalization: Normalization

    @field_validator("shape")
    @classmethod
    def _rgb_image(cls, shape: list[int]) -> list[int]:
        if len(shape) != 4 or shape[3] != 3:
            raise ValueError(f"shape {shape}: want [-1, H, W, 3] (RGB pixels, NHWC)")
        return shape


class OutputTensor(Tensor):
    task: str


# --- tasks, one model per kind ----------------------------------------------------------------------
@dataclass(frozen=True)
class TaskInfo:
    """What the gateway needs of one task to answer with its map."""

    name: str
    kind: str  # one of KINDS
    output: str  # graph output holding the task's map
    description: str = ""
    classes: tuple[str, ...] = ()
    palette: tuple[tuple[int, int, int], ...] = ()
    units: str = ""


class TaskBase(Schema):
    kind: TaskKind
    description: str
    channels: int = Field(ge=1)
    outputs: list[str] = Field(min_length=1, description="graph outputs; the one named after the task is its map")

    def info(self, name: str) -> TaskInfo:
        output = name if name in self.outputs else self.outputs[0]
        return TaskInfo(name, self.kind, output, self.description)


class LabelsTask(TaskBase):
    kind: Literal["labels"]
    classes: list[str] = Field(min_length=1, description="name per class index")
    palette: list[tuple[Channel, Channel, Channel]] = Field(description="RGB per class index")

    @model_validator(mode="after")
    def _colour_per_class(self) -> LabelsTask:
        if len(self.palette) < len(self.classes):
            raise ValueError(f"{len(self.classes)} classes but {len(self.palette)} palette colours")
        return self

    def info(self, name: str) -> TaskInfo:
        return replace(super().info(name), classes=tuple(self.classes), palette=tuple(self.palette))


class ProbabilityTask(TaskBase):
    kind: Literal["probability"]
    range: tuple[float, float]


class NormalsTask(TaskBase):
    kind: Literal["normals"]
    convention: str = Field(description="axes of the unit vectors")

    def info(self, name: str) -> TaskInfo:
        return replace(super().info(name), description=self.convention)


class DepthTask(TaskBase):
    kind: Literal["depth"]
    units: str

    def info(self, name: str) -> TaskInfo:
        return replace(super().info(name), units=self.units)


Task = Annotated[LabelsTask | ProbabilityTask | NormalsTask | DepthTask, Field(discriminator="kind")]


# --- where the model came from and how it was made ---------------------------------------------------
class ModelRef(Schema):
    name: str
    version: int = Field(ge=1)


class Source(Schema):
    run: str = Field(description="the run directory the model was rebuilt from")
    model_sha256: str = Field(pattern=SHA256)
    config: dict[str, Any] = Field(description="the run's configuration, as faar.config writes it")


class LayerRank(Schema):
    group: str
    site: str
    kind: str = Field(description="adapter kind (dora | lora)")
    rank: Count
    parameters_before: Count
    parameters_after: Count


class Ranks(Schema):
    layers: dict[str, LayerRank]
    count: Count
    total: Count
    min: Count
    max: Count
    mean: float


class Parameters(Schema):
    note: str
    before_merge: Count
    trainable_before_merge: Count
    after_merge: Count
    onnx_initializer_elements: Count


def _fft_name(value: Any) -> Any:
    return FFT_ALIASES.get(value, value) if isinstance(value, str) else value


class ExportOptionsRecord(Schema):
    """faar-export's options as given (``None``: the default was used)."""

    name: str
    version: int = Field(ge=1)
    height: int | None
    width: int | None
    fft: FFTBackend
    fp16: bool
    max_batch_size: int = Field(ge=1)
    device_kind: Literal["gpu", "cpu"]
    opset: int | None
    probabilities: bool
    overwrite: bool
    exporter: Literal["auto", "torchscript", "dynamo"]
    queue_timeout_s: float | None = None  # optional: added within format 1
    parity_device: Literal["cpu", "cuda"] | None = None
    tf32: bool | None = None
    # Added with the reduced-precision exports (absent in earlier manifests):
    precision: Precision | None = None
    calibration: str | None = Field(None, description="int8: 'run' (the run's training split) or a folder")
    calibration_images: int | None = Field(None, ge=1)
    gate_images: int | None = Field(None, ge=1)
    gate: list[str] | None = Field(None, description="limits that replaced the defaults, TASK=VALUE[%]")
    data_root: str | None = None

    normalise_fft = field_validator("fft", mode="before")(_fft_name)


class GraphInfo(Schema):
    """What writing the ONNX file did (``faar.export.graph.export_onnx``)."""

    exporter: Literal["torchscript", "dynamo"]
    opset: int
    ir_version: int
    optimization: str
    fp16: bool
    nodes: Count
    op_types: dict[str, Count]
    initializer_elements: Count
    export_seconds: float
    seconds: float


class Calibration(Schema):
    source: str = Field(description="'<dataset> <split>' of the run, or the folder the images came from")
    images: int = Field(ge=1)


class QuantizationMethod(Schema):
    format: Literal["QDQ"]
    weights: str
    activations: str
    calibration: str = Field(description="how activation ranges were taken from the calibration images")
    operators: list[str] = Field(description="operator types quantised (all others stay float)")


class QuantizationTrial(Schema):
    float_groups: list[str]
    passed: bool
    score: float | None = Field(description="worst task's loss / its limit (1 = at the limit); None: unbounded")
    worse_by: dict[str, float | None]


class Quantization(Schema):
    """How the int8 graph was made: which node groups stay float, found by the sensitivity pass."""

    method: QuantizationMethod
    calibration: Calibration
    groups: dict[str, Count] = Field(description="quantisable nodes per group")
    float_groups: list[str] = Field(description="groups kept float in this graph")
    sensitivity: dict[str, float | None] = Field(
        description="gate score with only that group float (empty when everything quantised passed)")
    tried: list[QuantizationTrial]


class ExportInfo(GraphInfo):
    options: ExportOptionsRecord
    fft_backend: FFTBackend
    versions: dict[str, str] = Field(description="package versions of the export")
    total_seconds: float
    precision: Precision | None = Field(None, description="None in manifests older than the field: fp32 or fp16")
    quantization: Quantization | None = None

    normalise_fft = field_validator("fft_backend", mode="before")(_fft_name)


class ParityReference(Schema):
    model: str
    fft_backend: FFTBackend
    runtime: str


class ParityTolerance(Schema):
    max_abs: float
    mean_abs: float
    min_label_agreement: float


class ParityInput(Schema):
    content: str
    batch: int = Field(ge=1)


class LabelAgreement(Schema):
    agreement: float = Field(description="share of pixels with the same class")


class MapError(Schema):
    max_abs_error: float
    mean_abs_error: float


class GateTask(Schema):
    metric: str = Field(description="the task's headline metric, as faar.metrics names it")
    fp32: float | None
    candidate: float | None
    worse_by: float | None = Field(description="in the limit's units (percent of fp32 for a relative limit)")
    limit: str = Field(description="VALUE or VALUE%")
    passed: bool


class GateLimit(Schema):
    worse_by: float
    relative: bool


class GateCpu(Schema):
    model: str
    cores: Count
    avx2: bool
    avx512: bool
    vnni: bool


class AccuracyGate(Schema):
    """Task metrics of this graph against the fp32 graph of the same run, on held-out images."""

    passed: bool
    failures: list[str]
    score: float | None
    tasks: dict[str, GateTask]
    limits: dict[str, GateLimit]
    data: str = Field(description="'<dataset> <split>' the held-out images came from")
    images: int = Field(ge=1)
    runtime: str
    cpu: GateCpu


class Parity(Schema):
    reference: ParityReference
    candidate: str
    passed: bool
    failures: list[str]
    tolerance: ParityTolerance
    inputs: list[ParityInput]
    outputs: dict[str, LabelAgreement | MapError]
    provider: str | None = Field(None, description="ONNX Runtime execution provider that ran the graph "
                                 "(CUDA with TF32 off); optional: added within format 1")
    gate: AccuracyGate | None = Field(None, description="fp16 and int8: the accuracy gate")


class OnnxFile(Schema):
    file: str = Field(min_length=1)
    sha256: str = Field(pattern=SHA256)
    bytes: Count


class Manifest(Schema):
    """``<version>/manifest.json``: what the graph takes and gives, and how it was made."""

    format_version: int = FORMAT_VERSION
    model: ModelRef
    created: AwareDatetime
    source: Source
    inputs: list[InputTensor] = Field(min_length=1, max_length=1)
    outputs: list[OutputTensor] = Field(min_length=1)
    input_size: tuple[int, int]
    tasks: dict[str, Task] = Field(min_length=1)
    ranks: Ranks
    parameters: Parameters
    export: ExportInfo
    parity: Parity
    onnx: OnnxFile

    @field_validator("format_version")
    @classmethod
    def _known_format(cls, version: int) -> int:
        if version != FORMAT_VERSION:
            raise ValueError(f"manifest format {version}; this reader reads format {FORMAT_VERSION}")
        return version

    @model_validator(mode="after")
    def _consistent(self) -> Manifest:
        names = [o.name for o in self.outputs]
        if len(set(names)) != len(names) or self.image.name in names:
            raise ValueError(f"tensor names repeat: {[self.image.name, *names]}")
        if tuple(self.image.shape[1:3]) != self.input_size:
            raise ValueError(f"input_size {list(self.input_size)} is not the input's {self.image.shape[1:3]}")
        for o in self.outputs:
            if o.task not in self.tasks:
                raise ValueError(f"output {o.name!r} names task {o.task!r}, which is not in tasks")
        for name, task in self.tasks.items():
            missing = [o for o in task.outputs if o not in names]
            if missing:
                raise ValueError(f"task {name!r} names outputs {missing}, which the graph does not have")
        return self

    @field_serializer("created")
    def _iso(self, created: datetime) -> str:
        return created.isoformat()  # "+00:00" as faar-export has always written, not pydantic's "Z"

    @property
    def image(self) -> InputTensor:
        return self.inputs[0]

    def to_json(self, compact: bool = False) -> str:
        """The file's text (indented, a final newline) or, ``compact``, one line (config.pbtxt)."""
        if compact:
            return self.model_dump_json(exclude_unset=True)
        return self.model_dump_json(indent=2, exclude_unset=True) + "\n"


def _problems(exc: ValidationError, limit: int = 3) -> str:
    errors = exc.errors(include_url=False)
    said = [f"{'.'.join(map(str, e['loc'])) or 'manifest'}: {e['msg'].removeprefix('Value error, ')}"
            for e in errors[:limit]]
    more = f" (and {len(errors) - limit} more)" if len(errors) > limit else ""
    return "; ".join(said) + more


def parse_manifest(data: Any, source: str) -> Manifest:
    """Decoded manifest JSON -> a validated ``Manifest``; ``ManifestError`` (one line, naming
    ``source``) for another format version or any field that does not fit."""
    version = data.get("format_version") if isinstance(data, Mapping) else None
    if version != FORMAT_VERSION:
        raise ManifestError(f"{source}: manifest format {version!r}; this gateway reads format "
                            f"{FORMAT_VERSION} (update faar_serve or re-export the model)")
    try:
        return Manifest.model_validate(data)
    except ValidationError as exc:
        raise ManifestError(f"{source} is not a valid faar-export manifest: {_problems(exc)}") from exc


def manifest_parameter(version: int) -> str:
    """The config.pbtxt parameter holding ``version``'s manifest."""
    return f"faar_manifest_v{version}"


def manifest_from_model_config(config: Mapping[str, Any], version: int, source: str) -> Manifest:
    """``version``'s manifest from a Triton model configuration (the JSON of its model-config API)."""
    key = manifest_parameter(version)
    entry = (config.get("parameters") or {}).get(key)
    if not isinstance(entry, Mapping) or not entry.get("string_value"):
        raise ManifestError(f"{source} has no parameter {key!r}: its config.pbtxt was not written by this "
                            "faar-export; re-export the model (or serve it with --model-repository and "
                            "the embedded engine)")
    try:
        data = json.loads(entry["string_value"])
    except ValueError as exc:
        raise ManifestError(f"{source}: parameter {key!r} is not JSON: {exc}") from exc
    return parse_manifest(data, f"{source} ({key})")


def load_manifest(path: str | os.PathLike) -> Manifest:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ManifestError(f"cannot read {path}: {exc}") from exc
    return parse_manifest(data, str(path))


# --- what the gateway serves --------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelSpec:
    """The served model: the validated manifest plus what the gateway looks up per request."""

    name: str
    version: int
    input_name: str
    height: int
    width: int
    max_batch_size: int  # config.pbtxt's, the limit Triton enforces for the same model
    tasks: dict[str, TaskInfo]
    manifest: Manifest
    model_dir: Path | None  # None: read from Triton, no repository folder here

    @classmethod
    def from_manifest(cls, manifest: Manifest, model_dir: Path | None, version: int, max_batch_size: int,
                      name: str | None = None) -> ModelSpec:
        """``name`` defaults to ``model_dir``'s (the repository layout)."""
        _, height, width, _ = manifest.image.shape
        if name is None:
            if model_dir is None:
                raise ValueError("give the model's name or its folder")
            name = model_dir.name
        return cls(name=name, version=version, input_name=manifest.image.name, height=height,
                   width=width, max_batch_size=max_batch_size,
                   tasks={t: task.info(t) for t, task in manifest.tasks.items()},
                   manifest=manifest, model_dir=model_dir)

    @property
    def output_names(self) -> list[str]:
        """The graph outputs the tasks' maps come from, each once, in task order."""
        return list(dict.fromkeys(t.output for t in self.tasks.values()))

    @property
    def onnx_path(self) -> Path:
        if self.model_dir is None:
            raise ManifestError(f"model {self.name!r} was read from Triton: no ONNX file here")
        return self.model_dir / str(self.version) / self.manifest.onnx.file

    def select_tasks(self, names: str | None) -> list[str]:
        """``"semseg,depth"`` -> those tasks in that order; None or empty -> every task."""
        if not names or not names.strip():
            return list(self.tasks)
        wanted = [n.strip() for n in names.split(",") if n.strip()]
        unknown = [n for n in wanted if n not in self.tasks]
        if unknown:
            raise KeyError(f"unknown task(s) {unknown}; this model has {list(self.tasks)}")
        return list(dict.fromkeys(wanted))


def latest_version(model_dir: Path) -> int:
    """The highest numeric version folder with a manifest (what Triton's ``latest`` policy serves)."""
    versions = [int(p.name) for p in model_dir.iterdir()
                if p.is_dir() and p.name.isdigit() and (p / "manifest.json").is_file()]
    if not versions:
        raise ManifestError(f"{model_dir} holds no <version>/manifest.json; export a model with faar-export")
    return max(versions)


def read_max_batch_size(config_pbtxt: Path) -> int:
    """``max_batch_size`` from Triton's config, the limit Triton enforces for the same model."""
    try:
        text = config_pbtxt.read_text()
    except OSError as exc:
        raise ManifestError(f"cannot read {config_pbtxt}: {exc}") from exc
    match = re.search(r"^\s*max_batch_size\s*:\s*(\d+)", text, re.MULTILINE)
    if not match or int(match.group(1)) < 1:
        raise ManifestError(f"{config_pbtxt} sets no positive max_batch_size (the model needs a batch axis)")
    return int(match.group(1))


def load_model_spec(repository: str | os.PathLike, model: str, version: int | None = None) -> ModelSpec:
    model_dir = Path(repository) / model
    if not model_dir.is_dir():
        raise ManifestError(f"model {model!r} not found: {model_dir} is not a directory")
    version = latest_version(model_dir) if version is None else version
    manifest = load_manifest(model_dir / str(version) / "manifest.json")
    return ModelSpec.from_manifest(manifest, model_dir, version, read_max_batch_size(model_dir / "config.pbtxt"))
