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
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal, get_args

from faar_serve.manifest import FFT_ALIASES, FFTBackend

DeviceKind = Literal["gpu", "cpu"]
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


@dataclass
class ExportOptions:
    name: str = "faar"
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
    # fp16 / int8 only (faar.export.gate, faar.export.quantize):
    calibration: str = "run"  # int8: "run" (the run's training split) or a folder of images
    calibration_images: int = 64
    gate_images: int = 64  # held-out images of the run's validation split
    gate: tuple[str, ...] = ()  # "TASK=VALUE" or "TASK=VALUE%": limits replacing the defaults
    data_root: str | None = None  # replaces the run's data.root (data moved since training)

    def __post_init__(self) -> None:
        self.fft = FFT_ALIASES.get(self.fft, self.fft)
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
        if self.fft not in FFT_BACKENDS:
            raise ExportError(f"fft must be one of {list(FFT_BACKENDS)} (or dft, the old name of torch), "
                              f"got {self.fft!r}")
        if self.precision not in PRECISIONS:
            raise ExportError(f"precision must be one of {list(PRECISIONS)}, got {self.precision!r}")
        if self.calibration_images < 1 or self.gate_images < 1:
            raise ExportError(f"calibration and gate images must be >= 1, got {self.calibration_images} and "
                              f"{self.gate_images}")
        if self.max_batch_size < 1:
            raise ExportError(f"max_batch_size must be >= 1, got {self.max_batch_size}")
        if self.device_kind not in ("gpu", "cpu"):
            raise ExportError(f"device_kind must be 'gpu' or 'cpu', got {self.device_kind!r}")
        if self.exporter not in ("auto", "torchscript", "dynamo"):
            raise ExportError(f"exporter must be auto, torchscript or dynamo, got {self.exporter!r}")
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
