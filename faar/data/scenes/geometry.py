"""Ray-casting geometry for the generated scenes: four primitive shapes and the scene description.

Every ``hit`` is vectorised over rays (numpy, no per-pixel Python loop) and returns the
ray parameter (``inf`` for a miss), the world normal and an "upper part" flag, from which
the renderer (``render.py``) labels parts. World frame: x right, y up, z backwards.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

_EPS = 1e-6


def rotate_yaw(v: np.ndarray, angle: float) -> np.ndarray:
    """Rotate (..., 3) vectors by ``angle`` about the world's up (y) axis."""
    c, s = np.cos(angle), np.sin(angle)
    x, y, z = v[..., 0], v[..., 1], v[..., 2]
    return np.stack(np.broadcast_arrays(c * x + s * z, y, -s * x + c * z), -1)


def _quadratic_roots(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both roots of a t^2 + 2 b t + c = 0 (nan where none), smaller first when a > 0."""
    with np.errstate(invalid="ignore", divide="ignore"):
        root = np.sqrt(b * b - a * c)
        return (-b - root) / a, (-b + root) / a


@dataclass(frozen=True)
class Sphere:
    center: tuple[float, float, float]
    radius: float

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        c = np.asarray(self.center)
        return c - self.radius, c + self.radius

    def hit(self, o: np.ndarray, d: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Ray parameter (inf = miss), world normal and "upper part" flag for rays o + t d."""
        oc = o - np.asarray(self.center)
        t, _ = _quadratic_roots((d * d).sum(-1), (d * oc).sum(-1), (oc * oc).sum(-1) - self.radius ** 2)
        t = np.where(t > _EPS, t, np.inf)
        p = oc + np.where(np.isfinite(t), t, 0.0)[..., None] * d
        return t, p / self.radius, p[..., 1] > 0


@dataclass(frozen=True)
class Box:
    center: tuple[float, float, float]
    half: tuple[float, float, float]
    yaw: float

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        hx, hy, hz = self.half
        c, s = abs(np.cos(self.yaw)), abs(np.sin(self.yaw))
        ext = np.array([c * hx + s * hz, hy, s * hx + c * hz])
        return np.asarray(self.center) - ext, np.asarray(self.center) + ext

    def hit(self, o: np.ndarray, d: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        ol = rotate_yaw(o - np.asarray(self.center), -self.yaw)
        dl = np.broadcast_to(rotate_yaw(d, -self.yaw), np.broadcast_shapes(np.shape(o), np.shape(d)))
        half = np.asarray(self.half)
        with np.errstate(divide="ignore", invalid="ignore"):
            ta, tb = (-half - ol) / dl, (half - ol) / dl
        near, far = np.minimum(ta, tb), np.maximum(ta, tb)
        axis = near.argmax(-1)
        t0, t1 = near.max(-1), far.min(-1)
        t = np.where((t0 <= t1) & (t0 > _EPS), t0, np.inf)
        sign = -np.sign(np.take_along_axis(dl, axis[..., None], -1))
        local_n = np.eye(3)[axis] * sign
        return t, rotate_yaw(local_n, self.yaw), (axis == 1) & (local_n[..., 1] > 0)


@dataclass(frozen=True)
class Cylinder:
    """Upright cylinder between heights y0 and y1; "upper part" = the top cap."""

    x: float
    z: float
    radius: float
    y0: float
    y1: float

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        r = self.radius
        return np.array([self.x - r, self.y0, self.z - r]), np.array([self.x + r, self.y1, self.z + r])

    def hit(self, o: np.ndarray, d: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        ox, oy, oz = o[..., 0] - self.x, o[..., 1], o[..., 2] - self.z
        dx, dy, dz = d[..., 0], d[..., 1], d[..., 2]
        ts, _ = _quadratic_roots(dx * dx + dz * dz, ox * dx + oz * dz, ox * ox + oz * oz - self.radius ** 2)
        ys = oy + ts * dy
        ts = np.where((ts > _EPS) & (ys >= self.y0) & (ys <= self.y1), ts, np.inf)
        with np.errstate(divide="ignore", invalid="ignore"):
            caps = [(y - oy) / dy for y in (self.y1, self.y0)]
        inside = [(ox + tc * dx) ** 2 + (oz + tc * dz) ** 2 <= self.radius ** 2 for tc in caps]
        caps = [np.where((tc > _EPS) & ok, tc, np.inf) for tc, ok in zip(caps, inside, strict=True)]
        t = np.minimum(ts, np.minimum(*caps))
        top = (caps[0] <= ts) & (caps[0] <= caps[1]) & np.isfinite(t)
        bottom = (caps[1] < ts) & (caps[1] < caps[0])
        tf = np.where(np.isfinite(t), t, 0.0)
        px, pz = ox + tf * dx, oz + tf * dz
        side = np.stack(np.broadcast_arrays(px / self.radius, 0.0 * px, pz / self.radius), -1)
        cap_y = np.where(top, 1.0, -1.0)
        cap = np.stack(np.broadcast_arrays(0.0 * px, cap_y, 0.0 * px), -1)
        return t, np.where((top | bottom)[..., None], cap, side), top


@dataclass(frozen=True)
class Cone:
    """Upright cone, base of ``radius`` on the ground; "upper part" = the top 40 % (the tip)."""

    x: float
    z: float
    radius: float
    height: float

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        r = self.radius
        return np.array([self.x - r, 0.0, self.z - r]), np.array([self.x + r, self.height, self.z + r])

    def hit(self, o: np.ndarray, d: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        k2 = (self.radius / self.height) ** 2
        ox, oz = o[..., 0] - self.x, o[..., 2] - self.z
        w0 = self.height - o[..., 1]  # distance below the apex
        dx, dy, dz = d[..., 0], d[..., 1], d[..., 2]
        roots = _quadratic_roots(dx * dx + dz * dz - k2 * dy * dy, ox * dx + oz * dz + k2 * w0 * dy,
                            ox * ox + oz * oz - k2 * w0 * w0)
        t = np.full(np.broadcast_shapes(ox.shape, dx.shape), np.inf)
        for tr in roots:
            y = o[..., 1] + tr * dy
            t = np.where((tr > _EPS) & (y >= 0) & (y <= self.height) & (tr < t), tr, t)
        tf = np.where(np.isfinite(t), t, 0.0)
        px, pz = ox + tf * dx, oz + tf * dz
        rho = np.maximum(np.hypot(px, pz), _EPS)
        k = np.sqrt(k2)
        n = np.stack(np.broadcast_arrays(px / rho, k + 0.0 * px, pz / rho), -1) / np.sqrt(1 + k2)
        return t, n, o[..., 1] + tf * dy > 0.6 * self.height


Shape = Sphere | Box | Cylinder | Cone


@dataclass(frozen=True)
class Material:
    """Albedo = mix of two colours by a procedural pattern evaluated in the part's local frame."""

    color_a: tuple[float, float, float]
    color_b: tuple[float, float, float]
    pattern: str  # plain | stripes | checker | noise
    frequency: float  # pattern cycles per metre


@dataclass(frozen=True)
class Primitive:
    """One shape of one object, with its labels."""

    shape: Shape
    cls: int
    instance: int
    part_upper: int
    part_lower: int
    material: Material
    anchor: tuple[float, float, float]  # origin of the texture frame
    yaw: float


@dataclass(frozen=True)
class Camera:
    height: float  # metres above the ground
    pitch: float  # radians, looking down
    fov_y: float  # radians, vertical field of view

    def rotation(self) -> np.ndarray:
        """Camera -> world rotation; world is x right, y up, z backwards at zero pitch."""
        c, s = np.cos(self.pitch), np.sin(self.pitch)
        return np.array([[1.0, 0.0, 0.0], [0.0, c, s], [0.0, -s, c]])

    def focal(self, height_px: int) -> float:
        return 0.5 * height_px / np.tan(0.5 * self.fov_y)


@dataclass(frozen=True)
class Scene:
    camera: Camera
    light: np.ndarray  # unit vector towards the sun (world)
    ambient: float
    primitives: tuple[Primitive, ...]
    ground: Material
    sky: tuple[tuple[float, float, float], tuple[float, float, float]]  # horizon, zenith
    noise: np.ndarray  # square lattice for all value noise (render.py)
