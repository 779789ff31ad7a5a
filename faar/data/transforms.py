"""Raw multi-task sample (numpy, native size) -> network-ready tensors, with augmentation.

Raw conventions (what every dataset's ``raw(i)`` returns):
    image            uint8 (H, W, 3) RGB
    semseg, parts    integer (H, W) class ids, 255 = ignore
    saliency, edge   float32 (H, W) in {0, 1}, 255 = ignore
    normals          float32 (H, W, 3) unit vectors, camera frame x right / y up / z towards the
                     camera; all-zero = no label
    depth            float32 (H, W) metres along the optical axis; 0 = no label
    meta             {"name": str, "size": (H, W)}

Augmentation follows the MTI-Net/MTLoRA training pipeline (random horizontal flip, random
scale in [0.75, 1.25] and rotation about the image centre, then a fixed resize), but all
geometric steps are composed into one affine map and resampled once with ``grid_sample``:
images bilinear, label maps nearest, normals and depth bilinear over valid pixels only.

Decisions (written down because the references leave them implicit or get them wrong):
- Rotation by ``angle`` degrees turns the image content counter-clockwise as displayed (like
  ``cv2.getRotationMatrix2D``). This equals rolling the camera about its optical axis, so the
  normals' (x, y) components rotate counter-clockwise by the same angle in our y-up frame.
  (MTLoRA's ScaleNRotate rotates them the other way for y-up normals.)
- A horizontal flip mirrors the world: normals' x component is negated.
- Zooming in by ``scale`` is treated as the scene coming ``scale`` times closer, so depth is
  divided by ``scale`` (MTLoRA's rule); this keeps apparent size and depth consistent for a
  network that assumes fixed intrinsics. Normals do not change under a zoom or a resize (both
  only change the intrinsics).
- Pixels that the warp brings in from outside the source: image = ImageNet mean colour (0 after
  normalisation), label maps 255 (ignore), normals zero and depth 0 (no label).
- Normals and depth are interpolated only from valid neighbours: a pixel stays labelled where
  at least half the bilinear weight falls on labelled pixels, then normals are renormalised.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..losses import IGNORE_INDEX
from ..tasks import get_task

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Augmentation:
    """One draw of the random geometric augmentation; the default is the identity."""

    flip: bool = False
    scale: float = 1.0
    angle: float = 0.0  # degrees, counter-clockwise as displayed


def sample_augmentation(generator: torch.Generator | None = None, scales: tuple[float, float] = (0.75, 1.25),
                        max_angle: float = 20.0) -> Augmentation:
    """Draw flip (p=0.5), scale ~ U(scales) and angle ~ U(-max_angle, max_angle) from ``generator``."""
    u = torch.rand(3, generator=generator).tolist()
    return Augmentation(flip=u[0] < 0.5, scale=scales[0] + (scales[1] - scales[0]) * u[1],
                        angle=max_angle * (2.0 * u[2] - 1.0))


def unit_normals(normals: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """Normalise (..., 3) vectors to unit length; near-zero vectors become exactly zero (no label)."""
    norm = np.linalg.norm(normals, axis=-1, keepdims=True)
    return np.where(norm > eps, normals / np.maximum(norm, eps), 0.0).astype(np.float32)


def _sampling_grid(src_hw: tuple[int, int], out_hw: tuple[int, int], aug: Augmentation) -> torch.Tensor:
    """grid_sample grid (1, Ho, Wo, 2): for each output pixel, where it comes from in the source.

    Forward map in centred, y-down source pixel units: q = s * R(angle) * Flip * p, then a
    per-axis resize to the output size. The grid is its inverse, normalised for
    ``align_corners=False``.
    """
    (h, w), (ho, wo) = src_hw, out_hw
    qy = (torch.arange(ho, dtype=torch.float64) + 0.5) * (h / ho) - h / 2
    qx = (torch.arange(wo, dtype=torch.float64) + 0.5) * (w / wo) - w / 2
    qy, qx = torch.meshgrid(qy, qx, indexing="ij")
    c, s = math.cos(math.radians(aug.angle)), math.sin(math.radians(aug.angle))
    # Counter-clockwise as displayed is [[c, s], [-s, c]] in y-down coordinates; invert it.
    px = (c * qx - s * qy) / aug.scale
    py = (s * qx + c * qy) / aug.scale
    if aug.flip:
        px = -px
    return torch.stack([px / (w / 2), py / (h / 2)], dim=-1).unsqueeze(0).float()


def _rotate_normals(normals: torch.Tensor, aug: Augmentation) -> torch.Tensor:
    """Apply the flip and the in-plane rotation to (3, H, W) normals in the y-up camera frame."""
    nx, ny, nz = normals.unbind(0)
    if aug.flip:
        nx = -nx
    c, s = math.cos(math.radians(aug.angle)), math.sin(math.radians(aug.angle))
    return torch.stack([c * nx - s * ny, s * nx + c * ny, nz])


def transform_sample(raw: Mapping[str, Any], size: tuple[int, int],
                     aug: Augmentation = Augmentation()) -> dict[str, Any]:
    """Warp a raw sample by ``aug``, resize to ``size`` (H, W) and convert to tensors.

    Every key but ``image`` and ``meta`` must be a task name from ``faar.tasks``; its kind's
    ``resample`` rule decides how it is resampled.
    """
    image = torch.tensor(raw["image"]).permute(2, 0, 1).float() / 255.0
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    src_hw = (image.shape[1], image.shape[2])
    grid = _sampling_grid(src_hw, size, aug)
    outside = (grid[0].abs() > 1).any(-1)

    # Continuous channels in one bilinear call; discrete ones in one nearest call.
    smooth = [(image - mean) / std]
    discrete: list[torch.Tensor] = []
    tasks = [k for k in raw if k not in ("image", "meta")]
    for name in tasks:
        value = torch.tensor(raw[name], dtype=torch.float32)
        if value.shape[:2] != src_hw:
            raise ValueError(f"'{name}' is {tuple(value.shape[:2])}, image is {src_hw}")
        rule = get_task(name).rules.resample
        if rule == "normals":
            value = value.permute(2, 0, 1)
            smooth += [value, (value.abs().sum(0, keepdim=True) > 0).float()]
        elif rule == "depth":
            valid = (value > 0).float()[None]
            smooth += [value[None] * valid, valid]
        else:
            discrete.append(value[None])

    warped_smooth = F.grid_sample(torch.cat(smooth)[None], grid, mode="bilinear", padding_mode="zeros",
                                  align_corners=False)[0]
    warped_discrete = (F.grid_sample(torch.cat(discrete)[None], grid, mode="nearest", padding_mode="zeros",
                                     align_corners=False)[0] if discrete else None)

    out: dict[str, Any] = {"image": warped_smooth[:3].contiguous()}
    i, j = 3, 0
    for name in tasks:
        rule = get_task(name).rules.resample
        if rule == "normals":
            vec, weight = warped_smooth[i:i + 3], warped_smooth[i + 3:i + 4]
            i += 4
            vec = F.normalize(_rotate_normals(vec, aug), dim=0, eps=1e-6)
            out[name] = torch.where(weight >= 0.5, vec, torch.zeros_like(vec)).contiguous()
        elif rule == "depth":
            num, weight = warped_smooth[i:i + 1], warped_smooth[i + 1:i + 2]
            i += 2
            depth = num / weight.clamp(min=1e-6) / aug.scale
            out[name] = torch.where(weight >= 0.5, depth, torch.zeros_like(depth)).contiguous()
        else:
            value = warped_discrete[j:j + 1].masked_fill(outside[None], IGNORE_INDEX)
            j += 1
            out[name] = value[0].round().long() if rule == "classes" else value.contiguous()
    meta = raw["meta"]
    out["meta"] = {"name": str(meta["name"]), "size": tuple(int(v) for v in meta["size"])}
    return out
