"""ONNX Runtime sessions: which execution providers to ask for, with which options, and what
a session really got. Used by the embedded engine and by faar-export's parity gate, so the
gate checks the graph under the settings that serve it; imports only onnxruntime.

Decisions:

* ``device``: ``cpu``; ``cuda`` (CUDA or an error, never a silent CPU); ``auto`` (CUDA when
  this onnxruntime build has it, else the CPU, with a warning if CUDA failed to start).
* ``--device cuda`` also switches off ONNX Runtime's run-time fall-back (its Python
  ``InferenceSession.run`` retries on the CPU after an ``EPFail`` and stays there), so a
  CUDA failure is an error instead of a slow server that says nothing; ``auto`` keeps it,
  and ``running_provider`` reads what runs now.
* TF32 is off unless asked for: ONNX Runtime's CUDA provider turns it on by default on
  Ampere and newer (``bool use_tf32{true}`` in
  ``onnxruntime/core/providers/cuda/cuda_execution_provider_info.h``), rounding fp32
  MatMul/Conv inputs to 10-bit mantissas. Off, a GPU computes what the parity gate checked.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import onnxruntime as ort

log = logging.getLogger("faar_serve")
CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"


class ProviderError(RuntimeError):
    """The execution provider asked for is not there or did not start."""


def providers_for(device: str, tf32: bool = False) -> list[Any]:
    """Execution providers for ``device`` (auto: CUDA when this onnxruntime build has it)."""
    available = ort.get_available_providers()
    if device == "cuda" and CUDA not in available:
        raise ProviderError(f"device cuda, but this onnxruntime ({ort.__version__}) has no {CUDA}; "
                            "install onnxruntime-gpu (and a CUDA runtime) or use the CPU")
    if device == "cpu" or CUDA not in available:
        return [CPU]
    # Device 0 of what CUDA_VISIBLE_DEVICES shows; HEURISTIC avoids a slow cuDNN search at first run.
    # The CPU provider stays for nodes without a CUDA kernel (e.g. DFT).
    return [(CUDA, {"device_id": 0, "cudnn_conv_algo_search": "HEURISTIC", "use_tf32": int(tf32)}), CPU]


def create_session(path: str | Path, device: str, spin_wait: bool = False, tf32: bool = False,
                   threads: int = 0) -> ort.InferenceSession:
    """A session with the best measured settings (bench/RESULTS.md): every graph optimisation,
    intra-op threads = cores (or ``threads``), sequential execution. ``spin_wait`` lets the CPU threads
    busy-wait between operators: faster alone, but in the gateway they take the cores that
    decode and encode other requests (up to a fifth of the throughput under load for a small model,
    no clear difference for Swin-T)."""
    providers = providers_for(device, tf32)
    wanted_cuda = providers[0] != CPU
    if wanted_cuda:
        ort.preload_dlls()  # CUDA/cuDNN of the nvidia-* wheels (onnxruntime-gpu[cuda,cudnn]) or the system
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin_wait else "0")
    options.intra_op_num_threads = threads  # 0: ONNX Runtime's default, one per core
    session = ort.InferenceSession(str(path), options, providers=providers)
    if wanted_cuda and CUDA not in session.get_providers():
        # onnxruntime-gpu falls back to the CPU when CUDA/cuDNN libraries are missing, saying so only in its log.
        if device == "cuda":
            raise ProviderError(f"{CUDA} failed to initialise (CUDA/cuDNN libraries?); see onnxruntime's log")
        log.warning("CUDA provider failed to initialise; running on the CPU")
    if device == "cuda":
        session.disable_fallback()  # a CUDA failure in run() is an error, not a silent switch to the CPU
    return session


def running_provider(session: ort.InferenceSession) -> str:
    """The provider that runs the session's nodes first now (ONNX Runtime may have fallen back)."""
    return session.get_providers()[0]
