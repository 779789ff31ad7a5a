"""Procedurally rendered multi-task scenes: every label exact, nothing to download.

A pinhole camera at 1.3-2.2 m, pitched 8-30 degrees down, looks at a textured ground plane
with 2-6 objects 2.5-10 m away resting on it (footprints never overlap, nothing floats; an
object that finds no free spot in 30 draws is dropped). One vectorised ray cast per image
(numpy, no per-pixel Python loop) yields the image and all six labels:

- image: Lambert + ambient shading from a random sun, exact cast shadows (shadow rays),
  procedural textures (checker / stripes / value noise, random saturation and brightness
  per part), a sky gradient with clouds, distance haze. Each object class has a typical
  hue (``class_hue``, jittered by ``HUE_JITTER``), as real categories have a typical
  appearance: with no hub weights here the backbone starts random, and classes that
  differ only in shape are not learnable by frozen random features in a few CPU minutes.
  Ground and sky colours stay random, so colour alone never decides object vs background.
- semseg (``SCENE_CLASSES``): sky, ground and the five object classes.
- human_parts (``SCENE_PARTS``, "object parts"): two to four parts per class, background 0
  on sky and ground.
- saliency: object pixels (semseg >= 2) are 1, sky and ground 0.
- normals: true surface normals in the camera frame (x right, y up, z towards the camera);
  the ground's normal is (0, cos(pitch), sin(pitch)). Sky: all zero (no label).
- depth: z-depth along the optical axis in metres. Sky, and ground farther than
  ``MAX_DEPTH`` (rendered as sky), get 0 (no label).
- edge: 1-pixel occlusion boundaries between different instances (sky, ground, each
  object): a pixel is an edge when a 4-neighbour belongs to another instance and lies
  farther away (sky counts as infinitely far), so of each pair of pixels across a boundary
  exactly one, the occluding one, is marked. Boundaries between parts of one object are not
  edges.

Scene content depends only on the seed; the size only sets the pixel grid (labels are
sampled at pixel centres, without anti-aliasing). Sample ``i`` of split ``s`` uses
``scene_seed(base_seed, s, i)``, so splits never share a scene.

Shapes and the scene description are in ``geometry.py``; the datasets built on this
renderer in ``datasets.py``.

Speed (this project's 2-core AMD EPYC, one process, numpy only): 13-18 ms per 128x128
scene (1000 scenes in 13-18 s; the two cores render 2000 in well under a minute), about
130 ms per 512x512 scene. Measured with::

    python -c "import time; from faar.data.scenes import render_scene; t = time.perf_counter();
    [render_scene(s, (128, 128)) for s in range(1000)]; print(time.perf_counter() - t)"
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from .geometry import Box, Camera, Cone, Cylinder, Material, Primitive, Scene, Shape, Sphere, rotate_yaw

SCENE_CLASSES = ("sky", "ground", "sphere", "box", "cylinder", "cone", "figure")
SCENE_PARTS = (
    "background", "sphere_upper", "sphere_lower", "box_top", "box_side", "cylinder_top", "cylinder_side",
    "cone_tip", "cone_body", "figure_head", "figure_torso", "figure_arm", "figure_leg",
)
SCENE_TASKS = ("semseg", "human_parts", "saliency", "normals", "depth", "edge")
HUE_JITTER = 0.04  # spread of an object's hue around its class hue (the wheel is 1.0)
MAX_DEPTH = 40.0  # metres; ground beyond this is drawn as sky and has no depth/normal label

_CLS = {name: i for i, name in enumerate(SCENE_CLASSES)}
_PART = {name: i for i, name in enumerate(SCENE_PARTS)}
_SKY, _GROUND = 0, 1  # instance ids; objects are 2, 3, ...
_NOISE = 64  # side of the periodic value-noise lattice


# --- scene sampling -----------------------------------------------------------------------
def class_hue(cls: str) -> float:
    """The typical hue of an object class: the five classes evenly around the colour wheel."""
    objects = SCENE_CLASSES[2:]
    return objects.index(cls) / len(objects)


def _color(rng: np.random.Generator, hue: float | None = None) -> tuple[float, float, float]:
    """A random colour; with ``hue``, one from that hue's family (same number of draws either way)."""
    h = rng.random() if hue is None else (hue + rng.normal(0.0, HUE_JITTER)) % 1.0
    s, v = rng.uniform(0.3, 0.9), rng.uniform(0.35, 1.0)
    rgb = np.clip(np.abs((h * 6 + np.array([0.0, 4.0, 2.0])) % 6 - 3) - 1, 0, 1)
    return tuple(float(x) for x in v * (1 - s + s * rgb))


def _material(rng: np.random.Generator, hue: float | None = None) -> Material:
    return Material(_color(rng, hue), _color(rng, hue), str(rng.choice(["plain", "stripes", "checker", "noise"])),
                    float(rng.uniform(2.0, 8.0)))


def _object(rng: np.random.Generator, cls: str, x: float, z: float, size: float,
            inst: int) -> list[Primitive]:
    """The primitives of one object of class ``cls`` standing at (x, z); ``size`` ~ its radius."""
    yaw = float(rng.uniform(0, 2 * np.pi))
    c = _CLS[cls]

    def prim(shape: Shape, upper: str, lower: str, anchor: tuple[float, float, float]) -> Primitive:
        return Primitive(shape, c, inst, _PART[upper], _PART[lower], _material(rng, class_hue(cls)), anchor, yaw)

    if cls == "sphere":
        return [prim(Sphere((x, size, z), size), "sphere_upper", "sphere_lower", (x, size, z))]
    if cls == "box":
        half = (size * rng.uniform(0.55, 0.7), size * rng.uniform(0.4, 1.0), size * rng.uniform(0.55, 0.7))
        return [prim(Box((x, half[1], z), half, yaw), "box_top", "box_side", (x, 0.0, z))]
    if cls == "cylinder":
        r, h = size * rng.uniform(0.5, 0.8), size * rng.uniform(1.2, 3.0)
        return [prim(Cylinder(x, z, r, 0.0, h), "cylinder_top", "cylinder_side", (x, 0.0, z))]
    if cls == "cone":
        h = size * rng.uniform(1.5, 3.0)
        return [prim(Cone(x, z, size, h), "cone_tip", "cone_body", (x, 0.0, z))]
    # A standing figure 3 * size tall: two legs, torso, two arms, head.
    hgt = 3.0 * size
    side = rotate_yaw(np.array([1.0, 0.0, 0.0]), yaw)
    prims = []
    for offset, radius, y0, y1, part in ((0.08, 0.06, 0.0, 0.45, "figure_leg"),
                                         (0.195, 0.045, 0.45, 0.76, "figure_arm")):
        for sgn in (-1, 1):
            px, pz = x + sgn * offset * hgt * side[0], z + sgn * offset * hgt * side[2]
            prims.append(prim(Cylinder(px, pz, radius * hgt, y0 * hgt, y1 * hgt), part, part, (px, 0.0, pz)))
    prims.append(prim(Cylinder(x, z, 0.15 * hgt, 0.45 * hgt, 0.78 * hgt), "figure_torso", "figure_torso",
                      (x, 0.0, z)))
    head = (x, 0.87 * hgt, z)
    prims.append(prim(Sphere(head, 0.1 * hgt), "figure_head", "figure_head", head))
    return prims


def sample_scene(seed: int) -> Scene:
    """Draw a scene (camera, sun, objects, materials) from ``seed``; independent of image size."""
    rng = np.random.default_rng(seed)
    camera = Camera(height=rng.uniform(1.3, 2.2), pitch=np.radians(rng.uniform(8, 30)),
                    fov_y=np.radians(rng.uniform(45, 65)))
    azimuth, elevation = rng.uniform(0, 2 * np.pi), np.radians(rng.uniform(25, 70))
    light = np.array([np.cos(elevation) * np.cos(azimuth), np.sin(elevation),
                      np.cos(elevation) * np.sin(azimuth)])
    # Visible ground distances: from the bottom image row to the top row (or a far cap).
    near = camera.height / np.tan(camera.pitch + camera.fov_y / 2)
    top_angle = camera.pitch - camera.fov_y / 2
    far = min(8.0, camera.height / np.tan(top_angle)) if top_angle > 0.05 else 8.0
    placed: list[tuple[float, float, float]] = []
    primitives: list[Primitive] = []
    for _ in range(int(rng.integers(2, 7))):
        cls = str(rng.choice(SCENE_CLASSES[2:]))
        size = float(rng.uniform(0.45, 1.0))
        footprint = 1.1 * size
        for _attempt in range(30):
            dist = rng.uniform(max(2.5, near + 1.0), max(far, near + 3.0))
            x = dist * np.tan(rng.uniform(-0.4, 0.4) * camera.fov_y)
            if all(np.hypot(x - px, -dist - pz) > footprint + pr + 0.1 for px, pz, pr in placed):
                placed.append((x, -dist, footprint))
                primitives += _object(rng, cls, float(x), float(-dist), size, inst=2 + len(placed) - 1)
                break
    horizon = np.array(_color(rng)) * 0.3 + 0.7
    zenith = np.array([0.25, 0.45, 0.85]) * rng.uniform(0.7, 1.1)
    return Scene(camera=camera, light=light, ambient=float(rng.uniform(0.25, 0.45)),
                 primitives=tuple(primitives), ground=_material(rng),
                 sky=(tuple(horizon.tolist()), tuple(np.clip(zenith, 0, 1).tolist())),
                 noise=rng.random((_NOISE, _NOISE), dtype=np.float32))


# --- rendering -----------------------------------------------------------------------------
def _value_noise(lattice: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Smooth periodic noise in [0, 1] at lattice coordinates (u, v), two octaves."""
    flat = lattice.ravel()
    out = np.zeros(np.shape(u), dtype=np.float32)
    for scale, weight in ((1.0, 0.65), (2.7, 0.35)):
        uu, vv = (u * scale).astype(np.float32), (v * scale).astype(np.float32)
        fi, fj = np.floor(uu), np.floor(vv)
        fu, fv = uu - fi, vv - fj
        fu, fv = fu * fu * (3 - 2 * fu), fv * fv * (3 - 2 * fv)
        i0, j0 = fi.astype(np.int64) % _NOISE, fj.astype(np.int64) % _NOISE
        i1, j1 = (i0 + 1) % _NOISE, (j0 + 1) * _NOISE % (_NOISE * _NOISE)
        j0 = j0 * _NOISE
        top = flat[j0 + i0] * (1 - fu) + flat[j0 + i1] * fu
        bottom = flat[j1 + i0] * (1 - fu) + flat[j1 + i1] * fu
        out += weight * (top * (1 - fv) + bottom * fv)
    return out


def _pattern(mat: Material, local: np.ndarray, lattice: np.ndarray) -> np.ndarray:
    """Albedo (N, 3) of ``mat`` at local texture coordinates (N, 3), in metres."""
    f = mat.frequency
    x, y, z = local[:, 0], local[:, 1], local[:, 2]
    if mat.pattern == "stripes":
        m = (np.sin(2 * np.pi * f * y) > 0).astype(float)
    elif mat.pattern == "checker":
        m = ((np.floor(f * x) + np.floor(f * y) + np.floor(f * z)) % 2).astype(float)
    elif mat.pattern == "noise":
        m = _value_noise(lattice, f * (x + 0.6 * z), f * y)
    else:
        m = 0.25 * _value_noise(lattice, 3 * (x + 0.6 * z), 3 * y)
    return np.asarray(mat.color_a) * (1 - m[:, None]) + np.asarray(mat.color_b) * m[:, None]


def _window(shape: Shape, camera: Camera, origin: np.ndarray,
            size: tuple[int, int]) -> tuple[slice, slice] | None:
    """Pixel window holding the projection of the shape's bounding box (None if off screen)."""
    h, w = size
    lo, hi = shape.bounds()
    corners = np.array([[a, b, c] for a in (lo[0], hi[0]) for b in (lo[1], hi[1]) for c in (lo[2], hi[2])])
    cam = (corners - origin) @ camera.rotation()
    if (cam[:, 2] > -1e-3).any():
        return slice(0, h), slice(0, w)
    f = camera.focal(h)
    u = f * cam[:, 0] / -cam[:, 2] + w / 2
    v = -f * cam[:, 1] / -cam[:, 2] + h / 2
    u0, u1 = max(int(np.floor(u.min())), 0), min(int(np.ceil(u.max())) + 1, w)
    v0, v1 = max(int(np.floor(v.min())), 0), min(int(np.ceil(v.max())) + 1, h)
    return (slice(v0, v1), slice(u0, u1)) if u0 < u1 and v0 < v1 else None


def _swept_candidates(start: np.ndarray, light: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Which rays start + s * light (s >= 0) can meet the box [lo, hi]: inside it in x and z
    somewhere while crossing its height range (light[1] > 0)."""
    s0 = np.maximum(0.0, (lo[1] - start[:, 1]) / light[1])
    s1 = (hi[1] - start[:, 1]) / light[1]
    cand = s1 >= s0
    for axis in (0, 2):
        a, b = start[:, axis] + s0 * light[axis], start[:, axis] + s1 * light[axis]
        cand &= (np.minimum(a, b) <= hi[axis]) & (np.maximum(a, b) >= lo[axis])
    return cand


def _shadowed(scene: Scene, points: np.ndarray, normals: np.ndarray) -> np.ndarray:
    """Which surface points (N, 3) see no sun: exact shadow rays, culled per object, then per shape."""
    start = points + 1e-4 * normals
    dark = np.zeros(len(points), dtype=bool)
    objects: dict[int, list[Primitive]] = {}
    for prim in scene.primitives:
        objects.setdefault(prim.instance, []).append(prim)
    for prims in objects.values():
        bounds = [p.shape.bounds() for p in prims]
        lo, hi = np.min([b[0] for b in bounds], 0), np.max([b[1] for b in bounds], 0)
        idx = np.flatnonzero(_swept_candidates(start, scene.light, lo, hi) & ~dark)
        for prim, (plo, phi) in zip(prims, bounds, strict=True):
            idx_p = idx[_swept_candidates(start[idx], scene.light, plo, phi)]
            if len(idx_p):
                t, _, _ = prim.shape.hit(start[idx_p], scene.light)
                dark[idx_p[np.isfinite(t)]] = True
    return dark


def _edges(instance: np.ndarray, depth: np.ndarray) -> np.ndarray:
    """Occluding-side boundaries: pixels with a farther 4-neighbour of another instance."""
    far = np.where(instance == _SKY, np.inf, depth)
    edge = np.zeros(instance.shape, dtype=bool)
    for axis in (0, 1):
        n = instance.shape[axis]
        a = [slice(None)] * 2
        b = [slice(None)] * 2
        a[axis], b[axis] = slice(0, n - 1), slice(1, n)
        a, b = tuple(a), tuple(b)
        differ = instance[a] != instance[b]
        # Tie (equal depth, e.g. at a contact): the smaller instance id takes the edge.
        a_front = (far[a] < far[b]) | ((far[a] == far[b]) & (instance[a] < instance[b]))
        edge[a] |= differ & a_front
        edge[b] |= differ & ~a_front
    return edge


def _shade(scene: Scene, origin: np.ndarray, dirs: np.ndarray, t: np.ndarray, normal: np.ndarray,
           prim_id: np.ndarray, hit: np.ndarray) -> np.ndarray:
    """uint8 RGB image: textured Lambert + ambient with cast shadows and haze, sky elsewhere."""
    h, w = t.shape
    rays = dirs.reshape(-1, 3)
    rgb = np.empty((h * w, 3), dtype=np.float32)
    horizon = np.asarray(scene.sky[0], dtype=np.float32)
    zenith = np.asarray(scene.sky[1], dtype=np.float32)

    # Hit pixels grouped by primitive (ground = -1 first), in float32: shading needs no more.
    idx = np.flatnonzero(hit)
    pid = prim_id.ravel()[idx].astype(np.int16)
    order = np.argsort(pid, kind="stable")
    idx = idx[order]
    starts = np.searchsorted(pid[order], np.arange(-1, len(scene.primitives) + 1))
    depth = t.ravel()[idx].astype(np.float32)
    points = (origin + depth[:, None] * rays[idx]).astype(np.float32)
    normals = normal.reshape(-1, 3)[idx].astype(np.float32)
    albedo = np.empty((len(idx), 3), dtype=np.float32)
    gp = points[starts[0]:starts[1]]
    ground_uv = np.stack([gp[:, 0], gp[:, 2], 0 * gp[:, 0]], -1) * 0.25  # stripes run across the view
    albedo[starts[0]:starts[1]] = _pattern(scene.ground, ground_uv, scene.noise)
    for k, prim in enumerate(scene.primitives):
        group = slice(starts[k + 1], starts[k + 2])
        if group.start < group.stop:
            local = rotate_yaw(points[group] - np.asarray(prim.anchor, dtype=np.float32), -prim.yaw)
            albedo[group] = _pattern(prim.material, local, scene.noise)
    lambert = np.clip(normals @ scene.light.astype(np.float32), 0.0, 1.0)
    facing = lambert > 0
    lambert[facing] *= ~_shadowed(scene, points[facing], normals[facing])
    haze = (1 - np.exp(-depth / (2.5 * MAX_DEPTH)))[:, None]
    rgb[idx] = albedo * (scene.ambient + (1 - scene.ambient) * lambert)[:, None] * (1 - haze) + horizon * haze

    idx = np.flatnonzero(~hit)
    unit = rays[idx].astype(np.float32)
    unit /= np.linalg.norm(unit, axis=-1, keepdims=True)
    elevation = (np.clip(unit[:, 1], 0, 1) ** 0.6)[:, None]
    lift = np.maximum(unit[:, 1], 0) + 0.15  # project the sky onto a cloud layer
    cloud = np.clip((_value_noise(scene.noise, unit[:, 0] / lift, unit[:, 2] / lift) - 0.55) * 3, 0, 1)
    cloud = (cloud * (unit[:, 1] > 0))[:, None]
    rgb[idx] = (horizon * (1 - elevation) + zenith * elevation) * (1 - cloud) + 0.95 * cloud
    return np.clip(rgb * 255 + 0.5, 0, 255).astype(np.uint8).reshape(h, w, 3)


def render(scene: Scene, size: Sequence[int]) -> dict[str, Any]:
    """Ray-cast ``scene`` at ``size`` (H, W): raw image and all labels (module docstring)."""
    h, w = int(size[0]), int(size[1])
    cam = scene.camera
    rot = cam.rotation()
    origin = np.array([0.0, cam.height, 0.0])
    f = cam.focal(h)
    u = (np.arange(w) + 0.5 - w / 2) / f
    v = -(np.arange(h) + 0.5 - h / 2) / f
    # Unnormalised directions with camera z = -1, so the ray parameter t is the z-depth.
    dirs = np.stack(np.broadcast_arrays(u[None, :], v[:, None], -1.0), -1) @ rot.T

    t = np.full((h, w), np.inf)
    normal = np.zeros((h, w, 3))
    prim_id = np.full((h, w), -1)
    upper = np.zeros((h, w), dtype=bool)
    for k, prim in enumerate(scene.primitives):
        win = _window(prim.shape, cam, origin, (h, w))
        if win is None:
            continue
        tk, nk, up = prim.shape.hit(origin, dirs[win])
        closer = tk < t[win]
        t[win][closer], normal[win][closer], prim_id[win][closer], upper[win][closer] = (
            tk[closer], nk[closer], k, up[closer])
    with np.errstate(divide="ignore"):
        t_ground = np.where(dirs[..., 1] < 0, -cam.height / dirs[..., 1], np.inf)
    ground = (prim_id < 0) & (t_ground <= MAX_DEPTH)
    t[ground] = t_ground[ground]
    normal[ground] = (0.0, 1.0, 0.0)
    hit = (prim_id >= 0) | ground

    prims = scene.primitives
    lut = np.array([[p.cls, p.instance, p.part_upper, p.part_lower] for p in prims] + [[0, 0, 0, 0]]).T
    semseg = np.where(ground, _CLS["ground"], lut[0][prim_id]).astype(np.uint8)
    semseg[~hit] = _CLS["sky"]
    instance = np.where(ground, _GROUND, lut[1][prim_id])
    instance[~hit] = _SKY
    parts = np.where(prim_id >= 0, np.where(upper, lut[2][prim_id], lut[3][prim_id]), 0).astype(np.uint8)
    depth = np.where(hit, t, 0.0)
    return {
        "image": _shade(scene, origin, dirs, t, normal, prim_id, hit),
        "semseg": semseg,
        "human_parts": parts,
        "saliency": (semseg >= _CLS["sphere"]).astype(np.float32),  # the object classes
        "normals": (normal @ rot).astype(np.float32) * hit[..., None],
        "depth": depth.astype(np.float32),
        "edge": _edges(instance, depth).astype(np.float32),
    }


def render_scene(seed: int, size: Sequence[int] = (128, 128)) -> dict[str, Any]:
    """The raw sample (image, all six labels, meta) of the scene drawn from ``seed``."""
    out = render(sample_scene(seed), size)
    out["meta"] = {"name": f"scene_{seed}", "size": (int(size[0]), int(size[1]))}
    return out


def scene_seed(base_seed: int, split: str, index: int) -> int:
    """Seed of sample ``index`` of ``split``: independent streams per (base seed, split)."""
    seq = np.random.SeedSequence([base_seed, zlib.crc32(split.encode()), index])
    return int(seq.generate_state(1, np.uint64)[0])
