"""Training augmentations for the stain and optics of other labs and scanners.

Each one is switched by a field of :class:`models.config.AugmentConfig` (0 = off), so that
its effect can be measured by ablation on the validation slides:

* ``stain``: scale and shift the haematoxylin, eosin and DAB optical densities (HED);
* ``hue`` / ``saturation``: a shift of hue and a scaling of saturation (HSV);
* ``brightness``: brightness and contrast;
* ``scale``: random rescale by up to ±scale (a 20x scan of another scanner is not exactly
  0.5 µm/px, and nuclei differ in size between tissues);
* ``rotate`` / ``shear``: any rotation angle and a small shear (with ``scale``, one affine
  warp: a single interpolation of image and targets);
* ``blur``: the chance of a Gaussian blur of 0.3-1.2 px (out-of-focus scans, 20x optics);
* ``jpeg``: the chance of JPEG re-compression at quality 40-90 (what scanners store).

Geometric warps are applied to the targets too: the per-nucleus normalised distance map is
invariant to scale by construction, so it is interpolated like the image.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image
from scipy import ndimage as ndi
from skimage.color import hed2rgb, hsv2rgb, rgb2hed, rgb2hsv

from models.config import AugmentConfig

BLUR_SIGMA = (0.3, 1.2)  # px at the training resolution
JPEG_QUALITY = (40, 90)
WARP_MARGIN = 1.5  # source crop side / patch side, so that warps rarely reach the border


def stain_jitter(patch: np.ndarray, rng: np.random.Generator, strength: float) -> np.ndarray:
    """Random scaling/shift of the haematoxylin, eosin and DAB optical densities."""
    if strength <= 0:
        return patch
    hed = rgb2hed(patch)
    alpha = rng.uniform(1 - strength, 1 + strength, size=3)
    beta = rng.uniform(-strength, strength, size=3) * 0.05
    rgb = hed2rgb(hed * alpha + beta)
    return np.clip(rgb * 255.0, 0, 255).astype(np.uint8)


def hue_saturation(patch: np.ndarray, rng: np.random.Generator, hue: float,
                   saturation: float) -> np.ndarray:
    if hue <= 0 and saturation <= 0:
        return patch
    hsv = rgb2hsv(patch)
    hsv[..., 0] = (hsv[..., 0] + rng.uniform(-hue, hue)) % 1.0
    hsv[..., 1] = np.clip(hsv[..., 1] * rng.uniform(1 - saturation, 1 + saturation), 0, 1)
    return np.clip(hsv2rgb(hsv) * 255.0 + 0.5, 0, 255).astype(np.uint8)


def brightness_contrast(image: np.ndarray, rng: np.random.Generator, strength: float) -> np.ndarray:
    if strength <= 0:
        return image
    gain = rng.uniform(1 - strength, 1 + strength)
    bias = rng.uniform(-strength, strength) * 255 * 0.5
    mean = image.mean()
    return np.clip((image - mean) * gain + mean + bias, 0, 255).astype(np.uint8)


def gaussian_blur(patch: np.ndarray, rng: np.random.Generator, chance: float) -> np.ndarray:
    if chance <= 0 or rng.random() >= chance:
        return patch
    sigma = rng.uniform(*BLUR_SIGMA)
    out = ndi.gaussian_filter(patch.astype(np.float32), sigma=(sigma, sigma, 0), mode="reflect")
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def jpeg_recompress(patch: np.ndarray, rng: np.random.Generator, chance: float) -> np.ndarray:
    if chance <= 0 or rng.random() >= chance:
        return patch
    buf = io.BytesIO()
    Image.fromarray(patch).save(buf, format="JPEG", quality=int(rng.integers(*JPEG_QUALITY)))
    buf.seek(0)
    return np.asarray(Image.open(buf).convert("RGB"))


def warp_matrix(rng: np.random.Generator, cfg: AugmentConfig) -> np.ndarray | None:
    """The 2x2 map from output to source coordinates (None: no warp drawn)."""
    if cfg.scale <= 0 and not cfg.rotate and cfg.shear <= 0:
        return None
    zoom = rng.uniform(1 - cfg.scale, 1 + cfg.scale) if cfg.scale > 0 else 1.0
    angle = rng.uniform(0, 2 * np.pi) if cfg.rotate else 0.0
    shear = rng.uniform(-cfg.shear, cfg.shear) if cfg.shear > 0 else 0.0
    c, s = np.cos(angle), np.sin(angle)
    rotation = np.array([[c, -s], [s, c]])
    return rotation @ np.array([[1.0, shear], [0.0, 1.0]]) / zoom


def warp_crop(arrays: list[np.ndarray], size: int, matrix: np.ndarray | None,
              rng: np.random.Generator) -> list[np.ndarray]:
    """A ``size``² crop at a random place of the (H, W[, C]) arrays, warped by ``matrix``
    about its centre (bilinear, mirrored beyond the image); a plain crop without one."""
    h, w = arrays[0].shape[:2]
    if matrix is None:
        if h < size or w < size:
            arrays = [_pad_to(a, size) for a in arrays]
            h, w = arrays[0].shape[:2]
        y, x = int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1))
        return [a[y:y + size, x:x + size] for a in arrays]
    cy, cx = rng.uniform(0, h), rng.uniform(0, w)
    half = (size - 1) / 2.0
    offset = np.array([cy, cx]) - matrix @ np.array([half, half])
    out = []
    for a in arrays:
        if a.ndim == 2:
            out.append(ndi.affine_transform(a.astype(np.float32), matrix, offset, (size, size),
                                            order=1, mode="mirror"))
        else:
            chans = [ndi.affine_transform(a[..., k].astype(np.float32), matrix, offset,
                                          (size, size), order=1, mode="mirror")
                     for k in range(a.shape[2])]
            out.append(np.stack(chans, axis=-1))
    return out


def _pad_to(a: np.ndarray, size: int) -> np.ndarray:
    ph, pw = max(0, size - a.shape[0]), max(0, size - a.shape[1])
    pad = [(0, ph), (0, pw)] + [(0, 0)] * (a.ndim - 2)
    return np.pad(a, pad, mode="reflect")


def photometric(image: np.ndarray, rng: np.random.Generator, cfg: AugmentConfig) -> np.ndarray:
    """Stain, colour, brightness, blur and compression, in the order a slide meets them
    (staining, then the scanner's optics, then its encoder)."""
    image = stain_jitter(image, rng, cfg.stain)
    image = hue_saturation(image, rng, cfg.hue, cfg.saturation)
    image = brightness_contrast(image, rng, cfg.brightness)
    image = gaussian_blur(image, rng, cfg.blur)
    return jpeg_recompress(image, rng, cfg.jpeg)
