"""What ``faar-export`` can be asked, and the checks made before any work starts.

Decisions:

* ``fft`` uses the decoder config's names (``decoder.fft``, ``faar.spectral.FFTBackend``),
  so one vocabulary runs from training to serving. ``matmul`` (the default) turns the
  decoder's 2-D DFTs into MatMuls with constant cos/sin matrices: ONNX Runtime's ``DFT``
  operator has no CUDA kernel (it falls back to the CPU inside a GPU graph) and is
  5-100x slower than torch.fft on CPU, while the MatMul form runs on every execution
  provider and in TensorRT. ``torch`` keeps torch.fft, which exports as ONNX ``DFT``; both
  give the same maps (the parity gate checks). ``dft``, this option's earlier name for
  ``torch``, is still accepted.
* Exporter ``auto``: dynamo where the graph holds torch.fft (the only exporter of FFTs),
  TorchScript otherwise (the measurements are in ``faar.export.graph``).
* The model name defaults per device kind (``faar`` for cpu, ``faar_gpu`` for gpu):
  config.pbtxt, and with it the instance kind, is shared by every version of a model, so
  a GPU export under the CPU model's name would make every version unloadable on a CPU
  server (``faar.export.triton.check_destination`` refuses it).
* ``queue_timeout_s`` becomes Triton's ``default_timeout_microseconds``; it defaults to the
  gateway's ``--triton-timeout-s`` default (10 s), see ``faar.export.triton``.
* ``parity_device`` runs the gate on ONNX Runtime's CPU (default) or CUDA provider; on
  CUDA with TF32 off (``faar.export.parity``). ``tf32`` is what the exported config asks
  of a GPU server (off: it serves what the gate checked).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal, get_args

from faar_serve.manifest import FFT_ALIASES, FFTBackend

DeviceKind = Literal["gpu", "cpu"]
ParityDevice = Literal["cpu", "cuda"]
DEFAULT_NAMES: dict[str, str] = {"cpu": "faar", "gpu": "faar_gpu"}  # config.pbtxt fixes the kind per name
DEFAULT_QUEUE_TIMEOUT_S = 10.0  # faar_serve's --triton-timeout-s default
Exporter = Literal["torchscript", "dynamo"]
ExporterChoice = Literal["auto", "torchscript", "dynamo"]
Precision = Literal["fp32", "fp16", "int8"]
PRECISIONS: tuple[str, ...] = get_args(Precision)
FFT_BACKENDS: tuple[str, ...] = get_args(FFTBackend)
# LayerNormalization needs opset 17; the dynamo exporter's op library starts at 18.
MIN_OPSET: dict[Exporter, int] = {"torchscript": 17, "dynamo": 18}
DEFAULT_OPSET = 18


class ExportError(ValueError):
    """An export that cannot be done as asked; nothing was written."""


# Options whose value is one of a fixed set, checked by ``ExportOptions.validate``.
CHOICES: dict[str, tuple[str, ...]] = {
    "fft": FFT_BACKENDS, "precision": PRECISIONS, "device_kind": get_args(DeviceKind),
    "parity_device": get_args(ParityDevice), "exporter": get_args(ExporterChoice),
}


@dataclass
class ExportOptions:
    name: str = ""  # "": DEFAULT_NAMES[device_kind]
    version: int = 1
    height: int | None = None  # None: the run's img_size
    width: int | None = None
    fft: FFTBackend = "matmul"  # "dft" is read as "torch"
    precision: Precision = "fp32"
    fp16: bool = False  # the earlier spelling of precision="fp16"; kept equal to it
    max_batch_size: int = 8
    device_kind: DeviceKind = "cpu"
    opset: int | None = None  # None: DEFAULT_OPSET
    probabilities: bool = False  # also <task>_probs for label tasks
    overwrite: bool = False
    exporter: ExporterChoice = "auto"  # auto: torchscript for matmul, dynamo for torch
    queue_timeout_s: float = DEFAULT_QUEUE_TIMEOUT_S  # Triton drops a request queued this long
    parity_device: ParityDevice = "cpu"  # where the parity gate runs the graph
    tf32: bool = False  # GPU servers may use TF32 for fp32 MatMul/Conv (config.pbtxt, use_tf32)

    # fp16 / int8 only (faar.export.gate, faar.export.quantize):
    calibration: str = "run"  # int8: "run" (the run's training split) or a folder of images
    calibration_images: int = 64
    gate_images: int = 64  # held-out images of the run's validation split
    gate: tuple[str, ...] = ()  # "TASK=VALUE" or "TASK=VALUE%": limits replacing the defaults
    data_root: str | None = None  # replaces the run's data.root (data moved since training)

    def __post_init__(self) -> None:
        self.fft = FFT_ALIASES.get(self.fft, self.fft)
        self.name = self.name or DEFAULT_NAMES.get(self.device_kind, "faar")
        if self.fp16 and self.precision == "fp32":
            self.precision = "fp16"
        self.fp16 = self.precision == "fp16"
        self.gate = tuple(self.gate)

    def validate(self) -> None:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", self.name):
            raise ExportError(f"model name {self.name!r}: use letters, digits, '_', '.', '-' "
                              "(it names a folder)")
        if self.version < 1:
            raise ExportError(f"version must be a positive integer (Triton ignores 0), got {self.version}")
        if (self.height is None) != (self.width is None):
            raise ExportError("give both --height and --width, or neither (the run's size)")
        if self.height is not None and any(d < 32 or d % 32 for d in (self.height, self.width)):
            raise ExportError(f"input size {self.height}x{self.width}: height and width must be positive "
                              "multiples of 32 (Swin's patch embedding and three patch mergings)")
        for name, allowed in CHOICES.items():  # "dft" became "torch" in __post_init__
            if getattr(self, name) not in allowed:
                raise ExportError(f"{name} must be one of {list(allowed)}, got {getattr(self, name)!r}")
        if self.calibration_images < 1 or self.gate_images < 1:
            raise ExportError(f"calibration and gate images must be >= 1, got {self.calibration_images} and "
                              f"{self.gate_images}")
        if self.max_batch_size < 1:
            raise ExportError(f"max_batch_size must be >= 1, got {self.max_batch_size}")
        if not self.queue_timeout_s > 0:
            raise ExportError(f"queue_timeout_s must be > 0 (Triton treats 0 as no timeout), "
                              f"got {self.queue_timeout_s}")
        exporter = resolve_exporter(self.exporter, torch_fft=self.fft == "torch")
        if self.opset is not None and self.opset < MIN_OPSET[exporter]:
            raise ExportError(f"opset {self.opset} is too old for the {exporter} exporter "
                              f"(needs >= {MIN_OPSET[exporter]})")


def resolve_exporter(choice: ExporterChoice, torch_fft: bool) -> Exporter:
    """``auto``: dynamo where the graph holds torch.fft (the only exporter of it), else TorchScript."""
    if choice == "torchscript" and torch_fft:
        raise ExportError("the TorchScript exporter cannot export torch.fft; "
                          "use --fft matmul or the dynamo exporter")
    if choice == "auto":
        return "dynamo" if torch_fft else "torchscript"
    return choice
