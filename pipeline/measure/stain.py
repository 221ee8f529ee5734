"""Colour deconvolution of H&E into haematoxylin and eosin, with stain vectors estimated
once per slide from its own tissue.

Why per slide: stains differ between labs, batches and scanners, and an intensity feature
is only comparable across slides when each slide is unmixed with its own vectors. The
vectors and background are also written in the form QuPath's
``setColorDeconvolutionStains(...)`` accepts (:meth:`StainVectors.to_qupath`), so that a
user can set the same ones in their project and see the same numbers.

Conventions follow QuPath's ``ColorDeconvolutionStains``: optical density is
``-log10(value / background)`` per channel; stain vectors are unit length in OD space;
the third stain, when none is given, is the unit cross product of the first two
("Residual"); a pixel's stain values are its OD vector times the inverse of the stain
matrix; ``OD Sum`` is the sum of the three channels' OD.

Estimation is Macenko et al. (ISBI 2009): the OD of tissue pixels above a floor, the plane
of its two main directions, and the two extreme angles in that plane (robust percentiles)
as the two stains; haematoxylin is the one that absorbs more red. Where there are too few
tissue pixels, or the estimate is implausible (far from H&E), QuPath's H&E defaults are
used and the reason is recorded.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

log = logging.getLogger(__name__)

# QuPath's "H&E default" (ColorDeconvolutionStains.makeDefaultColorDeconvolutionStains)
DEFAULT_HEMATOXYLIN = (0.65111, 0.70119, 0.29049)
DEFAULT_EOSIN = (0.2159, 0.8012, 0.5581)
DEFAULT_BACKGROUND = (255.0, 255.0, 255.0)
OD_FLOOR = 0.1  # log10 OD length below which a pixel is near glass (too noisy for its direction)
# robust extremes of the angle distribution: half of Macenko's 1 %, as the pixels come from
# the tissue mask (glass, pen and dye already left out), where a tighter extreme is nearer
# the pure stains (on synthetic H&E with 20 % nuclei: 0.02 vs 0.13 degrees for haematoxylin)
ANGLE_PERCENTILE = 0.5
MIN_PIXELS = 500  # fewer tissue pixels than this: keep the defaults
MAX_PIXELS = 100_000  # more are thinned by a regular stride (the estimate does not move)
MAX_DEVIATION_DEG = 30.0  # an estimate further than this from the default is implausible
CHANNELS = ("Hematoxylin", "Eosin", "OD Sum")
NORMALISE_PERCENTILE = 99.0  # Macenko's robust maximum concentration


def _unit(v: np.ndarray) -> np.ndarray:
    return v / max(float(np.linalg.norm(v)), 1e-12)


def angle_deg(a: np.ndarray | tuple, b: np.ndarray | tuple) -> float:
    """The angle between two stain vectors in degrees."""
    c = float(np.dot(_unit(np.asarray(a, float)), _unit(np.asarray(b, float))))
    return math.degrees(math.acos(min(1.0, max(-1.0, c))))


@dataclass(frozen=True)
class StainVectors:
    """Haematoxylin and eosin OD vectors (unit length, RGB order) and the background RGB."""

    hematoxylin: tuple[float, float, float] = DEFAULT_HEMATOXYLIN
    eosin: tuple[float, float, float] = DEFAULT_EOSIN
    background: tuple[float, float, float] = DEFAULT_BACKGROUND
    name: str = "H&E default"
    source: str = "default"  # "estimated", "default", "user", or why the estimate was rejected

    def matrix(self) -> np.ndarray:
        """Rows: haematoxylin, eosin, residual (their unit cross product)."""
        h = _unit(np.asarray(self.hematoxylin, float))
        e = _unit(np.asarray(self.eosin, float))
        return np.stack([h, e, _unit(np.cross(h, e))])

    def to_qupath(self) -> str:
        """The argument of QuPath's ``setColorDeconvolutionStains(...)``."""
        def fmt(v: tuple[float, ...]) -> str:
            return " ".join(f"{x:.5f}" for x in _unit(np.asarray(v, float)))

        bg = " ".join(str(int(round(b))) for b in self.background)
        return json.dumps({"Name": self.name, "Stain 1": "Hematoxylin", "Values 1": fmt(self.hematoxylin),
                           "Stain 2": "Eosin", "Values 2": fmt(self.eosin), "Background": bg},
                          ensure_ascii=False).replace('": "', '" : "')

    def to_dict(self) -> dict[str, object]:
        return {"hematoxylin": list(self.hematoxylin), "eosin": list(self.eosin),
                "background": list(self.background), "name": self.name, "source": self.source,
                "qupath": self.to_qupath()}

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> StainVectors:
        """The vectors :meth:`to_dict` wrote (``summary.json``, ``SlidePlan.stains``)."""
        def triple(key: str) -> tuple[float, float, float]:
            return tuple(float(v) for v in data[key])  # type: ignore[attr-defined, return-value]

        return cls(triple("hematoxylin"), triple("eosin"), triple("background"),
                   name=str(data.get("name", "")), source=str(data.get("source", "")))

    @classmethod
    def parse(cls, text: str) -> StainVectors:
        """``default`` or a QuPath stains string (as :meth:`to_qupath` writes, or copied
        from a QuPath project's workflow: ``setColorDeconvolutionStains('{...}')``)."""
        text = text.strip()
        if text.lower() == "default":
            return cls(source="user")
        inner = re.search(r"\{.*\}", text, re.S)
        if not inner:
            raise ValueError("stain vectors: 'default' or a QuPath stains string "
                             "'{\"Name\" : ..., \"Values 1\" : \"r g b\", ...}'")
        data = json.loads(inner.group(0))

        def values(key: str, n: int = 3) -> tuple[float, ...]:
            try:
                out = tuple(float(x) for x in str(data[key]).split())
            except (KeyError, ValueError) as exc:
                raise ValueError(f"stain vectors: {key!r} missing or not numbers") from exc
            if len(out) != n:
                raise ValueError(f"stain vectors: {key!r} needs {n} numbers, got {len(out)}")
            return out

        background = values("Background") if "Background" in data else DEFAULT_BACKGROUND
        return cls(values("Values 1"), values("Values 2"), background,  # type: ignore[arg-type]
                   name=str(data.get("Name", "user")), source="user")


def optical_density(rgb: np.ndarray, background: tuple[float, float, float]) -> np.ndarray:
    """``-log10(value / background)`` per channel, float32; values of 0 count as 1 (as
    QuPath's lookup table does, so that black is finite)."""
    bg = np.asarray(background, np.float32)
    x = np.maximum(np.asarray(rgb, np.float32)[..., :3], 1.0)
    return np.maximum(-np.log10(x / bg), 0.0)


def deconvolve(rgb: np.ndarray, stains: StainVectors) -> dict[str, np.ndarray]:
    """Haematoxylin and eosin stain values and the OD sum of every pixel (float32)."""
    rgb = np.asarray(rgb)
    return deconvolve_planes([rgb[..., k] for k in range(3)], stains)


def deconvolve_planes(planes: Sequence[np.ndarray], stains: StainVectors) -> dict[str, np.ndarray]:
    """:func:`deconvolve` of the red, green and blue planes (e.g. each gathered at the
    pixels to measure: three byte gathers cost a quarter of one of RGB triples).

    Each output is ``od_r * w_r + od_g * w_g + od_b * w_b`` (float32, in that order), with
    ``w`` a column of the inverse stain matrix (ones for ``OD Sum``). For 8-bit pixels the
    products come from 256-entry tables (a product depends on one channel's value only):
    the same numbers as the arithmetic, without a logarithm and a matrix product per
    pixel, which took most of a cell tile's intensity time."""
    weights = np.ones((3, 3), np.float32)  # [channel, output]
    weights[:, :2] = np.linalg.inv(stains.matrix()).astype(np.float32)[:, :2]
    if all(np.asarray(p).dtype == np.uint8 for p in planes):
        levels = np.repeat(np.arange(256, dtype=np.uint8)[:, None], 3, axis=1)
        table = optical_density(levels, stains.background)[:, :, None] * weights  # [value, channel, output]
        terms = [[table[:, k, c].take(planes[k]) for c in range(3)] for k in range(3)]
    else:
        bg = np.asarray(stains.background, np.float32)
        od = [np.maximum(-np.log10(np.maximum(np.asarray(p, np.float32), 1.0) / bg[k]), 0.0)
              for k, p in enumerate(planes)]
        terms = [[od[k] * weights[k, c] for c in range(3)] for k in range(3)]
    return {name: terms[0][c] + terms[1][c] + terms[2][c] for c, name in enumerate(CHANNELS)}


def estimate_background(rgb: np.ndarray, tissue: np.ndarray) -> tuple[float, float, float]:
    """The glass colour: the median of bright pixels off the tissue (255 where there is no
    glass to see)."""
    glass = np.asarray(rgb)[..., :3][~np.asarray(tissue, bool)].reshape(-1, 3)
    glass = glass[::max(1, len(glass) // MAX_PIXELS)].astype(np.float32)
    glass = glass[np.minimum(np.minimum(glass[:, 0], glass[:, 1]), glass[:, 2]) > 180]
    if len(glass) < MIN_PIXELS:
        return DEFAULT_BACKGROUND
    return tuple(float(v) for v in np.median(glass, axis=0))  # type: ignore[return-value]


def estimate_stains(pixels: np.ndarray, background: tuple[float, float, float] = DEFAULT_BACKGROUND
                    ) -> StainVectors:
    """Macenko's estimate of haematoxylin and eosin from tissue pixels (N x 3 RGB), or the
    defaults with the reason in ``source``."""
    pixels = np.asarray(pixels).reshape(-1, 3)
    pixels = pixels[::max(1, len(pixels) // MAX_PIXELS)]
    od = optical_density(pixels, background).astype(np.float64)
    # by the OD vector's length, not per channel: pale eosin absorbs little red, and a
    # per-channel floor would drop exactly the pixels that show the eosin direction
    od = od[np.linalg.norm(od, axis=1) > OD_FLOOR]
    if len(od) < MIN_PIXELS:
        return StainVectors(background=background, source=f"default: {len(od)} stained pixels")
    _, vecs = np.linalg.eigh(np.cov(od, rowvar=False))
    plane = vecs[:, [2, 1]]  # the two main directions
    plane *= np.where(plane.sum(axis=0) < 0, -1.0, 1.0)  # pointing into positive OD
    proj = od @ plane
    phi = np.arctan2(proj[:, 1], proj[:, 0])
    lo, hi = np.percentile(phi, [ANGLE_PERCENTILE, 100 - ANGLE_PERCENTILE])
    v1 = _unit(plane @ np.array([math.cos(lo), math.sin(lo)]))
    v2 = _unit(plane @ np.array([math.cos(hi), math.sin(hi)]))
    h, e = (v1, v2) if v1[0] > v2[0] else (v2, v1)
    dh, de = angle_deg(h, DEFAULT_HEMATOXYLIN), angle_deg(e, DEFAULT_EOSIN)
    if (h < 0).any() or (e < 0).any() or max(dh, de) > MAX_DEVIATION_DEG:
        return StainVectors(background=background,
                            source=f"default: estimate {dh:.0f}/{de:.0f} degrees from H&E")
    return StainVectors(tuple(float(x) for x in h), tuple(float(x) for x in e),  # type: ignore[arg-type]
                        background, name="H&E estimated", source="estimated")


def stains_of_pixels(pixels: np.ndarray, stained: np.ndarray) -> StainVectors:
    """A region's stain vectors from its pixels (N x 3 RGB) and which of them are stained
    tissue (``pipeline.tissue.tissue_signal`` above its floor): the glass among the others
    gives the background, the stained ones the vectors. One estimate for a slide's sampled
    windows and for an annotated image, so that both are normalised alike."""
    pixels = np.asarray(pixels).reshape(-1, 3)
    stained = np.asarray(stained, bool).reshape(-1)
    background = estimate_background(pixels, stained)  # it keeps only bright, unstained pixels
    return estimate_stains(pixels[stained], background)


def concentration_percentiles(pixels: np.ndarray, stains: StainVectors,
                              q: float = NORMALISE_PERCENTILE) -> tuple[float, float]:
    """The ``q``-th percentile of the haematoxylin and eosin concentrations of pixels
    (N x 3 RGB) that carry stain: Macenko's robust maximum, what his normalisation scales."""
    pixels = np.asarray(pixels).reshape(-1, 3)
    pixels = pixels[::max(1, len(pixels) // MAX_PIXELS)]
    od = optical_density(pixels, stains.background)
    od = od[np.linalg.norm(od, axis=1) > OD_FLOOR]
    if len(od) < MIN_PIXELS:
        return (1.0, 1.0)
    conc = od @ np.linalg.pinv(stains.matrix()).astype(np.float32)
    return tuple(float(max(v, 1e-3)) for v in np.percentile(conc[:, :2], q, axis=0))  # type: ignore[return-value]


def normalise_stains(rgb: np.ndarray, source: StainVectors, reference: StainVectors | None = None,
                     source_max: tuple[float, float] | None = None,
                     reference_max: tuple[float, float] | None = None) -> np.ndarray:
    """``rgb`` (H x W x 3 uint8) stained with ``source`` re-rendered with ``reference``
    (default :data:`REFERENCE`, the training images' typical H&E).

    Why: the network learnt one lab's look (augmented); a slide stained or scanned far from
    it is brought there before inference. Per pixel with per-slide constants, so it commutes
    with tiling: a tile normalised alone equals the same pixels of the normalised slide.
    OD = -log10(I / source background); concentrations = OD · pinv(source stain matrix)
    (haematoxylin, eosin, residual); OD' = concentrations · reference matrix; I' =
    reference background · 10^-OD'. The three steps are one 3 x 3 matrix. ``source_max``:
    the source's robust maximum concentrations (:func:`concentration_percentiles`), scaled
    to ``reference_max`` (default: :data:`REFERENCE_MAX_CONCENTRATIONS`), Macenko's
    intensity normalisation; None maps the vectors only."""
    ref = REFERENCE if reference is None else reference
    gain = np.ones(3, np.float64)
    if source_max is not None:
        target = REFERENCE_MAX_CONCENTRATIONS if reference_max is None else reference_max
        gain[:2] = np.asarray(target, float) / np.asarray(source_max, float)
    transform = (np.linalg.pinv(source.matrix()) * gain) @ ref.matrix()
    # per output channel j: ln I'_j = ln bg_j - ln10 · sum_c OD_c · T[c, j], and OD_c is a
    # function of one uint8 value: nine 256-entry tables, gathered and summed (a (N, 3) @ (3, 3)
    # product, and a log per pixel, are several times slower)
    values = np.maximum(np.arange(256, dtype=np.float64), 1.0)
    od = np.maximum(-np.log10(values[:, None] / np.asarray(source.background, np.float64)), 0.0)
    tables = (-math.log(10.0) * od[:, :, None] * transform[None]).astype(np.float32)  # value, c, j
    tables[:, 0, :] += np.log(np.asarray(ref.background, np.float32))
    x = np.asarray(rgb)[..., :3]
    out = np.empty(x.shape, np.uint8)
    for j in range(3):
        log_i = tables[:, 0, j].take(x[..., 0])
        log_i += tables[:, 1, j].take(x[..., 1])
        log_i += tables[:, 2, j].take(x[..., 2])
        np.exp(log_i, out=log_i)
        out[..., j] = np.clip(np.rint(log_i, out=log_i), 0, 255, out=log_i)
    return out


# The training images' typical H&E, what --stain-normalise maps a slide to: estimated by
# `python -m bench.stain_norm --reference` (docs/results/stain-norm/reference.json) from
# the training images of the default model (pruned20x.pt: MoNuSeg train and TNBC train,
# validation slides left out), at its 0.5 µm/px, each image as `wsi-nuclei evaluate
# --stain-normalise` estimates one; per dataset the unit mean of the images' vectors (23 of
# 24 MoNuSeg, 22 of 24 TNBC estimates plausible), the median background and 99th-percentile
# concentrations; then the mean of the two datasets. 2.6 (haematoxylin) and 5.3 (eosin)
# degrees from QuPath's defaults; the two datasets' means are 8.4 and 5.2 degrees apart.
REFERENCE = StainVectors((0.6532, 0.68131, 0.33037), (0.12789, 0.7982, 0.58866), (233.0, 227.0, 234.0),
                         name="H&E training reference", source="reference")
REFERENCE_MAX_CONCENTRATIONS = (0.712, 0.292)  # MoNuSeg 1.024 / 0.395, TNBC 0.399 / 0.188
