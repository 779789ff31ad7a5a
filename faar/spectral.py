"""The Task-Spectral Pyramidal Decoder's spectral parts: 2-D DFT, CW-SP and XT-Cons.

Spectra are carried as (real, imag) pairs of real tensors so that one code path
serves both DFT backends:

* ``"torch"``: ``torch.fft.rfft2`` / ``irfft2`` (exports to ONNX ``DFT``);
* ``"matmul"``: the same transforms as products with constant cos/sin matrices for a
  fixed feature size; exports to plain MatMul, which every ONNX Runtime execution
  provider and TensorRT run (ONNX Runtime's DFT has no CUDA kernel).

CW-SP comes in two forms (``decoder.spectral_filter``):

* ``"channel"`` (default, as published): every channel of every task has its own filter,
  and the filtered signal is added to the input through a learned scale, as FAAR's
  release does (``x + alpha * SSF(IDFT(W * DFT(x)))``, SSF the per-channel scale and
  shift). The filter is a real gain per frequency bin (zero phase, as the release's) and
  is mirror-symmetric: one gain per ``(|fy|, |fx|)``, stored as ``(H//2+1, W//2+1)`` per
  channel, so it commutes with horizontal and vertical flips as the release's radial
  filter does, without tying all bins of one radius together. On Swin-T PASCAL that is
  150,456 TS-PD parameters (model.py's ``parameter_summary``; the paper quotes about 156k).
* ``"shared"``: one complex filter on the one-sided spectrum per task and level, shared
  by the task's channels, then the per-channel scale and shift and no residual
  (``SSF(IDFT(W * DFT(x)))``; 20,336 parameters on Swin-T PASCAL).

Decisions where the paper is open (FAAR_METHOD.md):

* Both forms start as the identity, so the head starts as plain HRNet: the channel form
  with ``alpha = 0`` (gains 1, scale 1, shift 0), the shared form with filter 1+0j,
  scale 1, shift 0. XT-Cons starts with ``a_low = a_high = 0``.
* ``M_low`` / ``M_high`` are fixed radial masks over the primary task's frequency grid
  (normalised radius below / above ``low_freq_radius``), not thresholds on magnitudes:
  a magnitude threshold flips bins under float error and breaks export parity.
* CW-SP and XT-Cons share one forward and one inverse transform per task; XT-Cons acts
  inside the filtered signal:
  ``Y = IDFT(W_t * F_t + a_low M_low (F_avg - F_t) + a_high M_high (F_avg - F_t))``.
* A model built for one size can be resized: filters are resampled by frequency
  (``set_size``), so training at 448 and serving at 512 is one call. Resampling grids
  are built on the filter's device, so a CUDA model resizes in place.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

FFTBackend = Literal["torch", "matmul"]
SpectralFilter = Literal["channel", "shared"]


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


def _resample(values: torch.Tensor, pos_y: torch.Tensor, pos_x: torch.Tensor) -> torch.Tensor:
    """Bilinear read of ``values`` (N, Hs, Ws) at fractional indices ``pos_y`` x ``pos_x``."""
    hs, ws = values.shape[-2:]
    gy = 2 * pos_y / max(hs - 1, 1) - 1
    gx = 2 * pos_x / max(ws - 1, 1) - 1
    grid = torch.stack(torch.meshgrid(gx, gy, indexing="xy"), -1)[None].to(values.dtype)
    return F.grid_sample(values[None], grid, mode="bilinear", padding_mode="border", align_corners=True)[0]


def resample_filter(filt: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resample a (2, H, W//2+1) rfft2-domain filter (the shared form) to another spatial size.

    Each new bin reads the old filter at the same normalised frequency (bilinear,
    clamped at the old band edge), so DC maps to DC and low to low.
    """
    h_old, wf_old = filt.shape[-2:]
    h, w = size
    opts = {"dtype": torch.float64, "device": filt.device}
    # signed H frequency -> position in the fftshift-ed old grid; W frequency -> old bin
    pos_y = (torch.fft.fftfreq(h, **opts) * h_old + h_old // 2).clamp(0, h_old - 1)
    pos_x = (torch.fft.rfftfreq(w, **opts) * (2 * (wf_old - 1))).clamp(0, wf_old - 1)
    return _resample(torch.fft.fftshift(filt, dim=-2), pos_y, pos_x)


def symmetric_grid(size: tuple[int, int]) -> tuple[int, int]:
    """Storage of a mirror-symmetric filter for (H, W): one gain per (|fy|, |fx|)."""
    return size[0] // 2 + 1, size[1] // 2 + 1


def mirror_rows(h: int) -> torch.Tensor:
    """For each rfft2 row (frequency index 0..H-1), the stored row of |fy|."""
    k = torch.arange(h)
    return torch.minimum(k, h - k)


def resample_symmetric_filter(filt: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resample a (..., H//2+1, W//2+1) mirror-symmetric filter (the channel form) to another size.

    Rows and columns hold frequencies 0..1/2 of the old size; each new one reads the old
    filter at the same normalised frequency (bilinear, clamped at the old band edge).
    """
    hs_old, ws_old = filt.shape[-2:]
    hs, ws = symmetric_grid(size)
    opts = {"dtype": torch.float64, "device": filt.device}
    pos_y = (torch.arange(hs, **opts) / size[0] * 2 * (hs_old - 1)).clamp(0, hs_old - 1)
    pos_x = (torch.arange(ws, **opts) / size[1] * 2 * (ws_old - 1)).clamp(0, ws_old - 1)
    lead = filt.shape[:-2]
    return _resample(filt.reshape(-1, hs_old, ws_old), pos_y, pos_x).reshape(*lead, hs, ws)


class TaskSpectralBlock(nn.Module):
    """CW-SP for every task at one resolution, with optional XT-Cons across tasks.

    Input and output: a list with one (B, C, H, W) map per task. ``filters`` is
    (tasks, C, H//2+1, W//2+1) real gains in the channel form, (tasks, 2, H, W//2+1)
    complex (re, im) in the shared form.
    """

    def __init__(self, num_tasks: int, channels: int, size: tuple[int, int], backend: FFTBackend = "torch",
                 xt_cons: bool = True, low_freq_radius: float = 0.25, form: SpectralFilter = "channel") -> None:
        super().__init__()
        if form not in ("channel", "shared"):
            raise ValueError(f"spectral filter form must be 'channel' or 'shared', got {form!r}")
        self.num_tasks = num_tasks
        self.form: SpectralFilter = form
        self.xt_cons = xt_cons and num_tasks > 1
        self.low_freq_radius = low_freq_radius
        self.dft = DFT2(size, backend)
        h, w = size
        if form == "channel":
            self.filters = nn.Parameter(torch.ones(num_tasks, channels, *symmetric_grid(size)))
            self.alpha = nn.Parameter(torch.zeros(num_tasks))
            self.register_buffer("rows", mirror_rows(h), persistent=False)
        else:
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
        return f"tasks={self.num_tasks}, size={self.dft.size}, form={self.form}, xt_cons={self.xt_cons}"

    @torch.no_grad()
    def set_size(self, size: tuple[int, int]) -> None:
        """Rebuild the transform for a new feature size, resampling the learned filters."""
        size = (int(size[0]), int(size[1]))
        if size == self.dft.size:
            return
        device = self.filters.device
        if self.form == "channel":
            self.filters.data = resample_symmetric_filter(self.filters.data, size)
            self.rows = mirror_rows(size[0]).to(device)
        else:
            self.filters.data = torch.stack([resample_filter(f, size) for f in self.filters.data])
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

    def _filter(self, t: int, re: torch.Tensor, im: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """CW-SP: task ``t``'s filter times its spectrum."""
        if self.form == "channel":
            gain = self.filters[t].index_select(-2, self.rows)  # (C, H, W//2+1)
            return re * gain, im * gain
        fr, fi = self.filters[t, 0], self.filters[t, 1]
        return re * fr - im * fi, re * fi + im * fr

    def _forward(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        spectra = [self.dft(f) for f in feats]
        if self.xt_cons:
            sum_re = torch.stack([s[0] for s in spectra]).sum(0)
            sum_im = torch.stack([s[1] for s in spectra]).sum(0)
            low = self.low_mask
            high = 1.0 - low
        out = []
        for t, (re, im) in enumerate(spectra):
            gr, gi = self._filter(t, re, im)
            if self.xt_cons:
                n_other = self.num_tasks - 1
                dr = (sum_re - re) / n_other - re
                di = (sum_im - im) / n_other - im
                mix = self.alpha_low[t] * low + self.alpha_high[t] * high
                gr = gr + mix * dr
                gi = gi + mix * di
            y = self.dft.inverse(gr, gi)
            y = y * self.scale[t][None, :, None, None] + self.shift[t][None, :, None, None]
            if self.form == "channel":
                y = feats[t] + self.alpha[t] * y
            out.append(y.to(feats[t].dtype))
        return out
