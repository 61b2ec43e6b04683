"""Synthetic abdominal MRI phantoms with pancreas and tumor labels.

Real PANTHER data cannot be shipped with the project, so tests, benchmarks and smoke training
runs use these phantoms instead. They aim to exercise the same code paths as real scans: odd
spacings and orientations (flips, oblique direction cosines, random origins), realistic grid
sizes, intensities in the range of the real Task 1 data, small lobulated tumors touching a thin
curved pancreas, partial volume, texture, bias field, Rician noise and occasional motion.

The anatomy is an implicit model in a canonical patient frame (LPS millimetres: +x patient left,
+y posterior, +z superior). Each voxel's physical position is computed from index, spacing,
direction and origin, so a flipped or oblique grid really changes the array. Hard labels are the
organ functions evaluated at voxel centres; the image uses soft fractions for partial volume.

Geometry and intensity ranges follow the organisers' published nnU-Net fingerprint of the 92
Task 1 training scans (DIAGNijmegen PANTHER baseline, dataset_fingerprint.json): z spacing
3.0-3.5 mm, in-plane 0.69-1.31 mm (mostly 1.1875), 64-88 slices, in-plane 219-466 x 313-570
voxels, tumor voxel intensities mean ~207, std ~88, max ~914.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from pantherseg.inference.files import atomic_output, atomic_write_text
from pantherseg.parallel import parallel_map

__all__ = [
    "DEFAULT_TUMOR_PROBS",
    "DIRECTION_KINDS",
    "SIZES",
    "TASKS",
    "Phantom",
    "case_file_names",
    "case_seed",
    "generate_case",
    "write_dataset",
]

TASKS = ("task1", "task2")
SIZES = ("full", "small")
DIRECTION_KINDS = ("lps", "ras", "flip-x", "flip-y", "flip-z", "oblique")
_DIRECTION_PROBS = (0.45, 0.15, 0.06, 0.06, 0.08, 0.20)
DEFAULT_TUMOR_PROBS = (0.10, 0.75, 0.15)
DEFAULT_MOTION_PROB = 0.15

TUMOR = 1
PANCREAS = 2

_F32 = np.float32
_CHUNK = 1 << 19  # voxels per slab: keeps temporaries cache-sized, which is ~3x faster
_BIG = 1.0e4  # "far outside" signed distance, mm

# Task 1 full-size grid limits (z, y, x) from the real fingerprint, see the module docstring.
_T1_NY = (220, 470)
_T1_NX = (310, 570)
_T1_INPLANE = (0.69, 1.3125)
_T2_NY = (240, 420)
_T2_NX = (300, 480)
_SMALL_NZ = (20, 28)
_SMALL_NYX = (48, 80)

Q = tuple[np.ndarray, np.ndarray, np.ndarray]


@dataclass(frozen=True)
class Phantom:
    """One synthetic case: image, label on the same grid, and a JSON-serialisable description."""

    image: sitk.Image
    label: sitk.Image
    info: dict


# --------------------------------------------------------------------------------------------
# Implicit shapes. All signed distances are approximate, in mm, negative inside.
# --------------------------------------------------------------------------------------------


def _ellipse2(x: np.ndarray, y: np.ndarray, a: float | np.ndarray, b: float | np.ndarray):
    """Approximate signed distance to an axis-aligned ellipse (Quilez' first-order bound)."""
    u = x / a
    v = y / b
    k0 = np.sqrt(u * u + v * v)
    u /= a
    v /= b
    k1 = np.sqrt(u * u + v * v)
    k1 += 1e-6
    k0 *= k0 - 1.0
    k0 /= k1
    return k0


def _rot(axis: str, deg: float) -> np.ndarray:
    c, s = math.cos(math.radians(deg)), math.sin(math.radians(deg))
    if axis == "z":
        return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])
    if axis == "y":
        return np.array([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]])
    return np.array([[1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]])


@dataclass
class _Ellipsoid:
    c: np.ndarray
    r: np.ndarray
    rot: np.ndarray | None = None  # columns: local axes in the patient frame

    def local(self, q: Q) -> Q:
        x = q[0] - float(self.c[0])
        y = q[1] - float(self.c[1])
        z = q[2] - float(self.c[2])
        if self.rot is None:
            return x, y, z
        m = [[float(v) for v in row] for row in self.rot]
        u = m[0][0] * x + m[1][0] * y + m[2][0] * z
        v = m[0][1] * x + m[1][1] * y + m[2][1] * z
        w = m[0][2] * x + m[1][2] * y + m[2][2] * z
        return u, v, w

    def sdf(self, q: Q) -> np.ndarray:
        u, v, w = self.local(q)
        r0, r1, r2 = (float(t) for t in self.r)
        a, b, c = u / r0, v / r1, w / r2
        k0 = np.sqrt(a * a + b * b + c * c)
        a /= r0
        b /= r1
        c /= r2
        k1 = np.sqrt(a * a + b * b + c * c)
        k1 += 1e-6
        k0 *= k0 - 1.0
        k0 /= k1
        return k0

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        rot = np.eye(3) if self.rot is None else self.rot
        ext = np.sqrt(((rot * self.r[None, :]) ** 2).sum(axis=1))
        return self.c - ext, self.c + ext


def _catmull_rom(points: np.ndarray, radii: np.ndarray, step: float):
    """Densely sample a smooth curve through control points so tubes bend without kinks."""
    p = np.asarray(points, float)
    r = np.asarray(radii, float)
    ext = np.vstack([2 * p[0] - p[1], p, 2 * p[-1] - p[-2]])
    out_p, out_r = [], []
    for i in range(len(p) - 1):
        p0, p1, p2, p3 = ext[i], ext[i + 1], ext[i + 2], ext[i + 3]
        n = max(2, math.ceil(np.linalg.norm(p2 - p1) / step))
        t = np.linspace(0.0, 1.0, n, endpoint=False)[:, None]
        t2, t3 = t * t, t * t * t
        seg = 0.5 * (
            2 * p1
            + (-p0 + p2) * t
            + (2 * p0 - 5 * p1 + 4 * p2 - p3) * t2
            + (-p0 + 3 * p1 - 3 * p2 + p3) * t3
        )
        out_p.append(seg)
        out_r.append(r[i] + (r[i + 1] - r[i]) * t[:, 0])
    out_p.append(p[-1:])
    out_r.append(r[-1:])
    return np.vstack(out_p), np.concatenate(out_r)


class _Tube:
    """Sphere-swept curve: union of cones between consecutive samples of a smooth curve."""

    def __init__(self, points, radii, step: float = 6.0):
        self.p, self.r = _catmull_rom(np.asarray(points, float), np.asarray(radii, float), step)

    def bounds(self, margin: float = 0.0):
        lo = (self.p - self.r[:, None]).min(axis=0) - margin
        hi = (self.p + self.r[:, None]).max(axis=0) + margin
        return lo, hi

    def segments(self):
        for i in range(len(self.p) - 1):
            a, b = self.p[i], self.p[i + 1]
            ra, rb = self.r[i], self.r[i + 1]
            rm = max(ra, rb)
            yield a, b, ra, rb, np.minimum(a, b) - rm, np.maximum(a, b) + rm

    @staticmethod
    def segment_sdf(q: Q, a, b, ra: float, rb: float) -> np.ndarray:
        ab = b - a
        l2 = float(ab @ ab) + 1e-9
        ux, uy, uz = (float(v) for v in ab)
        dx = q[0] - float(a[0])
        dy = q[1] - float(a[1])
        dz = q[2] - float(a[2])
        t = dx * (ux / l2) + dy * (uy / l2) + dz * (uz / l2)
        np.clip(t, 0.0, 1.0, out=t)
        dx -= t * ux
        dy -= t * uy
        dz -= t * uz
        dx *= dx
        dy *= dy
        dz *= dz
        dx += dy
        dx += dz
        np.sqrt(dx, out=dx)
        dx -= float(ra)
        dx -= t * float(rb - ra)
        return dx


class _Waves:
    """Smooth random field from a few plane waves: cheap, defined everywhere in physical space."""

    def __init__(self, rng: np.random.Generator, n: int, wavelength: tuple[float, float]):
        dirs = rng.normal(size=(n, 3))
        dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
        lam = rng.uniform(*wavelength, size=n)
        self.k = dirs * (2 * math.pi / lam)[:, None]
        self.phase = rng.uniform(0, 2 * math.pi, size=n)
        self.amp = math.sqrt(2.0 / n)

    def __call__(self, q: Q) -> np.ndarray:
        out = None
        for k, ph in zip(self.k, self.phase, strict=True):
            arg = q[0] * float(k[0]) + q[1] * float(k[1]) + q[2] * float(k[2]) + float(ph)
            np.cos(arg, out=arg)
            if out is None:
                out = arg
            else:
                out += arg
        out *= self.amp
        return out


def _smin(a: np.ndarray, b: np.ndarray, k: float) -> np.ndarray:
    h = np.clip(0.5 + 0.5 * (b - a) / k, 0.0, 1.0)
    return b + (a - b) * h - k * h * (1.0 - h)


# --------------------------------------------------------------------------------------------
# Layers and the painter
# --------------------------------------------------------------------------------------------

Value = float | Callable[[Q, np.ndarray], np.ndarray]


@dataclass
class _Layer:
    """One tissue painted over everything before it (painter's algorithm with soft edges)."""

    name: str
    lo: np.ndarray
    hi: np.ndarray
    value: Value
    tex: float
    sdf: Callable[[Q], np.ndarray] | None = None
    tube: _Tube | None = None
    clip: Callable[[Q], np.ndarray] | None = None  # intersected (max) with the shape
    bump: _Waves | None = None
    bump_amp: float = 0.0
    label: int | None = None  # PANCREAS / TUMOR; None: occludes labels underneath


class _Canvas:
    """The voxel grid, its index->patient-frame affine, and the images being composed."""

    def __init__(self, shape: tuple[int, int, int], a: np.ndarray, b: np.ndarray, ramp: float):
        self.shape = shape
        self.a = np.asarray(a, float)  # q = a @ (k, j, i) + b
        self.b = np.asarray(b, float)
        self.a_inv = np.linalg.inv(self.a)
        self.inv_ramp = 1.0 / ramp
        self.img = np.zeros(shape, _F32)
        self.amp = np.zeros(shape, _F32)
        self.label = np.zeros(shape, np.uint8)
        self.tracking = False

    def coords(self, k0: int, k1: int, j0: int, j1: int, i0: int, i1: int) -> Q:
        k = np.arange(k0, k1, dtype=_F32)
        j = np.arange(j0, j1, dtype=_F32)
        i = np.arange(i0, i1, dtype=_F32)
        out = []
        for r in range(3):
            a0, a1, a2 = (float(v) for v in self.a[r])
            plane = (a1 * j)[:, None] + (a2 * i + float(self.b[r]))[None, :]
            out.append(plane[None, :, :] + (a0 * k)[:, None, None])
        return out[0], out[1], out[2]

    def bbox(self, lo: np.ndarray, hi: np.ndarray):
        """Index-space box covering a patient-frame box, or None when it misses the grid."""
        idx = self.corner_index(lo, hi)
        mn = np.floor(idx.min(axis=0)).astype(int) - 1
        mx = np.ceil(idx.max(axis=0)).astype(int) + 2
        mn = np.maximum(mn, 0)
        mx = np.minimum(mx, self.shape)
        if np.any(mx <= mn):
            return None
        return int(mn[0]), int(mx[0]), int(mn[1]), int(mx[1]), int(mn[2]), int(mx[2])

    def corner_index(self, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
        corners = np.array(
            [[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])]
        )
        return (corners - self.b) @ self.a_inv.T

    @staticmethod
    def slab_window(corners: np.ndarray, k_lo: float, k_hi: float):
        """(j0, j1, i0, i1) bounding the part of a parallelepiped (8 index-space corners, in
        patient-box order) that lies between slices k_lo and k_hi. On an oblique grid a long
        tube crosses the whole box, but each slab only meets a small part of it."""
        pts = [c[1:] for c in corners if k_lo <= c[0] <= k_hi]
        for a in range(8):
            for bit in (1, 2, 4):
                b = a | bit
                if b == a:
                    continue
                ca, cb = corners[a], corners[b]
                for plane in (k_lo, k_hi):
                    da, db = ca[0] - plane, cb[0] - plane
                    if da * db < 0:
                        t = da / (da - db)
                        pts.append(ca[1:] + t * (cb[1:] - ca[1:]))
        if not pts:
            return None
        pts = np.array(pts)
        mn = np.floor(pts.min(axis=0)).astype(int) - 1
        mx = np.ceil(pts.max(axis=0)).astype(int) + 2
        return int(mn[0]), int(mx[0]), int(mn[1]), int(mx[1])

    def _tube_field(self, layer: _Layer, box) -> np.ndarray:
        k0, k1, j0, j1, i0, i1 = box
        d = np.full((k1 - k0, j1 - j0, i1 - i0), _BIG, _F32)
        margin = layer.bump_amp + 2.0 / self.inv_ramp
        for a, b, ra, rb, slo, shi in layer.tube.segments():
            sb = self.bbox(slo - margin, shi + margin)
            if sb is None:
                continue
            s = (
                max(sb[0], k0),
                min(sb[1], k1),
                max(sb[2], j0),
                min(sb[3], j1),
                max(sb[4], i0),
                min(sb[5], i1),
            )
            if s[1] <= s[0] or s[3] <= s[2] or s[5] <= s[4]:
                continue
            sub = d[s[0] - k0 : s[1] - k0, s[2] - j0 : s[3] - j0, s[4] - i0 : s[5] - i0]
            np.minimum(sub, _Tube.segment_sdf(self.coords(*s), a, b, ra, rb), out=sub)
        return d

    def _distance(self, layer: _Layer, q: Q | None, raw: np.ndarray | None) -> np.ndarray:
        d = layer.sdf(q) if raw is None else raw.copy()
        if layer.bump is not None:
            d += layer.bump_amp * layer.bump(q)
        if layer.clip is not None:
            np.maximum(d, layer.clip(q), out=d)
        return d

    @staticmethod
    def _needs_q(layer: _Layer) -> bool:
        return (
            layer.tube is None
            or callable(layer.value)
            or layer.clip is not None
            or layer.bump is not None
        )

    def evaluate(self, layer: _Layer):
        """Signed distance over the layer's whole box, without painting (used for tumors)."""
        box = self.bbox(layer.lo, layer.hi)
        if box is None:
            return None, None
        raw = self._tube_field(layer, box) if layer.tube is not None else None
        q = self.coords(*box) if self._needs_q(layer) else None
        return box, self._distance(layer, q, raw)

    def paint(self, layer: _Layer) -> None:
        box = self.bbox(layer.lo, layer.hi)
        if box is None:
            return
        k0, k1, j0, j1, i0, i1 = box
        raw = self._tube_field(layer, box) if layer.tube is not None else None
        corners = self.corner_index(layer.lo, layer.hi)
        step = max(1, _CHUNK // ((j1 - j0) * (i1 - i0)))
        need_q = self._needs_q(layer)
        if layer.label == PANCREAS:
            self.tracking = True
        for c0 in range(k0, k1, step):
            c1 = min(k1, c0 + step)
            win = self.slab_window(corners, c0 - 1.0, c1 + 1.0)
            if win is None:
                continue
            a0, a1 = max(j0, win[0]), min(j1, win[1])
            b0, b1 = max(i0, win[2]), min(i1, win[3])
            if a1 <= a0 or b1 <= b0:
                continue
            sub_raw = None
            if raw is not None:
                sub_raw = raw[c0 - k0 : c1 - k0, a0 - j0 : a1 - j0, b0 - i0 : b1 - i0]
                if float(sub_raw.min()) > _BIG / 2:
                    continue
            q = self.coords(c0, c1, a0, a1, b0, b1) if need_q else None
            d = self._distance(layer, q, sub_raw)
            f = 0.5 - d * self.inv_ramp
            np.clip(f, 0.0, 1.0, out=f)
            if not f.any():
                continue
            region = (slice(c0, c1), slice(a0, a1), slice(b0, b1))
            val = layer.value(q, d) if callable(layer.value) else layer.value
            img = self.img[region]
            img += f * (val - img)
            amp = self.amp[region]
            amp += f * (layer.tex - amp)
            if layer.label is not None:
                self.label[region][d < 0] = layer.label
            elif self.tracking:
                self.label[region][d < 0] = 0


# --------------------------------------------------------------------------------------------
# Appearance
# --------------------------------------------------------------------------------------------

# name: (T1 arterial fat-suppressed, T2 MR-Linac, texture amplitude). Task 1 values are placed
# around the real tumor statistics (mean ~207); Task 2 uses an arbitrary but plausible scale.
_TISSUES = {
    "fat_sc": (95, 520, 0.07),
    "fat_visc": (80, 480, 0.08),
    "muscle": (160, 105, 0.08),
    "liver": (265, 125, 0.07),
    "hep_vein": (150, 60, 0.03),
    "spleen": (330, 300, 0.08),
    "kidney_cortex": (620, 360, 0.05),
    "kidney_medulla": (250, 520, 0.05),
    "renal_sinus": (85, 470, 0.08),
    "aorta": (780, 45, 0.03),
    "artery": (700, 60, 0.03),
    "ivc": (260, 80, 0.03),
    "portal": (400, 90, 0.03),
    "renal_vein": (560, 90, 0.03),
    "gi_wall": (320, 170, 0.06),
    "gi_fluid": (55, 900, 0.03),
    "gi_air": (3, 4, 0.0),
    "stool": (130, 320, 0.25),
    "bowel_fluid": (65, 750, 0.05),
    "bile": (70, 950, 0.02),
    "marrow": (200, 330, 0.10),
    "bone": (40, 25, 0.05),
    "disc": (140, 600, 0.05),
    "csf": (55, 930, 0.02),
    "cord": (170, 260, 0.04),
    "pancreas": (0, 0, 0.13),  # drawn per case
    "tumor": (0, 0, 0.2),  # drawn per case
}


class _Look:
    """Per-case tissue intensities: jittered table values, tumor/pancreas drawn explicitly."""

    def __init__(self, rng: np.random.Generator, task: str):
        col = 0 if task == "task1" else 1
        g = rng.uniform(0.85, 1.15)
        self.v = {}
        for name, vals in _TISSUES.items():
            self.v[name] = float(vals[col] * g * math.exp(rng.normal(0.0, 0.08)))
        self.t = {name: vals[2] for name, vals in _TISSUES.items()}
        if task == "task1":
            tumor = float(np.clip(math.exp(rng.normal(math.log(185.0), 0.35)), 80.0, 450.0))
            self.v["tumor"] = tumor
            self.v["pancreas"] = min(tumor * rng.uniform(1.35, 1.9), 650.0)
            self.v["necrosis"] = tumor * rng.uniform(0.45, 0.65)
            self.v["bile"] = rng.uniform(50.0, 300.0)
        else:
            panc = 230.0 * g * rng.uniform(0.85, 1.15)
            self.v["pancreas"] = panc
            self.v["tumor"] = panc * rng.uniform(0.95, 1.45)
            self.v["necrosis"] = rng.uniform(550.0, 800.0)
        self.v["necrosis"] = float(self.v["necrosis"])
        self.spleen_bands = task == "task1" and rng.random() < 0.5
        self.noise_sigma = rng.uniform(6.0, 16.0) if task == "task1" else rng.uniform(8.0, 20.0)


# --------------------------------------------------------------------------------------------
# Anatomy
# --------------------------------------------------------------------------------------------


@dataclass
class _Body:
    ax: float  # body half-axes (mm)
    ay: float
    fat: float  # subcutaneous fat thickness
    muscle: float  # muscle wall thickness
    taper: float  # the lower abdomen is a little wider

    def scale(self, z):
        return 1.0 - self.taper * np.clip(z, -150.0, 150.0)


def _draw_body(rng: np.random.Generator) -> _Body:
    ay = rng.uniform(95.0, 132.0)
    ax = min(ay * rng.uniform(1.25, 1.5), 190.0)
    fat = float(np.clip(6.0 + (ay - 95.0) * 0.5 + rng.uniform(-4.0, 8.0), 5.0, 36.0))
    return _Body(ax, ay, fat, rng.uniform(6.0, 13.0), rng.uniform(0.0002, 0.0006))


class _Anatomy:
    """Builds the ordered layer list for one patient, plus what tumor placement needs."""

    def __init__(self, rng: np.random.Generator, body: _Body, look: _Look):
        self.rng = rng
        self.body = body
        self.look = look
        self.cav_ax = body.ax - body.fat - body.muscle
        self.cav_ay = body.ay - body.fat - body.muscle
        # Organ layout is defined for a reference cavity of half-axes 130 x 85 mm and scaled.
        self.sx = self.cav_ax / 130.0
        self.sy = self.cav_ay / 85.0
        self.sr = float(np.clip(0.5 * (self.sx + self.sy), 0.8, 1.25))
        self.ys = 35.0 * self.sy  # vertebral body centre
        self.layers: list[_Layer] = []
        self.pancreas: _Tube | None = None
        self.kidney_centres: list[np.ndarray] = []
        self._build()

    # helpers ---------------------------------------------------------------------------
    def j(self, s: float = 1.0) -> float:
        return float(self.rng.normal(0.0, s))

    def pt(self, x: float, dy: float, z: float, jit: float = 3.0) -> np.ndarray:
        """Reference position (x, offset from spine in y, z) scaled to this patient."""
        return np.array(
            [x * self.sx + self.j(jit), self.ys + dy * self.sy + self.j(jit), z + self.j(jit)]
        )

    def cavity(self, q: Q) -> np.ndarray:
        s = self.body.scale(q[2])
        return _ellipse2(q[0], q[1], self.cav_ax * s, self.cav_ay * s)

    def muscle_wall(self, q: Q) -> np.ndarray:
        s = self.body.scale(q[2])
        m = self.body.muscle
        return _ellipse2(q[0], q[1], (self.cav_ax + m) * s, (self.cav_ay + m) * s)

    def add(self, layer: _Layer) -> None:
        self.layers.append(layer)

    def add_ellipsoid(self, name, e: _Ellipsoid, value, tex, clip=None, bump=None, amp=0.0):
        lo, hi = e.bounds()
        self.add(
            _Layer(
                name, lo - amp, hi + amp, value, tex, sdf=e.sdf, clip=clip, bump=bump, bump_amp=amp
            )
        )

    def add_tube(self, name, tube: _Tube, value, tex, clip=None, bump=None, amp=0.0, label=None):
        lo, hi = tube.bounds(amp)
        self.add(
            _Layer(
                name, lo, hi, value, tex, tube=tube, clip=clip, bump=bump, bump_amp=amp, label=label
            )
        )

    # the body ----------------------------------------------------------------------------
    def _build(self) -> None:
        self._torso()
        self._liver()
        self._spleen()
        self._kidneys()
        self._spine()
        self._gallbladder()
        self._gi_tract()
        self._pancreas()
        self._vessels()

    def _torso(self) -> None:
        b, v, t = self.body, self.look.v, self.look.t

        def scale(q: Q) -> np.ndarray:
            return b.scale(q[2])

        def outer(q: Q) -> np.ndarray:
            s = scale(q)
            return _ellipse2(q[0], q[1], b.ax * s, b.ay * s)

        def inner(q: Q):
            s = scale(q)
            d1 = _ellipse2(q[0], q[1], (b.ax - b.fat) * s, (b.ay - b.fat) * s)
            d2 = _ellipse2(q[0], q[1], self.cav_ax * s, self.cav_ay * s)
            return d1, d2

        # Partial-volume width of the inner boundaries depends on the voxel size, which is only
        # known once the grid is drawn (after the anatomy): generate_case fills it in.
        ramp = [1.0]

        def value(q: Q, d: np.ndarray) -> np.ndarray:
            d1, d2 = inner(q)
            f1 = np.clip(0.5 - d1 / ramp[0], 0.0, 1.0)
            f2 = np.clip(0.5 - d2 / ramp[0], 0.0, 1.0)
            out = v["fat_sc"] + f1 * (v["muscle"] - v["fat_sc"])
            out += f2 * (v["fat_visc"] - out)
            return out

        hi = np.array([b.ax * 1.3, b.ay * 1.3, 1e4])
        self.torso_ramp = ramp
        self.add(_Layer("torso", -hi, hi, value, t["fat_visc"], sdf=outer))

    def _liver(self) -> None:
        v, t, sr = self.look.v, self.look.t, self.sr
        right = _Ellipsoid(
            self.pt(-62, -40, 88, 5),
            np.array([78, 88, 100]) * sr * self.rng.uniform(0.9, 1.1, 3),
            _rot("z", self.j(5)),
        )
        left = _Ellipsoid(
            self.pt(10, -95, 80, 6),
            np.array([62, 28, 42]) * sr * self.rng.uniform(0.85, 1.15, 3),
            _rot("y", self.j(8)),
        )
        caudate = _Ellipsoid(self.pt(-15, -30, 72), np.array([18.0, 15.0, 25.0]) * sr)
        cut_x = -52.0 * self.sx + self.j(4)
        cut_slope = self.rng.uniform(0.7, 1.1)
        cut_z = 5.0 + self.j(5)
        cut_y = float(right.c[1])
        cut_curv = self.rng.uniform(0.003, 0.007)

        def sdf(q: Q) -> np.ndarray:
            # the right lobe retreats laterally below the hilum, leaving room for the pancreatic
            # head and duodenum; a curved, smoothly blended cut keeps its medial edge organic
            dy = q[1] - cut_y
            cut = q[0] - (cut_x + cut_slope * np.maximum(q[2] - cut_z, 0.0) - cut_curv * dy * dy)
            dr = -_smin(-right.sdf(q), -cut, 12.0)
            d = _smin(dr, left.sdf(q), 14.0)
            return _smin(d, caudate.sdf(q), 8.0)

        lo = np.minimum.reduce([e.bounds()[0] for e in (right, left, caudate)]) - 6
        hi = np.maximum.reduce([e.bounds()[1] for e in (right, left, caudate)]) + 6
        self.add(
            _Layer(
                "liver",
                lo,
                hi,
                v["liver"],
                t["liver"],
                sdf=sdf,
                clip=self.cavity,
                bump=_Waves(self.rng, 5, (40.0, 120.0)),
                bump_amp=4.0,
            )
        )
        self.liver_ivc_top = self.pt(-26, -40, 125)
        for end, r in (((-110, -40, 80), 5.5), ((-60, -95, 70), 4.5), ((-5, -105, 95), 4.0)):
            tube = _Tube([self.liver_ivc_top, self.pt(*end, jit=6)], [r, 2.0])
            self.add_tube("hepatic_vein", tube, v["hep_vein"], t["hep_vein"])

    def _spleen(self) -> None:
        v, t = self.look.v, self.look.t
        e = _Ellipsoid(
            self.pt(95, 5, 62, 5),
            np.array([22, 55, 48]) * self.sr * self.rng.uniform(0.8, 1.15, 3),
            _rot("z", -40 + self.j(8)) @ _rot("x", self.j(8)),
        )
        value: Value = v["spleen"]
        if self.look.spleen_bands:  # arciform enhancement of the arterial phase
            waves = _Waves(self.rng, 3, (18.0, 35.0))
            base = v["spleen"]

            def value(q: Q, d: np.ndarray) -> np.ndarray:
                return base * (1.0 + 0.18 * waves(q))

        self.add_ellipsoid("spleen", e, value, t["spleen"], clip=self.cavity)

    def _kidneys(self) -> None:
        v, t = self.look.v, self.look.t
        for side, x, z in ((1, 68, 2), (-1, -66, -14)):
            r = np.array([25, 17, 52]) * self.sr * self.rng.uniform(0.88, 1.12, 3)
            rot = _rot("z", side * (35 + self.j(6))) @ _rot("y", side * (6 + self.j(3)))
            e = _Ellipsoid(self.pt(x, 6, z, 4), r, rot)
            sinus = _Ellipsoid(
                np.zeros(3), r * np.array([0.45, 0.5, 0.55]), None
            )  # in kidney-local coords
            sinus.c = np.array([-side * 0.55 * r[0], 0.0, 0.0])
            medulla_k = self.rng.uniform(0.62, 0.75)
            vc, vm, vs = v["kidney_cortex"], v["kidney_medulla"], v["renal_sinus"]

            def value(q, d, e=e, sinus=sinus, medulla_k=medulla_k, vc=vc, vm=vm, vs=vs):
                u = e.local(q)
                a, b, c = (u[i] / float(e.r[i]) for i in range(3))
                rho = np.sqrt(a * a + b * b + c * c)
                fm = np.clip((medulla_k - rho) * 12.0 + 0.5, 0.0, 1.0)
                out = vc + fm * (vm - vc)
                fs = np.clip(0.5 - sinus.sdf(u) / 1.5, 0.0, 1.0)
                out += fs * (vs - out)
                return out

            self.add_ellipsoid("kidney", e, value, t["kidney_cortex"], clip=self.cavity)
            self.kidney_centres.append(e.c)

    def _spine(self) -> None:
        v, t, sy, rng = self.look.v, self.look.t, self.sy, self.rng
        sv = rng.uniform(0.9, 1.12)
        ys = self.ys
        vb = (0.0, ys, 21.0 * sv, 16.0 * sv)
        period = rng.uniform(32.0, 38.0)
        z0 = rng.uniform(0, period)
        disc_thr = math.cos(math.pi * 8.0 / period)
        wall = self.muscle_wall

        # paraspinal muscles and psoas first: the spine sits in between
        for sgn in (-1, 1):
            cx, cy, ra, rb = sgn * 36.0 * sv, ys + 45.0 * sy, 26.0 * sv, 24.0 * sy

            def para(q, cx=cx, cy=cy, ra=ra, rb=rb):
                return _ellipse2(q[0] - cx, q[1] - cy, ra, rb)

            lo = np.array([cx - ra, cy - rb, -1e4])
            hi = np.array([cx + ra, cy + rb, 1e4])
            self.add(_Layer("paraspinal", lo, hi, v["muscle"], t["muscle"], sdf=para, clip=wall))
            px, py = sgn * 31.0 * sv, ys - 2.0

            def psoas(q, px=px, py=py):
                g = np.clip(0.3 + (30.0 - q[2]) / 150.0 * 0.7, 0.3, 1.0)
                d = _ellipse2(q[0] - px, q[1] - py, 21.0 * sv * g, 17.0 * sv * g)
                return np.maximum(d, q[2] - 40.0)

            lo = np.array([px - 25, py - 20, -1e4])
            hi = np.array([px + 25, py + 20, 45.0])
            self.add(_Layer("psoas", lo, hi, v["muscle"], t["muscle"], sdf=psoas))

        # posterior arch and spinous process (bone), then the canal
        cy_arch = ys + vb[3] + 10.0 * sv
        arch = (0.0, cy_arch, 17.0 * sv, 14.0 * sv)
        spin = (0.0, ys + 42.0 * sv, 4.0 * sv, 11.0 * sv)
        for name, (ex, ey, ra, rb) in (("arch", arch), ("spinous", spin)):

            def bone(q, ex=ex, ey=ey, ra=ra, rb=rb):
                return _ellipse2(q[0] - ex, q[1] - ey, ra, rb)

            def bone_value(q, d):
                return v["marrow"] + np.clip((d + 3.0) / 2.0, 0.0, 1.0) * (v["bone"] - v["marrow"])

            lo = np.array([ex - ra, ey - rb, -1e4])
            hi = np.array([ex + ra, ey + rb, 1e4])
            self.add(_Layer(name, lo, hi, bone_value, t["marrow"], sdf=bone, clip=wall))

        def body_sdf(q):
            return _ellipse2(q[0] - vb[0], q[1] - vb[1], vb[2], vb[3])

        def body_value(q, d):
            s = np.cos((q[2] - z0) * (2 * math.pi / period))
            fd = np.clip((s - disc_thr) * 8.0, 0.0, 1.0)
            rim = np.clip((d + 3.0) / 2.0, 0.0, 1.0)
            out = v["marrow"] + rim * (v["bone"] - v["marrow"])
            out += fd * np.clip(-d / 1.5, 0.0, 1.0) * (v["disc"] - out)
            return out

        lo = np.array([-vb[2], ys - vb[3], -1e4])
        hi = np.array([vb[2], ys + vb[3], 1e4])
        self.add(_Layer("vertebra", lo, hi, body_value, t["marrow"], sdf=body_sdf))

        cr = (10.0 * sv, 8.5 * sv)
        cord_end = rng.uniform(-40.0, 0.0)

        def canal(q):
            return _ellipse2(q[0], q[1] - cy_arch, cr[0], cr[1])

        def canal_value(q, d):
            dc = _ellipse2(q[0], q[1] - cy_arch, 4.5 * sv, 4.0 * sv)
            np.maximum(dc, cord_end - q[2], out=dc)
            return v["csf"] + np.clip(0.5 - dc, 0.0, 1.0) * (v["cord"] - v["csf"])

        lo = np.array([-cr[0], cy_arch - cr[1], -1e4])
        hi = np.array([cr[0], cy_arch + cr[1], 1e4])
        self.add(_Layer("canal", lo, hi, canal_value, t["csf"], sdf=canal))

    def _gallbladder(self) -> None:
        if self.rng.random() < 0.15:  # cholecystectomy
            return
        e = _Ellipsoid(
            self.pt(-62, -108, 35, 5),
            np.array([14, 13, 32]) * self.sr * self.rng.uniform(0.7, 1.2, 3),
            _rot("x", 25 + self.j(8)) @ _rot("y", self.j(10)),
        )
        self.add_ellipsoid(
            "gallbladder", e, self.look.v["bile"], self.look.t["bile"], clip=self.cavity
        )

    def _gi(self, name, pts, radii, content: str, air_frac: float) -> None:
        """Hollow viscus: enhancing wall, fluid or stool content, air floating anteriorly."""
        v, t = self.look.v, self.look.t
        tube = _Tube(np.array(pts), np.array(radii), step=7.0)
        wall = self.rng.uniform(2.5, 4.5)
        ymin = float((tube.p[:, 1] - tube.r).min())
        ymax = float((tube.p[:, 1] + tube.r).max())
        y_air = ymin + air_frac * (ymax - ymin)
        vw, vc, va = v["gi_wall"], v[content], v["gi_air"]

        def value(q, d):
            fl = np.clip(0.5 - (d + wall) / 1.5, 0.0, 1.0)
            fa = np.clip(0.5 + (y_air - q[1]) / 1.5, 0.0, 1.0)
            inner = vc + fa * (va - vc)
            return vw + fl * (inner - vw)

        self.add_tube(name, tube, value, t[content], clip=self.cavity)

    def _gi_tract(self) -> None:
        rng, sr = self.rng, self.sr
        stomach = [
            (self.pt(45, -35, 118, 6), 34),
            (self.pt(65, -75, 85, 6), 36),
            (self.pt(50, -97, 58, 5), 30),
            (self.pt(12, -97, 38, 4), 20),
            (self.pt(-22, -92, 28, 3), 10),
            (self.pt(-45, -82, 24, 3), 13),
            (self.pt(-64, -62, 14, 2), 12),
            (self.pt(-66, -55, -15, 2), 11),
            (self.pt(-56, -55, -42, 2), 11),
            (self.pt(-20, -58, -52, 2), 10),
            (self.pt(15, -58, -50, 2), 10),
            (self.pt(32, -66, -32, 2), 10),
            (self.pt(38, -78, -15, 2), 10),
        ]
        fill = rng.uniform(0.5, 1.1)
        radii = [r * sr * (fill if i < 4 else 1.0) for i, (_, r) in enumerate(stomach)]
        self._gi("stomach", [p for p, _ in stomach], radii, "gi_fluid", rng.uniform(0.0, 0.35))
        colon = [
            (self.pt(-100, -55, -170, 5), 20),
            (self.pt(-100, -60, -60, 5), 21),
            (self.pt(-90, -85, -25, 5), 19),
            (self.pt(-40, -110, -45, 6), 17),
            (self.pt(20, -112, -40, 6), 17),
            (self.pt(75, -95, -10, 5), 17),
            (self.pt(95, -55, 25, 5), 17),
            (self.pt(100, -35, -40, 5), 16),
            (self.pt(98, -40, -170, 5), 16),
        ]
        self._gi(
            "colon",
            [p for p, _ in colon],
            [r * sr for _, r in colon],
            "stool",
            rng.uniform(0.05, 0.3),
        )
        for _ in range(int(rng.integers(4, 9))):
            p = self.pt(rng.uniform(-60, 60), rng.uniform(-120, -40), rng.uniform(-160, -45), 0)
            pts = [p]
            for _ in range(3):
                step = rng.normal(size=3)
                step *= 25.0 / np.linalg.norm(step)
                pts.append(pts[-1] + step)
            r = rng.uniform(9.0, 13.0) * sr
            self._gi("small_bowel", pts, [r] * 4, "bowel_fluid", rng.uniform(0.0, 0.15))

    def _pancreas(self) -> None:
        rng, sr = self.rng, self.sr
        tail_lift = rng.uniform(-5.0, 20.0)
        pts = [
            (self.pt(-28, -50, -22, 3), 11),
            (self.pt(-40, -58, -6, 3), 16),
            (self.pt(-24, -75, 0, 2), 13),
            (self.pt(-6, -90, 3, 2), 9),
            (self.pt(25, -78, 6, 3), 11),
            (self.pt(58, -60, 10 + tail_lift * 0.4, 3), 10),
            (self.pt(85, -36, 14 + tail_lift * 0.8, 3), 9),
            (self.pt(98, -22, 18 + tail_lift, 3), 6),
        ]
        fat = rng.uniform(0.8, 1.15)  # atrophy or a plump gland
        radii = [r * sr * fat * rng.uniform(0.9, 1.1) for _, r in pts]
        self.pancreas = _Tube(np.array([p for p, _ in pts]), np.array(radii), step=5.0)
        self.add_tube(
            "pancreas",
            self.pancreas,
            self.look.v["pancreas"],
            self.look.t["pancreas"],
            clip=self.cavity,
            bump=_Waves(rng, 6, (12.0, 30.0)),
            amp=rng.uniform(1.0, 2.2),
            label=PANCREAS,
        )

    def _vessels(self) -> None:
        v, t, rng, ys, sy = self.look.v, self.look.t, self.rng, self.ys, self.sy
        ra = rng.uniform(9.0, 12.5)
        ax_, ay_ = 12.0 * self.sx + self.j(2), ys - 16.0 - ra - 1.5
        ix, iy = -24.0 * self.sx + self.j(2), ys - 14.0 - 9.0
        irx, iry = rng.uniform(10, 14), rng.uniform(7, 10)
        kl, kr = self.kidney_centres
        # renal veins (left passes between aorta and SMA)
        self.add_tube(
            "renal_vein",
            _Tube(
                [
                    kl + np.array([-0.55 * 25 * self.sx, -8.0, 0.0]),
                    [30 * self.sx, ys - 10, kl[2] - 2],
                    [ax_, ay_ - ra - 5, kl[2] - 4],
                    [ix, iy, kl[2] - 5],
                ],
                [4.5, 4.5, 4.0, 5.0],
            ),
            v["renal_vein"],
            t["renal_vein"],
        )
        self.add_tube(
            "renal_vein",
            _Tube(
                [kr + np.array([0.55 * 25 * self.sx, -8.0, 0.0]), [ix, iy + 2, kr[2] + 3]],
                [5.0, 5.0],
            ),
            v["renal_vein"],
            t["renal_vein"],
        )

        def ivc(q):
            lift = np.maximum(q[2] - 60.0, 0.0)
            return _ellipse2(q[0] - (ix - 0.1 * lift), q[1] - (iy - 0.25 * lift), irx, iry)

        lo = np.array([ix - irx - 40, iy - iry - 60, -1e4])
        hi = np.array([ix + irx, iy + iry, 1e4])
        self.add(_Layer("ivc", lo, hi, v["ivc"], t["ivc"], sdf=ivc))

        def aorta(q):
            return _ellipse2(q[0] - ax_, q[1] - ay_, ra, ra * 0.95)

        lo = np.array([ax_ - ra, ay_ - ra, -1e4])
        hi = np.array([ax_ + ra, ay_ + ra, 1e4])
        self.add(_Layer("aorta", lo, hi, v["aorta"], t["aorta"], sdf=aorta))

        conf = self.pt(-6, -72, 4, 2)
        smv = _Tube(
            [self.pt(-10, -80, -170), self.pt(-10, -80, -40), self.pt(-8, -76, -10), conf],
            [5.5, 5.5, 5.5, 6.0],
        )
        portal = _Tube(
            [conf, self.pt(-28, -72, 25), self.pt(-52, -70, 45), self.pt(-70, -60, 55)],
            [6.5, 6.5, 6.0, 5.0],
        )
        splenic = _Tube(
            [
                conf,
                self.pt(25, -62, 10),
                self.pt(60, -45, 18),
                self.pt(88, -20, 28),
                self.pt(102, -5, 38),
            ],
            [4.5] * 5,
        )
        for name, tube in (("smv", smv), ("portal", portal), ("splenic_vein", splenic)):
            self.add_tube(name, tube, v["portal"], t["portal"])
        sma_origin = np.array([ax_, ay_ - 0.6 * ra, 12.0 + self.j(3)])
        sma = _Tube(
            [
                sma_origin,
                [ax_ - 1, ys - 58 * sy, 2],
                self.pt(8, -72, -25),
                self.pt(5, -78, -60),
                self.pt(3, -80, -170),
            ],
            [3.8] * 5,
        )
        self.add_tube("sma", sma, v["artery"], t["artery"])
        # small branches: mesenteric vessels fanning out below the pancreas, portal branches
        for _ in range(int(rng.integers(5, 10))):
            start = self.pt(rng.uniform(-12, 8), -78, rng.uniform(-150, -45), 2)
            pts = [start]
            heading = np.array([rng.uniform(-1, 1), rng.uniform(-0.6, 0.1), rng.uniform(-1, 0.2)])
            for _ in range(3):
                heading = heading + rng.normal(0, 0.3, 3)
                heading /= np.linalg.norm(heading)
                pts.append(pts[-1] + heading * rng.uniform(18, 30))
            venous = rng.random() < 0.5
            self.add_tube(
                "mesenteric",
                _Tube(pts, np.linspace(rng.uniform(1.8, 2.8), 1.2, len(pts))),
                v["portal"] if venous else v["artery"],
                t["portal"],
                clip=self.cavity,
            )
        hilum = portal.p[-1]
        for end in ((-110, -40, 60), (-95, -100, 70), (-30, -110, 75), (-80, -20, 95)):
            tube = _Tube([hilum, self.pt(*end, jit=8)], [4.0, 1.5])
            self.add_tube("portal_branch", tube, v["portal"], t["portal"])


# --------------------------------------------------------------------------------------------
# Geometry
# --------------------------------------------------------------------------------------------


def _direction(kind: str, rng: np.random.Generator) -> np.ndarray:
    if kind == "lps":
        return np.eye(3)
    if kind == "ras":
        return np.diag([-1.0, -1.0, 1.0])
    if kind.startswith("flip-"):
        d = np.ones(3)
        d["xyz".index(kind[-1])] = -1.0
        return np.diag(d)
    axis = rng.normal(size=3)
    axis /= np.linalg.norm(axis)
    ang = math.radians(rng.uniform(5.0, 25.0))
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    rot = np.eye(3) + math.sin(ang) * k + (1 - math.cos(ang)) * (k @ k)
    u, _, vt = np.linalg.svd(rot)  # re-orthonormalise against rounding
    return u @ vt


def _grid(rng, task, size, body: _Body, axes: np.ndarray, shape_zyx):
    """Spacing (z, y, x) and shape (z, y, x): a protocol field of view, widened if the body
    would not fit."""
    margin_x, margin_y = rng.uniform(14, 28, 2)
    tilt = math.sqrt(max(0.0, 1.0 - axes[2, 2] ** 2))

    def needed(nz: int, sz: float) -> tuple[float, float]:
        # Longest chord of the body along each in-plane grid axis (axes: grid axes in the
        # patient frame; a tilted slice cuts the elliptic body cylinder obliquely), at the widest
        # level in the slab, plus margins for the centring shift (<= 5 mm).
        grow = float(body.scale(-(nz * sz / 2.0 + 10.0 + 200.0 * tilt)))
        ax, ay = body.ax * grow, body.ay * grow
        half = [1.0 / math.hypot(axes[0, c] / ax, axes[1, c] / ay) for c in (0, 1)]
        return 2 * half[0] + margin_x, 2 * half[1] + margin_y

    if size == "small":
        sz = rng.uniform(5.5, 6.5)
        nz = int(rng.integers(_SMALL_NZ[0], _SMALL_NZ[1] + 1))
        ny = int(rng.integers(_SMALL_NYX[0], 65))
        nx = int(rng.integers(64, _SMALL_NYX[1] + 1))
        if shape_zyx is not None:
            nz, ny, nx = shape_zyx
        need_x, need_y = needed(nz, sz)
        s = max(need_x / nx, need_y / ny)
        limits = None if shape_zyx is not None else (_SMALL_NYX[1], _SMALL_NYX[1])
        return (sz, s, s), (nz, ny, nx), limits
    if task == "task1":
        # Real scans: in-plane spacing mostly 1.1875 mm (a few 0.69-1.31), field of view about
        # 306 x 378 mm (y x), 3 mm slices (a few up to 3.5 mm), 64-88 slices.
        s = 1.1875 if rng.random() < 0.85 else rng.uniform(*_T1_INPLANE)
        sz = 3.0 if rng.random() < 0.85 else rng.uniform(3.0, 3.5)
        nz = int(rng.integers(0, 4)) * 8 + 64
        short = rng.random() < 0.1
        fov_y = rng.uniform(255.0, 306.0) if short else 306.0 * rng.uniform(0.98, 1.05)
        fov_x = 378.0 * rng.uniform(0.98, 1.05)
        lim_y, lim_x, lim_s = _T1_NY, _T1_NX, _T1_INPLANE
    else:
        s = 1.0 if rng.random() < 0.8 else rng.uniform(0.9, 1.1)
        sz = 2.0 if rng.random() < 0.8 else rng.uniform(1.8, 2.2)
        nz = round(rng.uniform(170.0, 240.0) / sz)
        fov_y = rng.uniform(300.0, 360.0)
        fov_x = rng.uniform(380.0, 450.0)
        lim_y, lim_x, lim_s = _T2_NY, _T2_NX, (0.8, 1.25)
    if shape_zyx is not None:
        nz = shape_zyx[0]
    need_x, need_y = needed(nz, sz)
    fov_x, fov_y = max(fov_x, need_x), max(fov_y, need_y)
    if shape_zyx is not None:
        nz, ny, nx = shape_zyx
        s = float(np.clip(max(need_x / nx, need_y / ny, fov_y / ny), *lim_s))
        return (sz, s, s), (nz, ny, nx), None
    s = max(s, fov_x / lim_x[1], fov_y / lim_y[1])
    nx = int(np.clip(round(fov_x / s), *lim_x))
    ny = int(np.clip(round(fov_y / s), *lim_y))
    return (sz, s, s), (nz, ny, nx), (lim_y[1], lim_x[1])


def _fit_body(body: _Body, axes: np.ndarray, centre: np.ndarray, spacing, shape, limits):
    """Grow the field of view until no side face of the grid cuts the body.

    The estimate in _grid ignores where each row of a tilted grid crosses the body; checking
    the side faces directly is exact and cheap. Grows the voxel count while the size limits
    allow (limits = (max ny, max nx), None for a forced shape), then the in-plane spacing.
    """
    sz, s, _ = spacing
    nz, ny, nx = shape
    for _ in range(40):
        hit = [False, False]  # x faces, y faces
        size = (nx, ny, nz)
        for c in (0, 1):
            other = [o for o in (0, 1, 2) if o != c]
            g = [np.linspace(0, size[o] - 1, min(size[o], 48)) for o in other]
            mesh = np.meshgrid(*g, indexing="ij")
            for side in (0, size[c] - 1):
                idx = np.zeros((3, mesh[0].size))
                idx[c] = side
                idx[other[0]] = mesh[0].ravel()
                idx[other[1]] = mesh[1].ravel()
                idx -= (np.array(size, float)[:, None] - 1) / 2
                q = centre[:, None] + (axes * np.array([s, s, sz])[None, :]) @ idx
                grow = body.scale(q[2])
                d = _ellipse2(q[0], q[1], body.ax * grow, body.ay * grow)
                hit[c] |= bool(d.min() < 3.0)
        if not any(hit):
            break
        if limits is None:
            s *= 1.04
            continue
        if hit[0]:
            if nx < limits[1]:
                nx = min(limits[1], math.ceil(nx * 1.04))
            else:
                s *= 1.04
        if hit[1]:
            if ny < limits[0]:
                ny = min(limits[0], math.ceil(ny * 1.04))
            elif not hit[0] or nx < limits[1]:
                s *= 1.04
    return (sz, s, s), (nz, ny, nx)


# --------------------------------------------------------------------------------------------
# Tumors
# --------------------------------------------------------------------------------------------


def _tumor_layer(rng, look: _Look, centre, r0: float) -> _Layer:
    spheres = [(centre, r0)]
    for _ in range(int(rng.integers(1, 4))):
        d = rng.normal(size=3)
        d /= np.linalg.norm(d)
        spheres.append((centre + d * r0 * rng.uniform(0.3, 0.6), r0 * rng.uniform(0.45, 0.72)))
    waves = _Waves(rng, 5, (0.9 * r0 + 4.0, 2.2 * r0 + 8.0))
    amp = 0.12 * r0
    ext = max(float(np.linalg.norm(c - centre)) + r for c, r in spheres) + amp + 2.0

    def sdf(q: Q) -> np.ndarray:
        out = None
        for c, r in spheres:
            x = q[0] - float(c[0])
            y = q[1] - float(c[1])
            z = q[2] - float(c[2])
            x *= x
            y *= y
            z *= z
            x += y
            x += z
            np.sqrt(x, out=x)
            x -= float(r)
            out = x if out is None else np.minimum(out, x, out=out)
        return out

    base = look.v["tumor"]
    necrotic = r0 > 12.0 and rng.random() < 0.4
    vn = look.v["necrosis"]

    def value(q, d):
        # a mildly enhancing rim and a darker centre, as in hypo-enhancing PDAC
        out = base * (0.8 + 0.4 * np.clip(1.0 + d / (0.5 * r0), 0.0, 1.0))
        if necrotic:
            fn = np.clip(0.5 - (d + 0.55 * r0) / 2.0, 0.0, 1.0)
            out += fn * (vn - out)
        return out

    return _Layer(
        "tumor",
        centre - ext,
        centre + ext,
        value,
        look.t["tumor"],
        sdf=sdf,
        bump=waves,
        bump_amp=amp,
        label=TUMOR,
    )


def _place_tumors(
    rng, canvas: _Canvas, anatomy: _Anatomy, look: _Look, n: int, vox_ml: float, small: bool
) -> list[_Layer]:
    """Tumors in or touching the pancreas, each one connected component, apart from each other."""
    if n == 0:
        return []
    tube = anatomy.pancreas
    lo_ml = max(0.5, 12 * vox_ml) if small else 0.5
    hi_ml = 40.0
    structure = ndimage.generate_binary_structure(3, 1)
    for _attempt in range(40):
        placed: list[tuple[_Layer, tuple, np.ndarray]] = []
        taken = np.zeros(canvas.shape, bool)
        ok = True
        for _ in range(n):
            found = None
            for _try in range(30):
                tiny = rng.random() < 0.2
                lo_t, hi_t = (max(0.6, lo_ml * 1.2), 2.0) if tiny else (2.0, 32.0)
                target = math.exp(rng.uniform(math.log(lo_t), math.log(max(hi_t, lo_t * 1.5))))
                r0 = (3.0 * target * 1000.0 / (4.0 * math.pi * 1.05)) ** (1.0 / 3.0)
                head = rng.random() < 0.6
                pos = rng.uniform(0.0, 0.35) if head else rng.uniform(0.35, 0.95)
                i = int(pos * (len(tube.p) - 1))
                axis = tube.p[min(i + 1, len(tube.p) - 1)] - tube.p[max(i - 1, 0)]
                axis /= np.linalg.norm(axis)
                off = rng.normal(size=3)
                off -= axis * (off @ axis)
                off /= np.linalg.norm(off) + 1e-9
                rp = tube.r[i]
                if rng.random() < 0.25:  # at the gland border, partly exophytic
                    dist = rp + rng.uniform(-0.2, 0.35) * r0
                else:
                    dist = rng.uniform(0.0, 0.6) * rp
                centre = tube.p[i] + off * dist
                for _scale in range(4):
                    layer = _tumor_layer(rng, look, centre, r0)
                    box, d = canvas.evaluate(layer)
                    if box is None:
                        break
                    mask = d < 0
                    vol = float(mask.sum()) * vox_ml
                    if vol < lo_ml:
                        r0 *= 1.25 * max(1.0, (lo_ml / max(vol, 1e-3)) ** (1 / 3))
                        continue
                    if vol > hi_ml:
                        r0 *= 0.9 * (hi_ml / vol) ** (1 / 3)
                        continue
                    break
                else:
                    continue
                if box is None or not (lo_ml <= vol <= hi_ml):
                    continue
                sl = (slice(box[0], box[1]), slice(box[2], box[3]), slice(box[4], box[5]))
                if ndimage.label(mask, structure)[1] != 1:
                    continue
                grown = ndimage.binary_dilation(mask, np.ones((3, 3, 3), bool), iterations=2)
                if np.any(grown & taken[sl]):
                    continue
                found = (layer, box, mask)
                break
            if found is None:
                ok = False
                break
            layer, box, mask = found
            sl = (slice(box[0], box[1]), slice(box[2], box[3]), slice(box[4], box[5]))
            taken[sl] |= mask
            placed.append(found)
        if not ok:
            continue
        # every tumor must still touch the pancreas that remains around it
        for _layer, box, mask in placed:
            sl = (slice(box[0], box[1]), slice(box[2], box[3]), slice(box[4], box[5]))
            panc = (canvas.label[sl] == PANCREAS) & ~taken[sl]
            if not np.any(ndimage.binary_dilation(mask, structure, iterations=2) & panc):
                ok = False
                break
        if ok:
            return [layer for layer, _, _ in placed]
    raise RuntimeError(f"could not place {n} tumor(s) after 40 attempts")


# --------------------------------------------------------------------------------------------
# Texture, bias, noise, motion
# --------------------------------------------------------------------------------------------


def _lerp_weights(n_out: int, n_in: int) -> tuple[np.ndarray, np.ndarray]:
    """Lower neighbour and weight of the upper one, for linear upsampling n_in -> n_out."""
    x = np.linspace(0.0, n_in - 1.0, n_out)
    i0 = np.clip(np.floor(x).astype(int), 0, n_in - 2)
    return i0, (x - i0).astype(_F32)


def _upsample(low: np.ndarray, n_out: int, axis: int) -> np.ndarray:
    # plain indexing rather than BLAS: small matrix products stall on a busy machine
    i0, fr = _lerp_weights(n_out, low.shape[axis])
    shape = [1, 1, 1]
    shape[axis] = n_out
    fr = fr.reshape(shape)
    out = np.take(low, i0, axis=axis) * (1.0 - fr)
    out += np.take(low, i0 + 1, axis=axis) * fr
    return out


def _finish(canvas: _Canvas, rng_tex, rng_noise, spacing, look: _Look, motion: bool, rng_motion):
    """Texture -> through-slice partial volume -> bias -> motion -> Rician noise -> int16."""
    nz, ny, nx = canvas.shape
    sz, sy, sx = spacing
    img, amp = canvas.img, canvas.amp
    # correlated texture: low-res noise, lightly smoothed, upsampled linearly
    low_shape = (
        max(2, math.ceil(nz * sz / 6.0) + 1),
        max(2, math.ceil(ny * sy / 3.0) + 1),
        max(2, math.ceil(nx * sx / 3.0) + 1),
    )
    low = ndimage.gaussian_filter(rng_tex.standard_normal(low_shape).astype(_F32), 0.7)
    low /= low.std() + 1e-6
    z0, zf = _lerp_weights(nz, low_shape[0])
    mid = _upsample(_upsample(low, nx, 2), ny, 1)
    # bias field: separable smooth product (receive-coil shading)
    c = rng_tex.normal(0.0, 1.0, 6) * np.array([0.10, 0.10, 0.06, 0.08, 0.08, 0.05])
    u = np.linspace(-1, 1, nx, dtype=_F32)[None, :]
    w = np.linspace(-1, 1, ny, dtype=_F32)[:, None]
    bxy = np.exp(c[0] * u + c[1] * w + c[2] * u * w + c[3] * u * u + c[4] * w * w).astype(_F32)
    zz = np.linspace(-1, 1, nz)
    bz = np.exp(c[5] * zz + rng_tex.normal(0, 0.04) * zz * zz).astype(_F32)

    step = max(1, _CHUNK // (ny * nx))
    for c0 in range(0, nz, step):
        c1 = min(nz, c0 + step)
        tex = mid[z0[c0:c1]] * (1.0 - zf[c0:c1])[:, None, None]
        tex += mid[z0[c0:c1] + 1] * zf[c0:c1][:, None, None]
        tex *= amp[c0:c1]
        tex += 1.0
        img[c0:c1] *= tex
    del canvas.amp

    w_pv = float(rng_tex.uniform(0.12, 0.2))  # slice profile overlap
    ghost = None
    if motion:
        axis = 1 if rng_motion.random() < 0.7 else 2
        n_ax = img.shape[axis]
        ghost = (
            axis,
            int(n_ax // rng_motion.integers(3, 8)),
            float(rng_motion.uniform(0.04, 0.12)),
            int(rng_motion.integers(1, 4)),
        )
    sigma = float(look.noise_sigma)
    out = np.empty(canvas.shape, np.int16)
    prev = img[0].copy()
    for c0 in range(0, nz, step):
        c1 = min(nz, c0 + step)
        nxt = img[min(c1, nz - 1)]
        block = img[c0:c1]
        up = np.concatenate([prev[None], block[:-1]], axis=0)
        down = np.concatenate([block[1:], nxt[None]], axis=0)
        prev = block[-1].copy()
        x = block * (1.0 - 2 * w_pv)
        x += w_pv * (up + down)
        x *= bxy[None]
        x *= bz[c0:c1, None, None]
        if ghost is not None:
            axis, shift, a, blur = ghost
            blurred = 0.5 * x + 0.25 * (np.roll(x, blur, axis) + np.roll(x, -blur, axis))
            x = (1.0 - a) * blurred + 0.5 * a * (np.roll(x, shift, axis) + np.roll(x, -shift, axis))
        n1 = rng_noise.standard_normal(x.shape, dtype=_F32)
        n1 *= sigma
        x += n1
        x *= x
        n1 = rng_noise.standard_normal(x.shape, dtype=_F32)
        n1 *= sigma
        n1 *= n1
        x += n1
        np.sqrt(x, out=x)
        np.clip(x, 0, 32767, out=x)
        np.rint(x, out=x)
        out[c0:c1] = x
    return out


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def case_seed(seed: int, index: int) -> int:
    """Seed of case `index` in a dataset: independent of how many cases are generated."""
    state = np.random.SeedSequence([int(seed), int(index)]).generate_state(2, dtype=np.uint32)
    return int(state[0]) << 30 | int(state[1]) >> 2


def _check_args(task, size, n_tumors, direction, shape_zyx, tumor_probs, motion_prob) -> None:
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    if size not in SIZES:
        raise ValueError(f"size must be one of {SIZES}, got {size!r}")
    if n_tumors is not None and (
        isinstance(n_tumors, bool)
        or not isinstance(n_tumors, int | np.integer)
        or not 0 <= n_tumors <= 2
    ):
        raise ValueError(f"n_tumors must be None or an integer in 0..2, got {n_tumors!r}")
    if direction is not None and direction not in DIRECTION_KINDS:
        raise ValueError(f"direction must be None or one of {DIRECTION_KINDS}, got {direction!r}")
    if shape_zyx is not None and (len(shape_zyx) != 3 or any(int(s) < 8 for s in shape_zyx)):
        raise ValueError(f"shape_zyx must be three sizes >= 8, got {shape_zyx!r}")
    p = np.asarray(tumor_probs, float)
    if p.shape != (3,) or np.any(p < 0) or p.sum() <= 0:
        raise ValueError(f"tumor_probs must be three non-negative weights, got {tumor_probs!r}")
    if not 0.0 <= motion_prob <= 1.0:
        raise ValueError(f"motion_prob must be in [0, 1], got {motion_prob!r}")


def generate_case(
    seed: int,
    task: str = "task1",
    size: str = "full",
    n_tumors: int | None = None,
    *,
    direction: str | None = None,
    shape_zyx: tuple[int, int, int] | None = None,
    motion: bool | None = None,
    tumor_probs: tuple[float, float, float] = DEFAULT_TUMOR_PROBS,
    motion_prob: float = DEFAULT_MOTION_PROB,
) -> Phantom:
    """One phantom, fully determined by its arguments.

    `direction`, `shape_zyx`, `motion` and `n_tumors` force what is otherwise drawn at random; each
    aspect uses its own random stream, so forcing one (e.g. the direction) leaves the anatomy of
    that seed unchanged, which makes orientation effects testable.
    """
    _check_args(task, size, n_tumors, direction, shape_zyx, tumor_probs, motion_prob)
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    streams = np.random.SeedSequence(int(seed)).spawn(8)
    r_geom, r_dir, r_anat, r_tum, r_look, r_tex, r_noise, r_mot = (
        np.random.default_rng(s) for s in streams
    )

    # who the patient is
    look = _Look(r_look, task)
    body = _draw_body(r_anat)
    anatomy = _Anatomy(r_anat, body, look)

    # how they were scanned
    probs = np.asarray(_DIRECTION_PROBS)
    kind_drawn = DIRECTION_KINDS[int(r_dir.choice(len(DIRECTION_KINDS), p=probs / probs.sum()))]
    kind = direction or kind_drawn
    dmat = _direction(kind, r_dir)
    patient_rot = _rot("z", float(np.clip(r_geom.normal(0, 4), -10, 10)))
    axes = patient_rot.T @ dmat
    spacing, shape, limits = _grid(r_geom, task, size, body, axes, shape_zyx)
    body_centre = r_geom.uniform([-60.0, -60.0, -400.0], [60.0, 60.0, 400.0])
    fov_shift = np.array([*np.clip(r_geom.normal(0, 3, 2), -5, 5), r_geom.uniform(-10, 25)])
    spacing, shape = _fit_body(body, axes, fov_shift, spacing, shape, limits)
    shape = tuple(int(s) for s in shape)
    grid_centre = body_centre + patient_rot @ fov_shift
    sz, sy, sx = spacing
    spacing_xyz = np.array([sx, sy, sz])
    size_xyz = np.array(shape[::-1], float)
    origin = grid_centre - dmat @ (spacing_xyz * (size_xyz - 1) / 2.0)

    # index (k, j, i) -> patient frame q = R^T (p - body_centre)
    m = patient_rot.T @ dmat @ np.diag(spacing_xyz)  # columns for (i, j, k)
    a = m[:, ::-1]
    b = patient_rot.T @ (origin - body_centre)
    canvas = _Canvas(shape, a, b, ramp=0.5 * (sx + sy))
    anatomy.torso_ramp[0] = 0.5 * (sx + sy)
    for layer in anatomy.layers:
        canvas.paint(layer)

    # tumors
    tp = np.asarray(tumor_probs, float)
    drawn = int(r_tum.choice(3, p=tp / tp.sum()))
    n = drawn if n_tumors is None else int(n_tumors)
    vox_ml = float(sx * sy * sz) / 1000.0
    for layer in _place_tumors(r_tum, canvas, anatomy, look, n, vox_ml, size == "small"):
        canvas.paint(layer)

    moving = bool(r_mot.random() < motion_prob) if motion is None else bool(motion)
    label = canvas.label
    arr = _finish(canvas, r_tex, r_noise, spacing, look, moving, r_mot)

    image = sitk.GetImageFromArray(arr)
    image.SetSpacing(tuple(float(v) for v in spacing_xyz))
    image.SetOrigin(tuple(float(v) for v in origin))
    image.SetDirection(tuple(float(v) for v in dmat.ravel()))
    lab = sitk.GetImageFromArray(label)
    lab.CopyInformation(image)

    volumes = _component_volumes(label == TUMOR, vox_ml)
    info = {
        "seed": int(seed),
        "task": task,
        "size": size,
        "spacing_zyx": [float(v) for v in spacing],
        "shape_zyx": list(shape),
        "origin_xyz": [float(v) for v in origin],
        "direction": kind,
        "direction_matrix": [float(v) for v in dmat.ravel()],
        "n_tumors": len(volumes),
        "tumor_volumes_ml": [round(float(v), 4) for v in volumes],
        "motion": moving,
    }
    return Phantom(image=image, label=lab, info=info)


def _component_volumes(mask: np.ndarray, vox_ml: float) -> list[float]:
    """Volume (mL) of each connected component, labelled inside the mask's bounding box only."""
    nz = [np.flatnonzero(mask.any(axis=ax)) for ax in ((1, 2), (0, 2), (0, 1))]
    if nz[0].size == 0:
        return []
    crop = mask[tuple(slice(v[0], v[-1] + 1) for v in nz)]
    comps, n = ndimage.label(crop)
    return [float(c) * vox_ml for c in np.bincount(comps.ravel(), minlength=n + 1)[1:]]


def case_file_names(case_id: str, task: str) -> tuple[str, str]:
    """(image file name, label file name) in the PANTHER layout:
    task1: ('<id>_0001_0000.mha', '<id>_0001.mha'); task2: ('<id>_0000.mha', '<id>.mha')."""
    if task == "task1":
        return f"{case_id}_0001_0000.mha", f"{case_id}_0001.mha"
    if task == "task2":
        return f"{case_id}_0000.mha", f"{case_id}.mha"
    raise ValueError(f"task must be one of {TASKS}, got {task!r}")


def _write_image(image: sitk.Image, path: Path) -> None:
    with atomic_output(path) as tmp:
        sitk.WriteImage(image, str(tmp), useCompression=True)


def _write_case(job: tuple[Path, int, int, str, str, str]) -> dict:
    """Generates and writes case `k` of the dataset; its phantoms.json entry."""
    out_dir, seed, k, case_id, task, size = job
    phantom = generate_case(case_seed(seed, k), task=task, size=size)
    image_name, label_name = case_file_names(case_id, task)
    _write_image(phantom.image, out_dir / "ImagesTr" / image_name)
    _write_image(phantom.label, out_dir / "LabelsTr" / label_name)
    return {
        "case_id": case_id,
        "image": f"ImagesTr/{image_name}",
        "label": f"LabelsTr/{label_name}",
        "dataset_seed": int(seed),
        "index": k,
        **phantom.info,
    }


def write_dataset(
    out_dir: Path,
    n_cases: int,
    seed: int = 0,
    task: str = "task1",
    size: str = "full",
    first_id: int = 10000,
    progress: bool = True,
    jobs: int = 1,
) -> list[dict]:
    """Writes out_dir/ImagesTr/<image name> and out_dir/LabelsTr/<label name> (compressed .mha via
    SimpleITK with useCompression=True), plus out_dir/phantoms.json (list of info dicts with
    'case_id', file names), case ids f'{first_id + k:05d}'. Progress bar via tqdm when progress is
    True. Case k uses the seed derived from (seed, k). Each file is written atomically, so an
    interrupted run leaves no half-written file.
    `jobs` processes generate cases side by side; the files are the same whatever the number.
    Returns the info list."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    if size not in SIZES:
        raise ValueError(f"size must be one of {SIZES}, got {size!r}")
    if isinstance(n_cases, bool) or not isinstance(n_cases, int | np.integer) or n_cases < 1:
        raise ValueError(f"n_cases must be an integer >= 1, got {n_cases!r}")
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ValueError(f"jobs must be an integer >= 1, got {jobs!r}")
    out_dir = Path(out_dir)
    (out_dir / "ImagesTr").mkdir(parents=True, exist_ok=True)
    (out_dir / "LabelsTr").mkdir(parents=True, exist_ok=True)
    infos: list[dict] = []
    cases = [(out_dir, seed, k, f"{first_id + k:05d}", task, size) for k in range(n_cases)]
    for info in parallel_map(_write_case, cases, jobs, progress, f"phantoms {task}"):
        infos.append(info)
        # rewritten after every case so that an interrupted run still describes what it wrote
        atomic_write_text(out_dir / "phantoms.json", json.dumps(infos, indent=1) + "\n")
    return infos
