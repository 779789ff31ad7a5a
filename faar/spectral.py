"""The Task-Spectral Pyramidal Decoder's spectral parts: 2-D DFT, CW-SP and XT-Cons.

Spectra are carried as (real, imag) pairs of real tensors so that one code path
serves both DFT backends:

* ``"torch"``: ``torch.fft.rfft2`` / ``irfft2`` (exports to ONNX ``DFT``);
* ``"matmul"``: the same transforms as products with constant cos/sin matrices for a
  fixed feature size; exports to plain MatMul, which every ONNX Runtime execution
  provider and TensorRT run (ONNX Runtime's DFT has no CUDA kernel).

Decisions where the paper is open (FAAR_METHOD.md):

* Filters act on the one-sided (``rfft2``) spectrum, are complex, and are shared by the
  channels of a task at a resolution (one ``H x (W//2+1)`` filter per task and
  resolution) followed by a per-channel scale and shift. They start at 1+0j, scale 1,
  shift 0: an untrained TS-PD is the identity and the head starts as plain HRNet.
* ``M_low`` / ``M_high`` are fixed radial masks over the primary task's frequency grid
  (normalised radius below / above ``low_freq_radius``), not thresholds on magnitudes:
  a magnitude threshold flips bins under float error and breaks export parity.
* CW-SP and XT-Cons share one forward and one inverse transform per task:
  ``X' = scale * IDFT(W_t * F_t + a_low M_low (F_avg - F_t) + a_high M_high (F_avg - F_t)) + shift``
  with ``a_low = a_high = 0`` at the start.
* A model built for one size can be resized: filters are resampled on the centred
  frequency grid (``set_size``), so training at 448 and serving at 512 is one call.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

FFTBackend = Literal["torch", "matmul"]


def _dft_mats(n: int, dtype: torch.dtype, device: torch.device | None) -> tuple[torch.Tensor, torch.Tensor]:
    k = torch.arange(n, dtype=torch.float64)
    ang = 2 * math.pi * torch.outer(k, k) / n
    return ang.cos().to(dtype=dtype, device=device), ang.sin().to(dtype=dtype, device=device)


class DFT2(nn.Module):
    """Real 2-D DFT and its inverse for fixed (H, W), in either backend.

    The matmul form: along W a real DFT to W//2+1 bins, along H a full complex DFT.
    The inverse along W weights bins by Hermitian symmetry (1 for DC and Nyquist,
    2 otherwise) and ignores their imaginary parts, exactly as ``irfft`` does.
    """

    def __init__(self, size: tuple[int, int], backend: FFTBackend = "torch") -> None:
        super().__init__()
        if backend not in ("torch", "matmul"):
            raise ValueError(f"fft backend must be 'torch' or 'matmul', got {backend!r}")
        self.backend: FFTBackend = backend
        self.size = (int(size[0]), int(size[1]))
        h, w = self.size
        wf = w // 2 + 1
        ch, sh = _dft_mats(h, torch.float32, None)
        cw, sw = _dft_mats(w, torch.float32, None)
        # forward along W (x @ M): (W, Wf); inverse along W: (Wf, W) with Hermitian weights
        herm = torch.full((wf,), 2.0)
        herm[0] = 1.0
        if w % 2 == 0:
            herm[-1] = 1.0
        persistent = False
        self.register_buffer("cw", cw[:, :wf].contiguous(), persistent)
        self.register_buffer("sw", sw[:, :wf].contiguous(), persistent)
        self.register_buffer("icw", (cw[:wf] * herm[:, None] / w).contiguous(), persistent)
        self.register_buffer("isw", (sw[:wf] * herm[:, None] / w).contiguous(), persistent)
        self.register_buffer("ch", ch, persistent)
        self.register_buffer("sh", sh, persistent)

    def extra_repr(self) -> str:
        return f"size={self.size}, backend={self.backend}"

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Real (..., H, W) -> spectrum (re, im), each (..., H, W//2+1)."""
        if self.backend == "torch":
            spec = torch.fft.rfft2(x.float())
            return spec.real, spec.imag
        x = x.float()
        xr = x @ self.cw
        xi = -(x @ self.sw)
        # (C - iS) @ (xr + i xi) along H
        re = self.ch @ xr + self.sh @ xi
        im = self.ch @ xi - self.sh @ xr
        return re, im

    def inverse(self, re: torch.Tensor, im: torch.Tensor) -> torch.Tensor:
        """Spectrum (re, im) -> real (..., H, W)."""
        h, w = self.size
        if self.backend == "torch":
            return torch.fft.irfft2(torch.complex(re, im), s=(h, w))
        # (C + iS)/H @ (re + i im) along H
        yr = (self.ch @ re - self.sh @ im) / h
        yi = (self.ch @ im + self.sh @ re) / h
        return yr @ self.icw - yi @ self.isw


def radial_low_mask(size: tuple[int, int], radius: float) -> torch.Tensor:
    """1 where the normalised frequency radius of an rfft2 bin is below ``radius``."""
    h, w = size
    fy = torch.fft.fftfreq(h).abs()[:, None] * 2  # in [0, 1]
    fx = torch.fft.rfftfreq(w)[None, :] * 2
    return ((fy**2 + fx**2).sqrt() < radius).float()


def resample_filter(filt: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resample a (2, H, W//2+1) rfft2-domain filter to another spatial size.

    Each new bin reads the old filter at the same normalised frequency (bilinear,
    clamped at the old band edge), so DC maps to DC and low to low.
    """
    h_old, wf_old = filt.shape[-2:]
    h, w = size
    # signed H frequency -> position in the fftshift-ed old grid; W frequency -> old bin
    pos_y = (torch.fft.fftfreq(h, dtype=torch.float64) * h_old + h_old // 2).clamp(0, h_old - 1)
    pos_x = (torch.fft.rfftfreq(w, dtype=torch.float64) * (2 * (wf_old - 1))).clamp(0, wf_old - 1)
    gy = 2 * pos_y / max(h_old - 1, 1) - 1
    gx = 2 * pos_x / max(wf_old - 1, 1) - 1
    grid = torch.stack(torch.meshgrid(gx, gy, indexing="xy"), -1)[None].to(filt.dtype)
    centred = torch.fft.fftshift(filt, dim=-2)[None]
    return F.grid_sample(centred, grid, mode="bilinear", padding_mode="border", align_corners=True)[0]


class TaskSpectralBlock(nn.Module):
    """CW-SP for every task at one resolution, with optional XT-Cons across tasks.

    Input and output: a list with one (B, C, H, W) map per task.
    """

    def __init__(self, num_tasks: int, channels: int, size: tuple[int, int], backend: FFTBackend = "torch",
                 xt_cons: bool = True, low_freq_radius: float = 0.25) -> None:
        super().__init__()
        self.num_tasks = num_tasks
        self.xt_cons = xt_cons and num_tasks > 1
        self.low_freq_radius = low_freq_radius
        self.dft = DFT2(size, backend)
        h, w = size
        filt = torch.zeros(num_tasks, 2, h, w // 2 + 1)
        filt[:, 0] = 1.0
        self.filters = nn.Parameter(filt)
        self.scale = nn.Parameter(torch.ones(num_tasks, channels))
        self.shift = nn.Parameter(torch.zeros(num_tasks, channels))
        if self.xt_cons:
            self.alpha_low = nn.Parameter(torch.zeros(num_tasks))
            self.alpha_high = nn.Parameter(torch.zeros(num_tasks))
        self.register_buffer("low_mask", radial_low_mask(size, low_freq_radius), persistent=False)

    def extra_repr(self) -> str:
        return f"tasks={self.num_tasks}, size={self.dft.size}, xt_cons={self.xt_cons}"

    @torch.no_grad()
    def set_size(self, size: tuple[int, int]) -> None:
        """Rebuild the transform for a new feature size, resampling the learned filters."""
        size = (int(size[0]), int(size[1]))
        if size == self.dft.size:
            return
        self.filters.data = torch.stack([resample_filter(f, size) for f in self.filters.data])
        device = self.filters.device
        self.dft = DFT2(size, self.dft.backend).to(device)
        self.low_mask = radial_low_mask(size, self.low_freq_radius).to(device)

    def set_backend(self, backend: FFTBackend) -> None:
        self.dft = DFT2(self.dft.size, backend).to(self.filters.device)

    def forward(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        device_type = feats[0].device.type
        if torch.is_autocast_enabled(device_type):
            # spectra stay in float32 under AMP (half-precision FFTs lose the filter's detail)
            with torch.autocast(device_type, enabled=False):
                return [y.to(feats[0].dtype) for y in self._forward([f.float() for f in feats])]
        return self._forward(feats)

    def _forward(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        dtype = feats[0].dtype
        spectra = [self.dft(f) for f in feats]
        if self.xt_cons:
            sum_re = torch.stack([s[0] for s in spectra]).sum(0)
            sum_im = torch.stack([s[1] for s in spectra]).sum(0)
            low = self.low_mask
            high = 1.0 - low
        out = []
        for t, (re, im) in enumerate(spectra):
            fr, fi = self.filters[t, 0], self.filters[t, 1]
            gr = re * fr - im * fi
            gi = re * fi + im * fr
            if self.xt_cons:
                n_other = self.num_tasks - 1
                dr = (sum_re - re) / n_other - re
                di = (sum_im - im) / n_other - im
                mix = self.alpha_low[t] * low + self.alpha_high[t] * high
                gr = gr + mix * dr
                gi = gi + mix * di
            y = self.dft.inverse(gr, gi)
            y = y * self.scale[t][None, :, None, None] + self.shift[t][None, :, None, None]
            out.append(y.to(dtype))
        return out
