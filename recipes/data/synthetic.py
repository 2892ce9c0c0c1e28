# why over 500 lines: five generated domains sharing one set of noise/shape primitives, read side by side
"""Synthetic segmentation domains generated on the fly (numpy + OpenCV, seeded, a few ms per 256 px sample).

Domains (each returns an RGB uint8 image and a non-empty bool mask):

* `generic` -- 1 to 3 high-contrast objects (ellipses, polygons, smooth
  blobs) in saturated colours, solid or striped/checkered, on a muted
  low-contrast noise background.  The mask is the **union of all objects**, the
  convention of the binary benchmarks (salient/camouflaged objects, polyps).
* `objects` -- `generic`'s scenes, but the mask is **one** of the objects (chosen at random;
  the parts that objects drawn later cover are not in it, and an object mostly covered gives way
  to the top one): a box or a click on it must select that object and not its neighbours, as
  SAM's prompts do. The tiny core is pretrained on it.

The three adaptation domains place their objects with `_layout`: 1 to 3 per image, radii spread
over a range of sizes, centres uniform over the whole image (objects touch or cross the border as
often as anywhere else), so the mean mask is nearly flat and a location prior cannot solve them.

* `camouflage` -- 1 to 3 blobs whose texture comes from the *same* process as the
  background (a noise-warped sinusoidal grating mixed with fractal noise, coloured by one
  two-colour palette). The only cues are a rotated grating (60-90 deg), a changed grating
  frequency (x0.55-0.7 or x1.4-1.7) and a hue offset of 5-10 deg; mean colours inside and outside
  the objects are nearly equal, so colour/contrast cues learnt on `generic` do not help. The mask
  is the union of the objects (promptless, as the camouflage benchmarks score).
* `shadow` -- a textured ground with 1 to 3 occluders, each casting a shadow away from one light
  (darkened by 35-60 %, red reduced more than blue, soft Gaussian edge), and 0 to 2 dark but
  un-shadowed patches with hard edges and no blue shift as distractors. The mask is the union of
  the shadows (soft alpha > 0.5) less the occluders; shadow detection scores it with BER.
* `polyp` -- pinkish-red tissue with illumination falloff, vignetting and thin vessels, and 1 to
  3 rounded bulging polyps (dome shading, slightly different tint, a fine granular texture the
  tissue lacks, a darker base rim) with specular highlights; highlights also appear on the tissue
  so they are not a shortcut. The mask is **one** polyp (less what polyps drawn later cover), the
  one a box or point prompt points at.

Item `i` of `SyntheticDataset` depends only on `(seed, i)` (via
`np.random.default_rng([seed, i])`).
"""
from __future__ import annotations

import math
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import cv2
import numpy as np
from PIL import Image
from torch.utils.data import Dataset

__all__ = ["SYNTHETIC_DOMAINS", "make_sample", "SyntheticDataset", "write_synthetic_folder"]

# Domains understood by `make_sample` (`"demo"` is an alias of `"generic"`).
SYNTHETIC_DOMAINS: Tuple[str, ...] = ("generic", "objects", "camouflage", "shadow", "polyp")
_ALIASES = {"demo": "generic"}
_MIN_SIZE = 16


# ----------------------------------------------------------------------------- primitives
def _value_noise(rng: np.random.Generator, h: int, w: int, cell: float) -> np.ndarray:
    """Smooth noise in about [0, 1]: a coarse uniform grid (one value per `cell` px) upsampled bicubically."""
    gh, gw = max(2, int(math.ceil(h / cell)) + 1), max(2, int(math.ceil(w / cell)) + 1)
    grid = rng.random((gh, gw), dtype=np.float32)
    return cv2.resize(grid, (w, h), interpolation=cv2.INTER_CUBIC)


def _fbm(rng: np.random.Generator, h: int, w: int, cell: float, octaves: int = 3) -> np.ndarray:
    """Fractal noise, zero mean, roughly unit std."""
    acc = np.zeros((h, w), np.float32)
    amp = 1.0
    for _ in range(octaves):
        acc += amp * (_value_noise(rng, h, w, max(cell, 1.5)) - 0.5)
        cell /= 2.0
        amp *= 0.5
    acc *= 1.0 / 0.28  # the sum above has a std of ~0.28 for 2-4 octaves
    return acc


@lru_cache(maxsize=8)
def _coords(h: int, w: int) -> Tuple[np.ndarray, np.ndarray]:
    """Pixel coordinate grids (x, y), cached per size (do not modify them)."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    x.setflags(write=False)
    y.setflags(write=False)
    return x, y


def _hsv(h_deg: float, s: float, v: float) -> np.ndarray:
    """HSV (hue in degrees, s and v in [0, 1]) -> float32 RGB in 0..255."""
    h6 = (h_deg % 360.0) / 60.0
    s, v = float(np.clip(s, 0, 1)), float(np.clip(v, 0, 1)) * 255.0
    i = int(h6) % 6
    f = h6 - int(h6)
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    rgb = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i]
    return np.array(rgb, np.float32)


def _blob(rng: np.random.Generator, h: int, w: int, cx: float, cy: float, r: float, irregular: float,
          aspect: float = 1.0, angle: float = 0.0) -> np.ndarray:
    """Filled smooth star-shaped blob: radius r * (1 + sum of a few random harmonics)."""
    t = np.linspace(0.0, 2.0 * np.pi, 96, endpoint=False)
    rad = np.ones_like(t)
    for k in range(2, 6):
        rad += irregular / k * rng.uniform(-1, 1) * np.cos(k * t + rng.uniform(0, 2 * np.pi))
    rad = np.clip(rad, 0.35, 1.8) * r
    px, py = rad * np.cos(t) * aspect, rad * np.sin(t)
    ca, sa = math.cos(angle), math.sin(angle)
    pts = np.stack([cx + ca * px - sa * py, cy + sa * px + ca * py], axis=1)
    m = np.zeros((h, w), np.uint8)
    cv2.fillPoly(m, [np.round(pts).astype(np.int32)], 1)
    return m.view(bool)


def _polygon(rng: np.random.Generator, h: int, w: int, cx: float, cy: float, r: float) -> np.ndarray:
    n = int(rng.integers(3, 8))
    t = np.sort(rng.uniform(0, 2 * np.pi, n))
    rad = r * rng.uniform(0.6, 1.0, n)
    pts = np.stack([cx + rad * np.cos(t), cy + rad * np.sin(t)], axis=1)
    m = np.zeros((h, w), np.uint8)
    cv2.fillPoly(m, [np.round(pts).astype(np.int32)], 1)
    return m.view(bool)


def _ellipse(rng: np.random.Generator, h: int, w: int, cx: float, cy: float, r: float) -> np.ndarray:
    m = np.zeros((h, w), np.uint8)
    axes = (max(2, int(r * rng.uniform(0.6, 1.0))), max(2, int(r * rng.uniform(0.4, 1.0))))
    cv2.ellipse(m, (int(cx), int(cy)), axes, float(rng.uniform(0, 180)), 0, 360, 1, -1)
    return m.view(bool)


def _ensure_nonempty(mask: np.ndarray, h: int, w: int) -> np.ndarray:
    if not mask.any():
        r = max(2, min(h, w) // 8)
        mask = np.zeros((h, w), bool)
        mask[h // 2 - r : h // 2 + r, w // 2 - r : w // 2 + r] = True
    return mask


def _bbox(mask: np.ndarray, pad: int) -> Tuple[slice, slice]:
    """Slices of the mask's bounding box grown by `pad` px (clipped); the mask must be non-empty."""
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    h, w = mask.shape
    return (slice(max(0, rows[0] - pad), min(h, rows[-1] + 1 + pad)),
            slice(max(0, cols[0] - pad), min(w, cols[-1] + 1 + pad)))


def _soft(mask: np.ndarray, sigma: float) -> np.ndarray:
    a = mask.astype(np.float32)
    if sigma <= 0:
        return a
    return cv2.GaussianBlur(a, (0, 0), sigmaX=sigma, sigmaY=sigma)


def _finish(img: np.ndarray, rng: np.random.Generator, noise: float) -> np.ndarray:
    """Add luminance sensor noise (uniform, std `noise`) and round to uint8."""
    img = np.asarray(img, np.float32)
    if noise > 0:
        n = rng.random(img.shape[:2], dtype=np.float32)
        n -= 0.5
        n *= noise / 0.2887  # std of U(-0.5, 0.5) is 0.2887
        img = img + n[..., None]
    img += 0.5
    np.clip(img, 0, 255, out=img)
    return img.astype(np.uint8)


def _one_of(rng: np.random.Generator, shapes) -> np.ndarray:
    """One of the drawn shapes (chosen at random) less what the shapes drawn after it cover; one mostly
    covered (under a quarter left) gives way to the top one.
    """
    k = int(rng.integers(0, len(shapes)))
    one = shapes[k].copy()
    for later in shapes[k + 1:]:
        one &= ~later
    return one if one.sum() >= 0.25 * shapes[k].sum() else shapes[-1]


def _lerp(c0: np.ndarray, c1: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Per-pixel mix of two colours: (H, W) weights -> (H, W, 3) float32."""
    return c0 + t[..., None] * (c1 - c0)


# ----------------------------------------------------------------------------- domains
def _generic(rng: np.random.Generator, s: int, instance: bool = False) -> Tuple[np.ndarray, np.ndarray]:
    base_h = rng.uniform(0, 360)
    c0 = _hsv(base_h, rng.uniform(0.05, 0.25), rng.uniform(0.35, 0.55))
    c1 = _hsv(base_h + rng.uniform(-30, 30), rng.uniform(0.05, 0.25), rng.uniform(0.45, 0.7))
    img = _lerp(c0, c1, np.clip(0.5 + 0.25 * _fbm(rng, s, s, s / 6.0), 0, 1))
    mask = np.zeros((s, s), bool)
    shapes = []
    for _ in range(int(rng.integers(1, 4))):
        r = s * rng.uniform(0.1, 0.22)
        cx, cy = rng.uniform(r, s - r), rng.uniform(r, s - r)
        kind = int(rng.integers(0, 3))
        if kind == 0:
            shape = _ellipse(rng, s, s, cx, cy, r)
        elif kind == 1:
            shape = _polygon(rng, s, s, cx, cy, r)
        else:
            shape = _blob(rng, s, s, cx, cy, r, irregular=0.6)
        if not shape.any():
            continue
        col = _hsv(rng.uniform(0, 360), rng.uniform(0.6, 1.0), rng.uniform(0.7, 1.0))
        style = int(rng.integers(0, 3))
        sy, sx = _bbox(shape, 0)
        sub = shape[sy, sx]
        if style == 0:
            tex = np.ones(sub.shape, np.float32)
        else:
            x, y = _coords(s, s)
            x, y = x[sy, sx], y[sy, sx]
            period = rng.uniform(6, 14) * s / 256.0 + 2
            th = rng.uniform(0, np.pi)
            u = (x * math.cos(th) + y * math.sin(th)) / period
            if style == 1:
                tex = 0.75 + 0.25 * np.sign(np.sin(2 * np.pi * u))
            else:
                v = (-x * math.sin(th) + y * math.cos(th)) / period
                tex = 0.75 + 0.25 * np.sign(np.sin(np.pi * u) * np.sin(np.pi * v))
        region = img[sy, sx]
        region[sub] = (col * tex[..., None])[sub]
        mask |= shape
        shapes.append(shape)
    if instance and shapes:  # one object, less what the objects drawn after it cover
        mask = _one_of(rng, shapes)
    return _finish(img, rng, 3.0), _ensure_nonempty(mask, s, s)


def _objects(rng: np.random.Generator, s: int) -> Tuple[np.ndarray, np.ndarray]:
    return _generic(rng, s, instance=True)


def _camo_texture(rng: np.random.Generator, s: int, freq: float, theta: float,
                  sy: slice = slice(None), sx: slice = slice(None)) -> np.ndarray:
    """The shared texture process (values in [0, 1]) evaluated on the window `[sy, sx]`."""
    x, y = _coords(s, s)
    x, y = x[sy, sx], y[sy, sx]
    h, w = x.shape
    warp = _fbm(rng, h, w, s / 5.0, octaves=2)
    g = np.sin(2 * np.pi * freq * (x * math.cos(theta) + y * math.sin(theta)) + 1.6 * warp + rng.uniform(0, 6.3))
    n = _fbm(rng, h, w, s / 10.0, octaves=3)
    return np.clip(0.5 + 0.3 * g + 0.12 * n, 0.0, 1.0)


@lru_cache(maxsize=8)
def _vignette(s: int) -> np.ndarray:
    """Circular endoscope field of view (1 inside, 0 in the corners), cached per size."""
    x, y = _coords(s, s)
    v = np.clip((0.62 * s - np.sqrt((x - s / 2) ** 2 + (y - s / 2) ** 2)) / (0.08 * s), 0, 1)[..., None]
    v.setflags(write=False)
    return v


def _layout(rng: np.random.Generator, s: int, r_lo: float, r_hi: float) -> List[Tuple[float, float, float]]:
    """Where a scene's objects go: 1 object (half of the scenes), 2 (30 %) or 3 (20 %), each a
    `(cx, cy, r)` with the radius log-uniform in `[r_lo, r_hi] * s` (several sizes) and the centre
    uniform over the whole image less 0.4 r, so that objects touch or cross the border as often as
    anywhere else: no place and no size is typical, and a location prior cannot solve the domain.
    """
    n = 1 + int(rng.choice(3, p=[0.5, 0.3, 0.2]))
    out = []
    for _ in range(n):
        r = s * math.exp(rng.uniform(math.log(r_lo), math.log(r_hi)))
        m = min(0.4 * r, s / 2 - 1)
        out.append((float(rng.uniform(m, s - m)), float(rng.uniform(m, s - m)), r))
    return out


def _camouflage(rng: np.random.Generator, s: int) -> Tuple[np.ndarray, np.ndarray]:
    hue = rng.uniform(15, 130)  # earthy to foliage tones
    sat = rng.uniform(0.3, 0.6)
    dark_v, light_v = rng.uniform(0.25, 0.4), rng.uniform(0.6, 0.8)
    freq = rng.uniform(12.0, 28.0) / s  # cycles per pixel: 12-28 stripes across the image
    theta = rng.uniform(0, np.pi)

    def palette(h: float) -> Tuple[np.ndarray, np.ndarray]:
        return _hsv(h, sat, dark_v), _hsv(h + 10.0, sat * 0.8, light_v)

    img = _lerp(*palette(hue), _camo_texture(rng, s, freq, theta))
    mask = np.zeros((s, s), bool)
    for cx, cy, r in _layout(rng, s, 0.08, 0.24):
        dtheta = rng.uniform(np.pi / 3, np.pi / 2) * rng.choice([-1.0, 1.0])
        fscale = rng.uniform(1.4, 1.7) if rng.random() < 0.5 else rng.uniform(0.55, 0.7)
        dhue = rng.uniform(5.0, 10.0) * rng.choice([-1.0, 1.0])
        shape = _blob(rng, s, s, cx, cy, r, irregular=0.5, aspect=rng.uniform(0.7, 1.4), angle=rng.uniform(0, np.pi))
        if not shape.any():
            continue
        sy, sx = _bbox(shape, 3)
        obj = _lerp(*palette(hue + dhue), _camo_texture(rng, s, freq * fscale, theta + dtheta, sy, sx))
        a = _soft(shape[sy, sx], 0.8)[..., None]
        img[sy, sx] = img[sy, sx] * (1 - a) + obj * a
        mask |= shape
    return _finish(img, rng, 2.5), _ensure_nonempty(mask, s, s)


def _shadow(rng: np.random.Generator, s: int) -> Tuple[np.ndarray, np.ndarray]:
    hue = rng.uniform(0, 360)
    c0 = _hsv(hue, rng.uniform(0.05, 0.35), rng.uniform(0.55, 0.75))
    c1 = _hsv(hue + rng.uniform(-20, 20), rng.uniform(0.05, 0.35), rng.uniform(0.7, 0.95))
    t = np.clip(0.5 + 0.22 * _fbm(rng, s, s, s / rng.uniform(4, 12), octaves=4), 0, 1)
    img = _lerp(c0, c1, t)

    # dark but lit distractors: hard edges, no blue shift (0 to 2 of them)
    for _ in range(int(rng.choice(3, p=[0.4, 0.4, 0.2]))):
        r = s * rng.uniform(0.06, 0.16)
        d = _polygon(rng, s, s, rng.uniform(0, s), rng.uniform(0, s), r)
        if d.any():
            dcol = _hsv(rng.uniform(0, 50), rng.uniform(0.2, 0.5), rng.uniform(0.2, 0.35))
            dy, dx = _bbox(d, 0)
            region = img[dy, dx]
            region[d[dy, dx]] = (dcol * (0.9 + 0.1 * t[dy, dx])[..., None])[d[dy, dx]]

    # occluders and their cast shadows, all cast away from one light
    ang = rng.uniform(0, 2 * np.pi)
    dark = rng.uniform(0.4, 0.65)
    tint = np.array([dark * 0.85, dark * 0.93, min(1.0, dark * 1.1)], np.float32)
    sigma = rng.uniform(1.0, 3.0) * s / 256.0 + 0.5
    shadow = np.zeros((s, s), bool)
    occluders = []
    for ox, oy, r in _layout(rng, s, 0.05, 0.18):
        length, width = r * rng.uniform(2.0, 3.0), r * rng.uniform(0.6, 1.0)
        a = ang + rng.uniform(-0.15, 0.15)
        cx, cy = ox + 0.5 * length * math.cos(a), oy + 0.5 * length * math.sin(a)
        shadow |= _blob(rng, s, s, cx, cy, width, irregular=0.35, aspect=length / (2 * width), angle=a)
        occluders.append((ox, oy, r * rng.uniform(0.35, 0.6)))
    shadow = _ensure_nonempty(shadow, s, s)
    by, bx = _bbox(shadow, int(3 * sigma) + 2)
    alpha = _soft(shadow[by, bx], sigma)
    sub = alpha > 0.5
    alpha = np.where(sub, np.maximum(alpha, 0.5), np.minimum(alpha, 0.5))
    img[by, bx] = img[by, bx] * (1 - alpha[..., None] * (1 - tint))
    mask = np.zeros((s, s), bool)
    mask[by, bx] = sub

    # occluders drawn last (lit, on top of where their shadows start)
    for ox, oy, r in occluders:
        occ = _ellipse(rng, s, s, ox, oy, r)
        img[occ] = _hsv(rng.uniform(0, 360), rng.uniform(0.4, 0.9), rng.uniform(0.6, 0.95))
        mask &= ~occ
    return _finish(img, rng, 2.0), _ensure_nonempty(mask, s, s)


def _polyp(rng: np.random.Generator, s: int) -> Tuple[np.ndarray, np.ndarray]:
    x, y = _coords(s, s)
    hue = rng.uniform(-8, 10)
    tissue = _hsv(hue, rng.uniform(0.45, 0.65), rng.uniform(0.7, 0.9))
    lx, ly = rng.uniform(0.3, 0.7) * s, rng.uniform(0.3, 0.7) * s
    rr2 = ((x - lx) ** 2 + (y - ly) ** 2) * (1.0 / (s * s))  # squared distance to the light, in image units
    light = (0.85 + 0.15 * _fbm(rng, s, s, s / 3.0, octaves=2)) * np.clip(1.1 - 0.9 * rr2, 0.25, 1.1)
    # thin darker vessels
    vessels = np.zeros((s, s), np.uint8)
    for _ in range(int(rng.integers(2, 6))):
        p = rng.uniform(0, s, 2)
        d = rng.uniform(0, 2 * np.pi)
        steps = d + np.cumsum(rng.normal(0, 0.4, 12))  # a wandering direction
        pts = p + np.cumsum((s / 24.0) * np.stack([np.cos(steps), np.sin(steps)], 1), axis=0)
        cv2.polylines(vessels, [np.round(np.vstack([p, pts])).astype(np.int32)], False, 1, max(1, s // 200))
    vs = cv2.GaussianBlur(vessels.astype(np.float32), (0, 0), 0.7)
    img = tissue * light[..., None]
    img *= 1 - 0.35 * vs[..., None] * np.array([0.4, 1.0, 0.9], np.float32)

    sig_rim = 1.5 * s / 256.0 + 0.5
    spec = np.zeros((s, s), np.uint8)
    shapes = []
    for cx, cy, r in _layout(rng, s, 0.07, 0.22):
        shape = _blob(rng, s, s, cx, cy, r, irregular=0.3, aspect=rng.uniform(0.75, 1.3), angle=rng.uniform(0, np.pi))
        if not shape.any():
            continue
        by, bx = _bbox(shape, int(3 * sig_rim) + 3)
        m = shape[by, bx]
        dist = cv2.distanceTransform(m.astype(np.uint8), cv2.DIST_L2, 3)
        dome = np.sqrt(dist / max(float(dist.max()), 1e-6))
        pcol = _hsv(hue + rng.uniform(-6, 6), rng.uniform(0.35, 0.7), rng.uniform(0.7, 0.95))
        ldir = rng.uniform(0, 2 * np.pi)
        grad = ((x[by, bx] - cx) * math.cos(ldir) + (y[by, bx] - cy) * math.sin(ldir)) / max(r, 1.0)
        h, w = m.shape
        pits = _fbm(rng, h, w, max(2.0, s / 80.0), octaves=2)  # the mucosa's fine granular texture
        polyp = pcol * ((0.7 + 0.4 * dome - 0.12 * grad + 0.04 * pits) * light[by, bx])[..., None]
        rim = _soft(m, sig_rim)
        rim = np.clip(4 * rim * (1 - rim), 0, 1)[..., None]  # peaks at the boundary
        a = _soft(m, 0.8)[..., None]
        img[by, bx] = (img[by, bx] * (1 - a) + polyp * a) * (1 - 0.25 * rim)
        ys, xs = np.nonzero(dome > 0.6)  # specular highlights on the dome's top
        for _ in range(int(rng.integers(1, 3))):
            if len(xs) == 0:
                break
            j = int(rng.integers(0, len(xs)))
            axes = (max(1, int(s * rng.uniform(0.005, 0.02))), max(1, int(s * rng.uniform(0.004, 0.012))))
            cv2.ellipse(spec, (int(xs[j]) + bx.start, int(ys[j]) + by.start), axes, float(rng.uniform(0, 180)),
                        0, 360, 1, -1)
        shapes.append(shape)
    for _ in range(int(rng.integers(1, 6))):  # ... and on the tissue, so they are no shortcut
        axes = (max(1, int(s * rng.uniform(0.004, 0.015))), max(1, int(s * rng.uniform(0.003, 0.01))))
        centre = (int(rng.uniform(0, s)), int(rng.uniform(0, s)))
        cv2.ellipse(spec, centre, axes, float(rng.uniform(0, 180)), 0, 360, 1, -1)
    sp = cv2.GaussianBlur(spec.astype(np.float32), (0, 0), 0.8)[..., None]
    img += sp * (np.float32(250.0) - img)
    img *= _vignette(s)
    mask = _one_of(rng, shapes) if shapes else np.zeros((s, s), bool)  # the prompt's polyp
    return _finish(img, rng, 2.0), _ensure_nonempty(mask, s, s)


_MAKERS: Dict[str, Callable[[np.random.Generator, int], Tuple[np.ndarray, np.ndarray]]] = {
    "generic": _generic,
    "objects": _objects,
    "camouflage": _camouflage,
    "shadow": _shadow,
    "polyp": _polyp,
}


def _check_domain(domain: str) -> str:
    d = _ALIASES.get(domain, domain)
    if d not in _MAKERS:
        raise ValueError(f"synthetic domain {domain!r} is unknown; use one of {list(SYNTHETIC_DOMAINS)} (or 'demo')")
    return d


def _check_size(image_size: Any) -> int:
    if not isinstance(image_size, (int, np.integer)) or isinstance(image_size, bool) or image_size < _MIN_SIZE:
        raise ValueError(f"image_size={image_size!r} must be an int >= {_MIN_SIZE}, e.g. 256")
    return int(image_size)


def make_sample(domain: str, rng: np.random.Generator, image_size: int = 256) -> Tuple[np.ndarray, np.ndarray]:
    """Generate one synthetic sample (see the module docstring for the domains).

    Args:
        domain: `"generic"` (or `"demo"`), `"camouflage"`, `"shadow"` or `"polyp"`.
        rng: numpy Generator; the sample is a deterministic function of its state.
        image_size: side of the square sample (>= 16).

    Returns:
        `(image uint8 (S, S, 3) RGB, mask bool (S, S))`; the mask is never empty.

    Example:
        >>> import numpy as np
        >>> img, mask = make_sample("polyp", np.random.default_rng(0), 64)
        >>> img.shape, img.dtype, mask.dtype, bool(mask.any())
        ((64, 64, 3), dtype('uint8'), dtype('bool'), True)
    """
    d = _check_domain(domain)
    s = _check_size(image_size)
    if not isinstance(rng, np.random.Generator):
        raise ValueError(f"rng must be a numpy Generator, got {type(rng).__name__}; use np.random.default_rng(seed)")
    return _MAKERS[d](rng, s)


class SyntheticDataset(Dataset):
    """A torch Dataset of synthetic samples with `FolderDataset`'s item format.

    Item `i` is `{"image": uint8 (S, S, 3), "mask": bool (S, S), "name": "<domain>_<i>"}`
    (after `transform(image, mask)` if one is given) and depends only on `(seed, i)`.

    Args:
        domain: see `make_sample`.
        size: number of items.
        image_size: side of the square samples.
        seed: non-negative int.
        transform: optional `(image, mask) -> (image, mask)`.
        cache_mb: keep generated samples in memory up to this many MB (0: none), so that later
            epochs read them back instead of generating them again.

    Example:
        >>> ds = SyntheticDataset("camouflage", size=4, image_size=64, seed=1)
        >>> len(ds), ds[2]["name"], ds[2]["image"].shape
        (4, 'camouflage_000002', (64, 64, 3))
    """

    def __init__(
        self,
        domain: str,
        size: int = 1000,
        image_size: int = 256,
        seed: int = 0,
        transform: Optional[Callable[[np.ndarray, np.ndarray], Tuple[Any, Any]]] = None,
        cache_mb: float = 0,
    ) -> None:
        self.domain = _check_domain(domain)
        if not isinstance(size, (int, np.integer)) or isinstance(size, bool) or size < 1:
            raise ValueError(f"size={size!r} must be a positive int (number of samples)")
        if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
            raise ValueError(f"seed={seed!r} must be a non-negative int")
        if transform is not None and not callable(transform):
            raise ValueError("transform must be callable (image, mask) -> (image, mask)")
        self.size = int(size)
        self.image_size = _check_size(image_size)
        self.seed = int(seed)
        self.transform = transform
        self._cache: Dict[int, Tuple[np.ndarray, np.ndarray]] = {}
        self._cache_left = int(max(0.0, float(cache_mb)) * 2**20)

    def __len__(self) -> int:
        return self.size

    def sample(self, index: int) -> Tuple[np.ndarray, np.ndarray]:
        """The raw `(image, mask)` of item `index` (no transform).

        Args:
            index: 0 <= index < len(self) (negative indices count from the end).

        Example:
            >>> img, mask = SyntheticDataset("shadow", 2, 32).sample(1)
        """
        if not -self.size <= index < self.size:
            raise IndexError(f"index {index} out of range for a dataset of {self.size} items")
        index = index % self.size
        hit = self._cache.get(index)
        if hit is not None:
            return hit[0].copy(), hit[1].copy()
        image, mask = _MAKERS[self.domain](np.random.default_rng([self.seed, index]), self.image_size)
        if self._cache_left >= image.nbytes + mask.nbytes:
            self._cache[index] = (image.copy(), mask.copy())
            self._cache_left -= image.nbytes + mask.nbytes
        return image, mask

    def __getitem__(self, index: int) -> Dict[str, Any]:
        image, mask = self.sample(index)
        if self.transform is not None:
            image, mask = self.transform(image, mask)
        return {"image": image, "mask": mask, "name": f"{self.domain}_{index % self.size:06d}"}


def write_synthetic_folder(
    domain: str, root: Union[str, Path], n: int, image_size: int = 256, seed: int = 0
) -> Path:
    """Write `n` samples as the generic layout: `root/images/*.png` + `root/masks/*.png` (0/255).

    The files are items `0..n-1` of `SyntheticDataset(domain, n, image_size, seed)`
    named `<domain>_<i>.png`; existing files of the same names are overwritten.

    Args:
        domain: see `make_sample`.
        root: output folder (created).
        n: number of samples.
        image_size: side of the square samples.
        seed: dataset seed.

    Returns:
        `Path(root)`.

    Example:
        >>> import tempfile, os
        >>> r = write_synthetic_folder("generic", tempfile.mkdtemp(), n=2, image_size=32)
        >>> sorted(os.listdir(r / "masks"))
        ['generic_000000.png', 'generic_000001.png']
    """
    if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 1:
        raise ValueError(f"n={n!r} must be a positive int (number of samples to write)")
    ds = SyntheticDataset(domain, size=int(n), image_size=image_size, seed=seed)
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise ValueError(f"root '{root}' is a file; pass a folder path")
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    for i in range(int(n)):
        image, mask = ds.sample(i)
        name = f"{ds.domain}_{i:06d}.png"
        Image.fromarray(image).save(root / "images" / name)
        Image.fromarray(mask.astype(np.uint8) * 255).save(root / "masks" / name)
    return root
