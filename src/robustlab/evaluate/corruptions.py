"""Common corruptions and out-of-distribution (OOD) accuracy, as the protocol asks: at least 15 types × 5 severities.

Modelled on CIFAR-10-C (Hendrycks & Dietterich, ICLR 2019) and MNIST-C (Mu & Gilmer, 2019) but written anew
with numpy, scipy and Pillow only, so no image library with a native stack of its own is needed.

Every corruption takes a whole batch (float32 N×C×H×W in [0, 1]) and one numpy Generator, so a
(seed, corruption, severity) triple always gives the same images and the work is vectorized over the batch.
Spatial parameters are written for 32-pixel images and scaled to the real size. Noise strengths have two rows:
CIFAR-10-C's for colour images, and ImageNet-C's stronger ones for grayscale digits and clothes, which stay
recognizable under CIFAR-10-C's mild noise and would make those corruptions uninformative.
"""
from __future__ import annotations

import hashlib
import io
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from PIL import Image

from robustlab import checkpoint, distributed
from robustlab.data import ImageSet, check_cifar_c, load_cifar_c
from robustlab.data.corruptions_npy import SEVERITIES, check_severities
from robustlab.errors import RobustlabError, check_choice, check_integer
from robustlab.evaluate.accuracy import accuracy
from robustlab.progress import progress as progress_bar

# scipy is imported in the functions that use it: importing it costs a quarter of a second, which every command
# (robustlab.training imports this module) paid.

CHUNK = 1000  # images corrupted at once: bounds memory (coordinate grids) without losing vectorization
_CACHE_VERSION = 3  # bump when a corruption changes, so stale cached sets are not reused

Corruption = Callable[[np.ndarray, int, np.random.Generator], np.ndarray]


# ---------------------------------------------------------------------------------------------- helpers

def _param(table, x: np.ndarray, severity: int):
    """The severity's entry of a table; a dict table has separate 'gray' and 'colour' rows."""
    if isinstance(table, dict):
        table = table["gray" if x.shape[1] == 1 else "colour"]
    return table[severity - 1]


def _px(x: np.ndarray, pixels: float) -> float:
    """A length given for 32-pixel images, scaled to this image width."""
    return pixels * x.shape[-1] / 32


_ITU_601 = np.array([0.299, 0.587, 0.114], np.float32)  # the luminance of an RGB colour


def _luminance(x: np.ndarray) -> np.ndarray:
    """N×1×H×W brightness (ITU-R 601 weights for colour)."""
    if x.shape[1] == 1:
        return x
    return np.tensordot(_ITU_601, x, axes=([0], [1]))[:, None]


def _colour(x: np.ndarray, rgb) -> np.ndarray:
    """A colour as a 1×C×1×1 array matching x (its luminance for grayscale images)."""
    rgb = np.asarray(rgb, np.float32)
    value = rgb if x.shape[1] == 3 else np.array([rgb @ _ITU_601])
    return value.reshape(1, -1, 1, 1)


def _grid(x: np.ndarray):
    """Row and column coordinates of every pixel, relative to the image centre (H×W each)."""
    h, w = x.shape[-2:]
    rows, cols = np.mgrid[0:h, 0:w].astype(np.float32)
    return rows - (h - 1) / 2, cols - (w - 1) / 2


def _warp(x: np.ndarray, src_rows: np.ndarray, src_cols: np.ndarray, mode: str = "constant") -> np.ndarray:
    """Resample each image at its own source coordinates (N×H×W, absolute pixels), bilinearly.

    Outside the image, mode "constant" reads black and "nearest" repeats the edge. Four gathers over the
    whole batch: much faster than map_coordinates, which would interpolate along the batch axis too.
    """
    n, c, h, w = x.shape
    r0, c0 = np.floor(src_rows).astype(np.int64), np.floor(src_cols).astype(np.int64)
    fr, fc = (src_rows - r0).astype(np.float32), (src_cols - c0).astype(np.float32)
    channels = [np.ascontiguousarray(x[:, ch]).reshape(-1) for ch in range(c)]
    first = (np.arange(n) * (h * w))[:, None, None]
    out = np.zeros_like(x)
    for dr, dc, weight in ((0, 0, (1 - fr) * (1 - fc)), (0, 1, (1 - fr) * fc), (1, 0, fr * (1 - fc)), (1, 1, fr * fc)):
        rr, cc = r0 + dr, c0 + dc
        if mode == "constant":
            weight = weight * ((rr >= 0) & (rr < h) & (cc >= 0) & (cc < w))
        index = first + np.clip(rr, 0, h - 1) * w + np.clip(cc, 0, w - 1)
        for ch in range(c):
            out[:, ch] += weight * np.take(channels[ch], index)
    return out


def _warp_relative(x: np.ndarray, rows: np.ndarray, cols: np.ndarray, mode: str = "constant") -> np.ndarray:
    """`_warp` with source coordinates given relative to the image centre."""
    h, w = x.shape[-2:]
    return _warp(x, rows + (h - 1) / 2, cols + (w - 1) / 2, mode)


def _interp_matrix(coords: np.ndarray, size: int) -> np.ndarray:
    """Rows of linear-interpolation weights that sample a line of `size` pixels at `coords` (edges repeat)."""
    coords = np.clip(coords, 0, size - 1)
    low = np.minimum(np.floor(coords).astype(int), size - 2) if size > 1 else np.zeros(len(coords), int)
    frac = (coords - low).astype(np.float32)
    m = np.zeros((len(coords), size), np.float32)
    m[np.arange(len(coords)), low] += 1 - frac
    if size > 1:
        m[np.arange(len(coords)), low + 1] += frac
    return m


def _box_matrix(src: int, dst: int) -> np.ndarray:
    """Area-averaging resampling from `src` to `dst` pixels, as a dst×src matrix."""
    edges_dst = np.arange(dst + 1) * src / dst  # target pixel boundaries in source pixel units
    lo, hi = edges_dst[:-1, None], edges_dst[1:, None]
    left, right = np.arange(src)[None], np.arange(src)[None] + 1
    overlap = np.clip(np.minimum(hi, right) - np.maximum(lo, left), 0, None)
    return (overlap / overlap.sum(1, keepdims=True)).astype(np.float32)


def _separable(x: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Apply a linear map per axis (rows: H'×H, cols: W'×W) to every image and channel at once."""
    return np.matmul(np.matmul(rows, x), cols.T)


def _zoom_about_centre(x: np.ndarray, factor: float) -> np.ndarray:
    """Magnify every image by `factor` about its centre, keeping the size (edge pixels repeat)."""
    h, w = x.shape[-2:]
    rows = _interp_matrix((h - 1) / 2 + (np.arange(h) - (h - 1) / 2) / factor, h)
    cols = _interp_matrix((w - 1) / 2 + (np.arange(w) - (w - 1) / 2) / factor, w)
    return _separable(x, rows, cols)


def _convolve_each(x: np.ndarray, kernels: np.ndarray) -> np.ndarray:
    """Convolve image i with kernels[i] (N×K×K, K odd) via FFT, reflecting at the borders."""
    import scipy.fft
    n, c, h, w = x.shape
    r = kernels.shape[-1] // 2
    padded = np.pad(x, ((0, 0), (0, 0), (r, r), (r, r)), mode="reflect")
    ph, pw = padded.shape[-2:]
    k = np.zeros((n, ph, pw), np.float32)
    k[:, :2 * r + 1, :2 * r + 1] = kernels
    k = np.roll(k, (-r, -r), axis=(1, 2))  # kernel centre at the origin
    out = scipy.fft.irfft2(scipy.fft.rfft2(padded) * scipy.fft.rfft2(k)[:, None], s=(ph, pw))
    return out[..., r:r + h, r:r + w].astype(np.float32)


def _motion_kernels(n: int, radius: float, sigma: float, angles_deg: np.ndarray) -> np.ndarray:
    """One-sided line kernels with Gaussian weights along the line (a camera shake), one per angle.

    The line is 2·⌈radius⌉ pixels long, as ImageMagick's MotionBlurImage (which CIFAR-10-C calls) spans
    GetOptimalKernelWidth1D(radius, σ) = 2·⌈radius⌉ + 1 taps: σ, not the radius, sets the streak's length.
    """
    length = 2 * int(np.ceil(radius))
    size = 2 * length + 1
    r = size // 2
    t = np.arange(0, length + 1e-6, 0.5, dtype=np.float32)  # half-pixel samples along the line
    weights = np.exp(-t ** 2 / (2 * sigma ** 2))
    theta = np.deg2rad(angles_deg)[:, None]
    rows, cols = r - t * np.sin(theta), r + t * np.cos(theta)  # n×T positions
    kernels = np.zeros((n, size, size), np.float32)
    r0, c0 = np.floor(rows).astype(int), np.floor(cols).astype(int)
    fr, fc = rows - r0, cols - c0
    img = np.broadcast_to(np.arange(n)[:, None], rows.shape)
    for dr, dc, share in ((0, 0, (1 - fr) * (1 - fc)), (0, 1, (1 - fr) * fc), (1, 0, fr * (1 - fc)), (1, 1, fr * fc)):
        rr, cc = np.clip(r0 + dr, 0, size - 1), np.clip(c0 + dc, 0, size - 1)
        np.add.at(kernels, (img, rr, cc), share * weights)
    return kernels / kernels.sum((1, 2), keepdims=True)


def _fractal_noise(rng: np.random.Generator, n: int, h: int, w: int, slope: float) -> np.ndarray:
    """N×H×W noise with amplitude ∝ 1/f^slope, scaled to [0, 1]: the plasma-fractal look of fog and frost.

    Drawn at twice the size and cropped, so the FFT's wrap-around does not show.
    """
    import scipy.fft
    H, W = 2 * h, 2 * w
    fy, fx = scipy.fft.fftfreq(H)[:, None], scipy.fft.rfftfreq(W)[None, :]
    f = np.sqrt(fy ** 2 + fx ** 2)
    f[0, 0] = 1.0
    amplitude = (f ** -slope).astype(np.float32)
    amplitude[0, 0] = 0.0
    field = scipy.fft.irfft2(scipy.fft.rfft2(rng.standard_normal((n, H, W), dtype=np.float32)) * amplitude,
                             s=(H, W))[:, :h, :w]
    lo, hi = field.min((1, 2), keepdims=True), field.max((1, 2), keepdims=True)
    return ((field - lo) / np.maximum(hi - lo, 1e-12)).astype(np.float32)


def _draw_segments(x: np.ndarray, image: np.ndarray, starts: np.ndarray, ends: np.ndarray,
                   value: float = 1.0, dotted: bool = False) -> np.ndarray:
    """Paint one-pixel segments (starts/ends: M×2 row, col) into the given images; dotted skips every other pixel."""
    length = np.linalg.norm(ends - starts, axis=1)
    t = np.linspace(0, 1, int(np.ceil(2 * length.max())) + 2, dtype=np.float32)
    points = starts[:, None, :] + t[None, :, None] * (ends - starts)[:, None, :]
    keep = np.ones(points.shape[:2], bool)
    if dotted:
        keep = (np.floor(t[None, :] * length[:, None]) % 2) == 0
    r, c = np.rint(points[..., 0]).astype(int), np.rint(points[..., 1]).astype(int)
    h, w = x.shape[-2:]
    keep &= (r >= 0) & (r < h) & (c >= 0) & (c < w)
    img = np.broadcast_to(image[:, None], r.shape)
    x[img[keep], :, r[keep], c[keep]] = value
    return x


# ---------------------------------------------------------------------------------------------- noise

_GAUSSIAN_NOISE = {"colour": (0.04, 0.06, 0.08, 0.09, 0.10), "gray": (0.08, 0.12, 0.18, 0.26, 0.38)}
_SHOT_NOISE = {"colour": (500, 250, 100, 75, 50), "gray": (60, 25, 12, 5, 3)}  # photons at full brightness
_IMPULSE_NOISE = {"colour": (0.01, 0.02, 0.03, 0.05, 0.07), "gray": (0.03, 0.06, 0.09, 0.17, 0.27)}
_SPECKLE_NOISE = {"colour": (0.06, 0.10, 0.12, 0.16, 0.20), "gray": (0.15, 0.20, 0.35, 0.45, 0.60)}


def gaussian_noise(x, severity, rng):
    """Additive sensor noise, independent per pixel and channel."""
    return x + _param(_GAUSSIAN_NOISE, x, severity) * rng.standard_normal(x.shape, dtype=np.float32)


def shot_noise(x, severity, rng):
    """Photon (Poisson) noise: a pixel is a photon count, so dim pixels get relatively more noise."""
    photons = _param(_SHOT_NOISE, x, severity)
    return rng.poisson(x * photons).astype(np.float32) / photons


def impulse_noise(x, severity, rng):
    """Salt-and-pepper: a fraction of values (per channel) set to 0 or 1, like dead and hot pixels."""
    amount = _param(_IMPULSE_NOISE, x, severity)
    u = rng.random(x.shape, dtype=np.float32)
    out = x.copy()
    out[u < amount / 2] = 0.0
    out[(u >= amount / 2) & (u < amount)] = 1.0
    return out


def speckle_noise(x, severity, rng):
    """Multiplicative noise: bright regions are disturbed more than dark ones."""
    return x + x * _param(_SPECKLE_NOISE, x, severity) * rng.standard_normal(x.shape, dtype=np.float32)


# ---------------------------------------------------------------------------------------------- blur

_GAUSSIAN_BLUR = (0.4, 0.6, 0.7, 0.8, 1.0)  # σ, pixels at 32 px (CIFAR-10-C)
_DEFOCUS_BLUR = ((0.75, 0.4), (1.0, 0.5), (1.25, 0.5), (1.5, 0.5), (2.0, 0.5))  # disk radius, anti-alias σ
_MOTION_BLUR = ((6, 1.0), (6, 1.5), (6, 2.0), (8, 2.0), (9, 2.5))  # kernel radius, σ along the line (CIFAR-10-C)
_ZOOM_BLUR = (1.05, 1.10, 1.15, 1.20, 1.25)  # largest magnification
_GLASS_BLUR = ((0.05, 1, 1), (0.25, 1, 1), (0.4, 1, 1), (0.25, 1, 2), (0.4, 1, 2))  # σ, max shift, rounds


def gaussian_blur(x, severity, rng):
    """An out-of-focus lens approximated by a Gaussian point-spread function."""
    from scipy import ndimage
    sigma = _px(x, _param(_GAUSSIAN_BLUR, x, severity))
    return ndimage.gaussian_filter(x, sigma=(0, 0, sigma, sigma), mode="nearest")


def defocus_blur(x, severity, rng):
    """A disk point-spread function (the lens aperture), softened against aliasing.

    The disk is anti-aliased (pixel coverage, 8×8 samples per pixel): CIFAR-10-C's hard disk of radius
    0.3–1 is a single pixel on small images, which left several severities without any blur; its radii
    are raised here so that blur grows with every severity. A radius of 0.5 at severity 1 (before session
    37) fell inside the centre pixel, which made it gaussian_blur's severity 1 exactly.
    """
    from scipy import ndimage
    radius, alias = (_px(x, v) for v in _param(_DEFOCUS_BLUR, x, severity))
    r = int(np.ceil(radius)) + 1
    sub = (np.arange(8) + 0.5) / 8 - 0.5
    yy = np.arange(-r, r + 1)[:, None, None, None] + sub[None, None, :, None]
    xx = np.arange(-r, r + 1)[None, :, None, None] + sub[None, None, None, :]
    disk = ((yy ** 2 + xx ** 2) <= radius ** 2).mean((2, 3)).astype(np.float32)
    disk = ndimage.gaussian_filter(disk, alias)
    disk /= disk.sum()
    return ndimage.correlate(x, disk[None, None], mode="reflect")


def motion_blur(x, severity, rng):
    """A camera shake along a random direction per image (within ±45° of horizontal)."""
    radius, sigma = (_px(x, v) for v in _param(_MOTION_BLUR, x, severity))
    angles = rng.uniform(-45, 45, size=len(x))
    return _convolve_each(x, _motion_kernels(len(x), radius, sigma, angles))


def zoom_blur(x, severity, rng):
    """The camera moving toward the object during the exposure: the mean of progressively magnified copies."""
    top = _param(_ZOOM_BLUR, x, severity)
    factors = np.linspace(1, top, 1 + int(round((top - 1) / 0.02)))[1:]
    out = x.copy()
    for factor in factors:
        out += _zoom_about_centre(x, factor)
    return out / (len(factors) + 1)


def glass_blur(x, severity, rng):
    """Frosted glass: blur, shuffle pixels locally (each takes a random neighbour's value), blur again."""
    from scipy import ndimage
    sigma, shift, rounds = _param(_GLASS_BLUR, x, severity)
    sigma = _px(x, sigma)
    n, _, h, w = x.shape
    out = ndimage.gaussian_filter(x, sigma=(0, 0, sigma, sigma), mode="nearest")
    rows, cols = np.mgrid[0:h, 0:w]
    img = np.arange(n)[:, None, None]
    for _ in range(rounds):
        dr = rng.integers(-shift, shift + 1, size=(n, h, w))
        dc = rng.integers(-shift, shift + 1, size=(n, h, w))
        src_r, src_c = np.clip(rows + dr, 0, h - 1), np.clip(cols + dc, 0, w - 1)
        out = out[img, :, src_r, src_c].transpose(0, 3, 1, 2)
    return ndimage.gaussian_filter(out, sigma=(0, 0, sigma, sigma), mode="nearest")


# ---------------------------------------------------------------------------------------------- weather

_FOG = ((0.2, 1.6), (0.5, 1.6), (0.75, 1.45), (1.0, 1.3), (1.5, 1.2))  # strength, spectral slope (smoothness)
_FROST = ((1.0, 0.2), (1.0, 0.3), (0.9, 0.4), (0.85, 0.4), (0.75, 0.45))  # image weight, frost weight
# flake mean, flake spread, magnification, threshold, streak radius, streak σ, image weight (CIFAR-10-C)
_SNOW = ((0.1, 0.2, 1.0, 0.6, 8, 3, 0.95), (0.1, 0.2, 1.0, 0.5, 10, 4, 0.9), (0.15, 0.3, 1.75, 0.55, 10, 4, 0.9),
         (0.25, 0.3, 2.25, 0.6, 12, 6, 0.85), (0.3, 0.3, 1.25, 0.65, 14, 12, 0.8))
# liquid mean, spread, smoothing σ, threshold, drop-edge σ, liquid. Colour: CIFAR-10-C's. Grayscale: its mud (luminance
# 0.18) hardly shows on dark backgrounds and its water is not ordered by coverage (severity 3 covered about a third of
# the image, 4 and 5 left Fashion-MNIST accuracy at clean's), so water at every severity, covering about 5, 10, 20, 32
# and 45% of the image (severity 3's drops, thresholds lowered).
_SPATTER = {"colour": ((0.62, 0.1, 0.7, 0.7, 0.5, "water"), (0.65, 0.1, 0.8, 0.7, 0.5, "water"),
                       (0.65, 0.3, 1.0, 0.69, 0.5, "water"), (0.65, 0.1, 0.7, 0.69, 0.6, "mud"),
                       (0.65, 0.1, 0.5, 0.68, 0.6, "mud")),
            "gray": tuple((0.65, 0.3, 1.0, t, 0.5, "water") for t in (0.79, 0.76, 0.72, 0.69, 0.66))}
_BRIGHTNESS = (0.05, 0.1, 0.15, 0.2, 0.3)  # added to the HSV value


def fog(x, severity, rng):
    """Smooth fractal haze added over the image, whose contrast drops to keep the range."""
    strength, slope = _param(_FOG, x, severity)
    n, _, h, w = x.shape
    haze = 0.4 + 0.6 * _fractal_noise(rng, n, h, w, slope)[:, None]  # clouds everywhere, thicker in places
    peak = x.max((1, 2, 3), keepdims=True)
    return (x + strength * haze) * peak / (peak + strength)


def frost(x, severity, rng):
    """Ice crystals on a window: thin bright ridges of rough fractal noise over a faint haze, bluish in colour.

    CIFAR-10-C pastes photographs of frost; synthesizing the texture keeps the suite free of image files.
    """
    keep, weight = _param(_FROST, x, severity)
    n, _, h, w = x.shape
    ridges = (1 - np.abs(2 * _fractal_noise(rng, n, h, w, 1.2) - 1)) ** 8
    haze = _fractal_noise(rng, n, h, w, 1.6)
    texture = np.clip(0.9 * ridges + 0.5 * haze, 0, 1)[:, None]
    return keep * x + weight * texture * _colour(x, (0.85, 0.93, 1.0))


def snow(x, severity, rng):
    """Falling snow: bright flakes streaked by motion, over an image washed toward white."""
    mean, spread, zoom, threshold, radius, sigma, keep = _param(_SNOW, x, severity)
    n, _, h, w = x.shape
    flakes = rng.normal(mean, spread, size=(n, 1, h, w)).astype(np.float32)
    flakes = _zoom_about_centre(flakes, zoom) if zoom != 1 else flakes
    flakes[flakes < threshold] = 0
    angles = rng.uniform(-135, -45, size=n)
    flakes = _convolve_each(flakes, _motion_kernels(n, _px(x, radius), _px(x, sigma), angles))
    washed = keep * x + (1 - keep) * np.maximum(x, _luminance(x) * 1.5 + 0.5)
    return washed + flakes + flakes[..., ::-1, ::-1]


def spatter(x, severity, rng):
    """Drops on the lens: bright glossy water blobs (low severities) or opaque mud (high ones); on grayscale
    images water at every severity, more of it each time (see `_SPATTER`)."""
    from scipy import ndimage
    mean, spread, sigma, threshold, edge, liquid = _param(_SPATTER, x, severity)
    n, _, h, w = x.shape
    layer = ndimage.gaussian_filter(rng.normal(0, spread, size=(n, h, w)).astype(np.float32),
                                    sigma=(0, _px(x, sigma), _px(x, sigma)))
    # Smoothing with a σ scaled to the image shrinks the layer's spread by that scale (it averages ∝ σ² pixels),
    # which would move the fixed threshold: at 64 pixels severity 1 covered 0.1% of the image instead of 11%.
    layer = mean + layer * _px(x, 1.0)
    drops = ndimage.gaussian_filter((layer > threshold).astype(np.float32), sigma=(0, _px(x, edge), _px(x, edge)))[:, None]
    if liquid == "water":
        shine = 0.6 * drops
        return x * (1 - shine) + shine * (0.3 * x + 0.7 * _colour(x, (0.93, 0.95, 1.0)))
    drops[drops < 0.8] = 0  # CIFAR-10-C's cut: only the cores of the smoothed blobs stay mud
    return x * (1 - drops) + drops * _colour(x, (63 / 255, 42 / 255, 20 / 255))


def brightness(x, severity, rng):
    """Over-exposure: CIFAR-10-C adds to the HSV value; done in closed form here (hue and saturation kept)."""
    amount = _param(_BRIGHTNESS, x, severity)
    value = x.max(1, keepdims=True)
    brighter = np.minimum(value + amount, 1.0)
    return np.where(value > 0, x * brighter / np.maximum(value, 1e-8), amount)


# ---------------------------------------------------------------------------------------------- digital

_CONTRAST = (0.75, 0.5, 0.4, 0.3, 0.15)
_ELASTIC = ((0.6, 4.0), (1.0, 4.0), (1.4, 3.5), (1.8, 3.0), (2.2, 3.0))  # RMS displacement, smoothing σ (px at 32)
_PIXELATE = (0.95, 0.9, 0.85, 0.75, 0.65)  # fraction of the resolution kept
_JPEG = (80, 65, 58, 50, 40)  # quality
_SATURATE = ((0.3, 0.0), (0.1, 0.0), (1.5, 0.0), (2.0, 0.1), (2.5, 0.2))  # HSV saturation ×a + b


def contrast(x, severity, rng):
    """Low contrast: pixels pulled toward each image's mean, per channel (CIFAR-10-C's mean over H×W)."""
    factor = _param(_CONTRAST, x, severity)
    mean = x.mean((2, 3), keepdims=True)
    return (x - mean) * factor + mean


def elastic_transform(x, severity, rng):
    """A smooth random displacement field (Simard et al. 2003): the object looks locally stretched."""
    from scipy import ndimage
    rms, sigma = (_px(x, v) for v in _param(_ELASTIC, x, severity))
    n, _, h, w = x.shape
    fields = []
    for _ in range(2):
        d = ndimage.gaussian_filter(rng.uniform(-1, 1, size=(n, h, w)).astype(np.float32), sigma=(0, sigma, sigma))
        fields.append(d * rms / np.maximum(np.sqrt((d ** 2).mean((1, 2), keepdims=True)), 1e-12))
    rows, cols = np.mgrid[0:h, 0:w].astype(np.float32)
    return _warp(x, rows + fields[0], cols + fields[1], mode="nearest")


def _nearest_matrix(src: int, dst: int) -> np.ndarray:
    """Nearest-neighbour resampling from `src` to `dst` pixels, as a dst×src matrix."""
    m = np.zeros((dst, src), np.float32)
    m[np.arange(dst), np.minimum(((np.arange(dst) + 0.5) * src / dst).astype(int), src - 1)] = 1
    return m


def pixelate(x, severity, rng):
    """Low resolution: area-downsampled, then blown up again with visible square pixels."""
    keep = _param(_PIXELATE, x, severity)
    h, w = x.shape[-2:]
    sh, sw = max(1, int(h * keep)), max(1, int(w * keep))
    return _separable(x, _nearest_matrix(sh, h) @ _box_matrix(h, sh), _nearest_matrix(sw, w) @ _box_matrix(w, sw))


def _jpeg_round_trip(picture: Image.Image, quality: int) -> np.ndarray:
    buffer = io.BytesIO()
    picture.save(buffer, format="JPEG", quality=quality)
    return np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert(picture.mode))


def jpeg_compression(x, severity, rng):
    """Lossy JPEG round trip (block artefacts, ringing) with Pillow's default encoder settings.

    Grayscale images are padded (edges repeated) to whole 8×8 blocks and stacked into one tall picture, so a
    single encode handles the batch and no block straddles two images: each result is exactly what encoding
    the image alone gives. Colour images are encoded one by one, because the decoder's chroma upsampling
    would blend neighbouring images.
    """
    quality = _param(_JPEG, x, severity)
    n, c, h, w = x.shape
    u8 = np.rint(np.clip(x, 0, 1) * 255).astype(np.uint8)
    if c == 3:
        out = np.stack([_jpeg_round_trip(Image.fromarray(img.transpose(1, 2, 0), "RGB"), quality) for img in u8])
        return out.transpose(0, 3, 1, 2).astype(np.float32) / 255
    ph, pw = -h % 8, -w % 8
    u8 = np.pad(u8[:, 0], ((0, 0), (0, ph), (0, pw)), mode="edge")
    H, W = h + ph, w + pw
    per_picture = max(1, 65000 // H)  # JPEG pictures are at most 65,535 pixels high
    out = np.concatenate([_jpeg_round_trip(Image.fromarray(u8[s:s + per_picture].reshape(-1, W), "L"), quality)
                          for s in range(0, n, per_picture)]).reshape(n, 1, H, W)
    return out[..., :h, :w].astype(np.float32) / 255


def saturate(x, severity, rng):
    """Washed-out or over-saturated colours: HSV saturation ×a + b, in closed form (colour images only)."""
    if x.shape[1] != 3:
        raise RobustlabError("corruption 'saturate' needs colour (3-channel) images")
    scale, shift = _param(_SATURATE, x, severity)
    value, low = x.max(1, keepdims=True), x.min(1, keepdims=True)
    sat = np.where(value > 0, (value - low) / np.maximum(value, 1e-8), 0)
    new_sat = np.clip(sat * scale + shift, 0, 1)
    scaled = value - (value - x) * new_sat / np.maximum(sat, 1e-8)
    hue_red = np.concatenate([value, value * (1 - new_sat), value * (1 - new_sat)], axis=1)  # HSV's hue 0
    return np.where(sat > 0, scaled, hue_red)


# ---------------------------------------------------------------------------------------------- MNIST-C style

_ROTATE = (6, 12, 18, 24, 30)  # largest angle, degrees
_SHEAR = (0.1, 0.2, 0.3, 0.4, 0.5)  # largest shear factor
_SCALE = (0.9, 0.8, 0.7, 0.6, 0.5)  # shrink factor
_TRANSLATE = (0.04, 0.08, 0.12, 0.16, 0.20)  # shift, fraction of the image size
_STRIPE = (0.04, 0.07, 0.10, 0.14, 0.18)  # width of an inverted band, fraction of the image size
_LINES = (1, 2, 3, 4, 5)  # lines drawn across the image


def _random_sign(rng, n):
    return rng.choice(np.array([-1.0, 1.0], np.float32), size=n)


def rotate(x, severity, rng):
    """Rotation by between half and all of the severity's angle, either way."""
    angle = np.deg2rad(_param(_ROTATE, x, severity) * rng.uniform(0.5, 1, len(x)) * _random_sign(rng, len(x)))
    cos, sin = np.cos(angle)[:, None, None], np.sin(angle)[:, None, None]
    rows, cols = _grid(x)
    return _warp_relative(x, cos * rows - sin * cols, sin * rows + cos * cols)


def shear(x, severity, rng):
    """Horizontal or vertical shear, either way."""
    n = len(x)
    amount = (_param(_SHEAR, x, severity) * rng.uniform(0.5, 1, n) * _random_sign(rng, n))[:, None, None]
    horizontal = rng.random(n)[:, None, None] < 0.5
    rows, cols = _grid(x)
    return _warp_relative(x, np.where(horizontal, rows, rows + amount * cols),
                          np.where(horizontal, cols + amount * rows, cols))


def scale(x, severity, rng):
    """The object shrunk about the centre (it looks farther away)."""
    factor = _param(_SCALE, x, severity)
    rows, cols = _grid(x)
    shape = (len(x),) + rows.shape
    return _warp_relative(x, np.broadcast_to(rows / factor, shape), np.broadcast_to(cols / factor, shape))


def translate(x, severity, rng):
    """A shift in a random direction; the object may leave the frame partly."""
    n, _, h, w = x.shape
    angle = rng.uniform(0, 2 * np.pi, n)
    step = _param(_TRANSLATE, x, severity) * max(h, w)
    rows, cols = _grid(x)
    return _warp_relative(x, rows - (step * np.sin(angle))[:, None, None], cols - (step * np.cos(angle))[:, None, None])


def stripe(x, severity, rng):
    """An inverted band (vertical or horizontal) at a random place: a sensor or scanner fault."""
    n, _, h, w = x.shape
    width = max(1, int(round(_param(_STRIPE, x, severity) * max(h, w))))
    width_c, width_r = min(width, w), min(width, h)
    # Each axis draws its own start: one drawn over the longer side fell outside a non-square image's shorter one.
    start_c = rng.integers(0, w - width_c + 1, size=n)[:, None]
    start_r = rng.integers(0, h - width_r + 1, size=n)[:, None]
    vertical = rng.random(n)[:, None, None] < 0.5
    band_c = (np.arange(w)[None] >= start_c) & (np.arange(w)[None] < start_c + width_c)
    band_r = (np.arange(h)[None] >= start_r) & (np.arange(h)[None] < start_r + width_r)
    band = np.where(vertical, band_c[:, None, :], band_r[:, :, None])[:, None]
    return np.where(band, 1 - x, x)


def _random_segments(rng, x, count):
    """`count` random chords per image (image index, start, end), each at least 60% of the image across."""
    n, _, h, w = x.shape
    size = max(h, w)
    image = np.repeat(np.arange(n), count)
    centre = rng.uniform(0.2, 0.8, size=(n * count, 2)) * np.array([h - 1, w - 1])
    angle = rng.uniform(0, np.pi, n * count)
    half = rng.uniform(0.3, 0.5, n * count)[:, None] * size * np.stack([np.sin(angle), np.cos(angle)], 1)
    return image, centre - half, centre + half


def dotted_line(x, severity, rng):
    """Dotted lines drawn across the image (MNIST-C)."""
    image, starts, ends = _random_segments(rng, x, _param(_LINES, x, severity))
    return _draw_segments(x.copy(), image, starts, ends, dotted=True)


def zigzag(x, severity, rng):
    """Zigzag lines across the image (MNIST-C): four segments alternating about a random chord."""
    image, starts, ends = _random_segments(rng, x, _param(_LINES, x, severity))
    chord = ends - starts
    normal = np.stack([-chord[:, 1], chord[:, 0]], 1) * rng.uniform(0.1, 0.2, len(chord))[:, None]
    vertices = [starts + chord * k / 4 + normal * (k % 2) * (1 if k % 4 == 1 else -1) for k in range(5)]
    out = x.copy()
    for a, b in zip(vertices[:-1], vertices[1:]):
        _draw_segments(out, image, a, b)
    return out


# ---------------------------------------------------------------------------------------------- registry

CORRUPTIONS: dict[str, Corruption] = {
    # CIFAR-10-C's 19 (the 15 of the benchmark and its 4 extra ones), in its order
    "gaussian_noise": gaussian_noise, "shot_noise": shot_noise, "impulse_noise": impulse_noise,
    "defocus_blur": defocus_blur, "glass_blur": glass_blur, "motion_blur": motion_blur, "zoom_blur": zoom_blur,
    "snow": snow, "frost": frost, "fog": fog, "brightness": brightness,
    "contrast": contrast, "elastic_transform": elastic_transform, "pixelate": pixelate,
    "jpeg_compression": jpeg_compression,
    "speckle_noise": speckle_noise, "gaussian_blur": gaussian_blur, "spatter": spatter, "saturate": saturate,
    # MNIST-C's geometric and line corruptions
    "rotate": rotate, "shear": shear, "scale": scale, "translate": translate,
    "stripe": stripe, "dotted_line": dotted_line, "zigzag": zigzag,
}
COLOUR_ONLY = ("saturate",)
MNIST_C_STYLE = ("rotate", "shear", "scale", "translate", "stripe", "dotted_line", "zigzag")


def default_corruptions(channels: int) -> list[str]:
    """The suite's corruptions for images with this many channels.

    Colour: CIFAR-10-C's 19, so generated and published figures cover the same types.
    Grayscale: the same less `saturate`, plus MNIST-C's geometric and line corruptions (25).
    """
    if channels == 3:
        return [n for n in CORRUPTIONS if n not in MNIST_C_STYLE]
    return [n for n in CORRUPTIONS if n not in COLOUR_ONLY]


def _check_request(imageset: ImageSet, names, severities) -> tuple[list[str], tuple[int, ...]]:
    channels = imageset.images.shape[1]
    if channels not in (1, 3):
        raise RobustlabError(f"corruptions need 1- or 3-channel images, got {channels} channels")
    names = _names_given(names)
    names = default_corruptions(channels) if names is None else names
    for name in names:
        check_choice("corruption", name, CORRUPTIONS)
        if name in COLOUR_ONLY and channels != 3:
            raise RobustlabError(f"corruption {name!r} needs colour (3-channel) images")
    return names, check_severities(severities)


def _names_given(names) -> list[str] | None:
    """None (every corruption of the source) or a non-empty list of names, read once (a generator too)."""
    if isinstance(names, str):  # read letter by letter, as the corruptions f, o and g
        raise RobustlabError(f"names is a non-empty list of corruptions, got the string {names!r}")
    if names is None:
        return None
    if not (names := list(names)):  # an empty suite's mean is NaN
        raise RobustlabError("no corruption named: names is a non-empty list of corruptions, e.g. "
                             + ", ".join(CORRUPTIONS))
    return names


def _rng(seed: int, name: str, severity: int, chunk: int) -> np.random.Generator:
    """A generator of its own for each (seed, corruption, severity, chunk): stable across runs and processes."""
    return np.random.default_rng([seed, zlib.crc32(name.encode()), severity, chunk])


def corrupt(imageset: ImageSet, name: str, severity: int, seed: int = 0) -> ImageSet:
    """A corrupted copy of `imageset` (same labels): the same images, in the same order, with the same seed, name
    and severity, give the same copy. The random draws are made per chunk of CHUNK images, so an image's noise
    depends on its place in the set: a subset or another order gets other noise (other figures, within noise)."""
    (name,), (severity,) = _check_request(imageset, [name], [severity])
    check_integer("seed", seed, 0)
    seed = int(seed)
    fn = CORRUPTIONS[name]
    images = imageset.images.numpy()
    out = np.empty_like(images)
    for i, start in enumerate(range(0, len(images), CHUNK)):
        x = images[start:start + CHUNK].astype(np.float32) / 255
        y = fn(x, severity, _rng(seed, name, severity, i))
        out[start:start + CHUNK] = np.rint(np.clip(y, 0, 1) * 255).astype(np.uint8)
    return ImageSet(torch.from_numpy(out), imageset.labels.clone())


# ---------------------------------------------------------------------------------------------- suite and cache

def _fingerprint(imageset: ImageSet) -> str:
    """Identifies the clean images, so a cache folder is never reused for another test set."""
    h = hashlib.sha256(str((tuple(imageset.images.shape), _CACHE_VERSION)).encode())
    h.update(imageset.images.numpy().tobytes())
    return h.hexdigest()[:16]


def _cached(imageset: ImageSet, name: str, severity: int, seed: int, folder: Path | None) -> ImageSet:
    if folder is None:
        return corrupt(imageset, name, severity, seed)
    path = folder / f"{name}-s{severity}-seed{seed}.npy"
    if path.is_file():
        try:
            images = np.load(path, allow_pickle=False)
            if images.dtype == np.uint8 and images.shape == tuple(imageset.images.shape):
                return ImageSet(torch.from_numpy(images), imageset.labels.clone())
        except (OSError, ValueError, EOFError):  # an empty file is an EOFError
            pass  # unreadable: generate it again and overwrite
    result = corrupt(imageset, name, severity, seed)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RobustlabError(f"cannot write the corruption cache {folder}: {exc.strerror or exc}") from None

    def write(tmp):
        with open(tmp, "wb") as f:
            np.save(f, result.images.numpy(), allow_pickle=False)

    checkpoint.atomic_write(path, write)  # a concurrent reader (another rank, another evaluation) sees whole files
    return result


def corruption_suite(imageset: ImageSet, names=None, severities=SEVERITIES, seed: int = 0,
                     cache_dir=None) -> Iterator[tuple[str, int, ImageSet]]:
    """Yield (corruption, severity, corrupted ImageSet) for the whole suite, one set at a time.

    With `cache_dir`, sets are stored as uint8 .npy under a folder named after the clean images' hash,
    and later calls read them instead of generating them again.
    """
    names, severities = _check_request(imageset, names, severities)
    folder = Path(cache_dir).expanduser() / _fingerprint(imageset) if cache_dir is not None else None
    if folder is not None and folder.is_dir():  # a set as large as the test set, per evaluation killed mid-write
        checkpoint.remove_stale_temporaries(folder, shared=True)
    for name in names:
        for severity in severities:
            yield name, severity, _cached(imageset, name, severity, seed, folder)


# ---------------------------------------------------------------------------------------------- OOD accuracy

@dataclass
class OODResult:
    """Accuracy per corruption and severity; `mean` is the protocol's "OOD accuracy"."""
    accuracy: dict[str, dict[int, float]]
    clean: float
    n: int
    source: str  # "generated, seed 0" or "CIFAR-C files in …"
    per_severity_mean: dict[int, float] = field(init=False)

    def __post_init__(self):
        severities = sorted({s for by_sev in self.accuracy.values() for s in by_sev})
        self.per_severity_mean = {s: float(np.mean([a[s] for a in self.accuracy.values() if s in a]))
                                  for s in severities}

    def per_corruption(self) -> dict[str, float]:
        """Mean over severities, per corruption."""
        return {name: float(np.mean(list(by_sev.values()))) for name, by_sev in self.accuracy.items()}

    @property
    def mean(self) -> float:
        """Mean over all corruptions and severities."""
        return float(np.mean([a for by_sev in self.accuracy.values() for a in by_sev.values()]))

    def to_dict(self) -> dict:
        return {"ood_accuracy": self.mean, "clean": self.clean, "n": self.n, "source": self.source,
                "per_corruption": self.per_corruption(),
                "per_severity": {str(s): a for s, a in self.per_severity_mean.items()},
                "accuracy": {name: {str(s): a for s, a in by_sev.items()} for name, by_sev in self.accuracy.items()}}


def _published_suite(imageset: ImageSet, cifar_c_dir, names, severities):
    """The published CIFAR-10/100-C sets, one (corruption, severity) at a time so that only one is in memory,
    cut to the first len(imageset) images (the files follow the test set's order; `check_cifar_c` has checked
    that they fit)."""
    for name in names:
        for severity in severities:
            yield name, severity, load_cifar_c(cifar_c_dir, [name], [severity])[name][severity].subset(len(imageset))


def ood_accuracy(model, imageset: ImageSet, names=None, severities=SEVERITIES, seed: int = 0,
                 batch_size: int = 500, progress: bool = True, cifar_c_dir=None, cache_dir=None,
                 device=None) -> OODResult:
    """Accuracy on every corrupted copy of `imageset`, generated from `seed`, or on the published
    CIFAR-10-C / CIFAR-100-C files when `cifar_c_dir` is given (then `names=None` means every file there)."""
    if cifar_c_dir is not None:
        names = check_cifar_c(cifar_c_dir, imageset.images.shape[1:], imageset.labels, _names_given(names))
        severities = check_severities(severities)
        suite = _published_suite(imageset, cifar_c_dir, names, severities)
        source = f"CIFAR-C files in {cifar_c_dir}"
    else:
        names, severities = _check_request(imageset, names, severities)
        suite = corruption_suite(imageset, names, severities, seed, cache_dir)
        source = f"generated, seed {seed}"
    clean = accuracy(model, imageset, batch_size=batch_size, device=device)
    result: dict[str, dict[int, float]] = {}
    bar = progress_bar(suite, total=len(names) * len(severities), desc="corruptions", unit="set",
                       show=bool(progress) and distributed.is_main(), leave=False)
    for name, severity, data in bar:
        result.setdefault(name, {})[severity] = accuracy(model, data, batch_size=batch_size, device=device)
    return OODResult(result, clean, len(imageset), source)


# ---------------------------------------------------------------------------------------------- plot

def plot_corruptions(result: OODResult, path, title: str | None = None):
    """Horizontal bars: mean accuracy per corruption (sorted), a dot per severity, clean and OOD means as lines."""
    import matplotlib  # here, not at import: generating corruptions should not pay for matplotlib
    from matplotlib.figure import Figure  # no pyplot: no global backend or figure state touched

    per = result.per_corruption()
    names = sorted(per, key=per.get)  # worst first, drawn at the top (inverted axis)
    severities = sorted(result.per_severity_mean)
    colours = matplotlib.colormaps["viridis_r"](np.linspace(0.15, 0.95, len(severities)))
    fig = Figure(figsize=(7.5, 1.6 + 0.3 * len(names)), dpi=120)
    ax = fig.subplots()
    pos = np.arange(len(names))
    ax.barh(pos, [100 * per[n] for n in names], color="#c9d6e8", edgecolor="#7f93b0", height=0.7,
            label="mean over severities")
    for colour, s in zip(colours, severities):
        ax.scatter([100 * result.accuracy[n].get(s, np.nan) for n in names], pos, color=colour, s=18, zorder=3,
                   label=f"severity {s}")
    ax.axvline(100 * result.clean, color="black", ls="--", lw=1, label=f"clean {100 * result.clean:.1f}%")
    ax.axvline(100 * result.mean, color="#c0392b", ls=":", lw=1.5, label=f"OOD mean {100 * result.mean:.1f}%")
    ax.set_yticks(pos, [n.replace("_", " ") for n in names], fontsize=8)
    ax.set_ylim(len(names) - 0.5, -0.5)  # worst on top, no empty margins
    ax.set_xlim(0, 100)
    ax.set_xlabel("accuracy (%)")
    ax.grid(axis="x", alpha=0.3)
    ax.set_title(title or f"Accuracy under corruptions ({result.n} images, {result.source})", fontsize=10)
    ax.legend(fontsize=7, loc="lower left", bbox_to_anchor=(1.01, 0), frameon=False)
    fig.tight_layout()
    fig.savefig(path)
