"""The parity gate: the saved ONNX file against the *unmerged* PyTorch model, or no export.

Decisions:

* Inputs: batches of 1 and 2 of rendered scenes (natural statistics) and uniform noise
  (every pixel value), so both a batching fault and a saturating one show.
* Per output, over every pixel of every batch: worst and mean absolute error for
  continuous maps, the share of pixels with the same class for label maps. NaN fails.
* The graph runs in an ONNX Runtime session made as the embedded engine makes it
  (``faar_serve.providers``), on the CPU by default or on CUDA (``parity_device``; CUDA
  must start, and runs with TF32 off, since ONNX Runtime's default TF32 on Ampere and
  newer would put 10-bit-mantissa MatMuls under an fp32 tolerance). The reference is
  PyTorch on the CPU in fp32.
* fp32: the merge and the matmul DFT agree with eager PyTorch to ~1e-6, so the limits
  only catch real faults. fp16: rounding accumulates through the backbone (Swin-T at 448:
  0.037 worst pixel on normals, where normalising a short raw vector amplifies it) and
  near-tied logits flip classes on a few pixels (99.8 % agree).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnxruntime as ort
import torch

from faar_serve.providers import ProviderError, create_session, running_provider

from .options import ExportError, ParityDevice
from .wrapper import INPUT_NAME, ExportWrapper


@dataclass(frozen=True)
class Tolerance:
    """Parity limits against the unmerged fp32 PyTorch model, over every pixel of every batch."""

    max_abs: float  # continuous maps (probabilities, normals, depth in metres): worst pixel
    mean_abs: float  # continuous maps: mean over pixels (catches small errors everywhere)
    min_label_agreement: float  # share of label-map pixels with the same class


TOLERANCES = {"fp32": Tolerance(1e-3, 1e-4, 0.999), "fp16": Tolerance(0.1, 5e-3, 0.98)}


def parity_batches(size: tuple[int, int], seed: int = 0) -> list[tuple[str, np.ndarray]]:
    """Batches of 1 and 2: rendered scenes (natural statistics) and uniform noise (every pixel value)."""
    from ..data.scenes import render_scene

    rng = np.random.default_rng(seed)

    def noise() -> np.ndarray:
        return rng.integers(0, 256, (*size, 3), dtype=np.uint8)

    scene = [render_scene(seed + i, size=size)["image"] for i in range(2)]
    return [
        (f"scene {seed}", scene[0][None]),
        ("2 x random", np.stack([noise(), noise()])),
        (f"scene {seed + 1} + random", np.stack([scene[1], noise()])),
    ]


@torch.inference_mode()
def check_parity(onnx_path: str | os.PathLike, reference: ExportWrapper,
                 batches: Sequence[tuple[str, np.ndarray]], tolerance: Tolerance,
                 device: ParityDevice = "cpu", providers: Sequence[Any] | None = None) -> dict[str, Any]:
    """Run the ONNX file in ONNX Runtime (on ``device`` with the gateway's session settings, TF32
    off; or on explicit ``providers``, as bench/gpu_check.py does for TensorRT) and ``reference``
    in PyTorch (CPU, fp32) on the same batches.

    Per output, over all pixels of all batches: max and mean abs error (continuous maps)
    or the share of pixels with the same class (label maps). ``passed`` is False when any
    output is out of ``tolerance``, has another shape or dtype, or holds NaN. The keys are
    those of ``faar_serve.manifest.Parity`` less what the exporter adds (reference, candidate),
    plus ``provider``: the execution provider that ran the graph.
    """
    try:  # spin_wait off: no busy-waiting ONNX Runtime threads stealing cores from PyTorch's here
        if providers is None:
            session = create_session(onnx_path, device, spin_wait=False, tf32=False)
        else:
            options = ort.SessionOptions()
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            session = ort.InferenceSession(str(onnx_path), options, providers=list(providers))
    except ProviderError as exc:
        raise ExportError(f"parity on {device}: {exc}") from exc
    except Exception as exc:  # onnxruntime raises its own untyped errors
        raise ExportError(f"ONNX Runtime cannot load {onnx_path}: {exc}") from exc
    provider = running_provider(session)
    names = [o.name for o in reference.outputs]
    got_all = [session.run(names, {INPUT_NAME: batch}) for _, batch in batches]
    del session
    stats = {n: {"same": 0, "max": 0.0, "sum": 0.0, "count": 0} for n in names}
    failures = []
    for (label, batch), got in zip(batches, got_all, strict=True):
        want = reference(torch.from_numpy(batch))
        for spec, g, r in zip(reference.outputs, got, want, strict=True):
            r, st = r.numpy(), stats[spec.name]
            if g.shape != r.shape or g.dtype != r.dtype:
                failures.append(f"{spec.name}: {g.dtype}{list(g.shape)} where PyTorch gives "
                                f"{r.dtype}{list(r.shape)} ({label})")
                continue
            st["count"] += g.size
            if spec.role == "labels":
                st["same"] += int(np.count_nonzero(g == r))
            else:
                diff = np.abs(g.astype(np.float64) - r.astype(np.float64))
                st["max"] = float(np.maximum(st["max"], diff.max()))  # NaN propagates
                st["sum"] += float(diff.sum())
    results: dict[str, dict[str, float]] = {}
    for spec in reference.outputs:
        st = stats[spec.name]
        n = max(st["count"], 1)
        if spec.role == "labels":
            agree = st["same"] / n
            results[spec.name] = {"agreement": agree}
            if not agree >= tolerance.min_label_agreement:
                failures.append(f"{spec.name}: {agree:.3%} of pixels agree "
                                f"(need {tolerance.min_label_agreement:.1%})")
            continue
        worst, mean = st["max"], st["sum"] / n
        results[spec.name] = {"max_abs_error": worst, "mean_abs_error": mean}
        if not (worst <= tolerance.max_abs and mean <= tolerance.mean_abs):  # NaN fails
            failures.append(f"{spec.name}: abs error max {worst:.3g}, mean {mean:.3g} "
                            f"(limits {tolerance.max_abs:g}, {tolerance.mean_abs:g})")
    return {
        "provider": provider,
        "passed": not failures,
        "failures": failures,
        "tolerance": dataclasses.asdict(tolerance),
        "inputs": [{"content": label, "batch": int(b.shape[0])} for label, b in batches],
        "outputs": results,
    }
