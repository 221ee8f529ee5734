"""Stain vectors estimated from a synthetic H&E image with known stains, deconvolution,
the QuPath stains string, and per-object intensity statistics."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.measure.intensity import label_statistics
from pipeline.measure.stain import (
    DEFAULT_EOSIN,
    DEFAULT_HEMATOXYLIN,
    REFERENCE,
    StainVectors,
    angle_deg,
    concentration_percentiles,
    deconvolve,
    estimate_background,
    estimate_stains,
    normalise_stains,
    stains_of_pixels,
)

TRUE_H = (0.55, 0.76, 0.35)  # 8.5 degrees from QuPath's default haematoxylin
TRUE_E = (0.12, 0.85, 0.51)  # 6.8 degrees from its default eosin
BACKGROUND = (241.0, 238.0, 244.0)


def synthetic_he(seed: int = 0, size: int = 256) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """RGB rendered from known stain concentrations (Beer-Lambert, log10), nuclei rich in
    haematoxylin on eosin-rich stroma, glass in one corner; returns the image, the labels
    of the nuclei, the haematoxylin concentrations and the tissue mask."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    labels = np.zeros((size, size), np.int32)
    h = np.zeros((size, size))
    e = rng.uniform(0.15, 0.45, (size, size))
    for i in range(1, 201):  # ~15 % of the tissue is nuclei, as in H&E
        cy, cx = rng.uniform(10, size - 10, 2)
        r = rng.uniform(3, 7)
        disc = ((yy - cy) ** 2 + (xx - cx) ** 2 <= r * r) & (labels == 0)
        labels[disc] = i
        h[disc] = rng.uniform(0.3, 0.9) * rng.uniform(0.85, 1.15, int(disc.sum()))
        e[disc] *= rng.uniform(0.0, 0.3, int(disc.sum()))  # some nearly pure haematoxylin
    tissue = ~((yy < 40) & (xx < 40))
    h[~tissue], e[~tissue] = 0, 0
    labels[~tissue] = 0
    m = np.stack([np.asarray(TRUE_H) / np.linalg.norm(TRUE_H), np.asarray(TRUE_E) / np.linalg.norm(TRUE_E)])
    od = h[..., None] * m[0] + e[..., None] * m[1]
    rgb = np.asarray(BACKGROUND) * 10 ** (-od)
    rgb = np.clip(np.round(rgb + rng.normal(0, 0.5, rgb.shape)), 0, 255).astype(np.uint8)
    return rgb, labels, h, tissue


@pytest.mark.parametrize("seed", [0, 1])
def test_estimated_vectors_are_within_5_degrees_and_means_within_2_percent(seed: int) -> None:
    rgb, labels, h, tissue = synthetic_he(seed)
    background = estimate_background(rgb, tissue)
    assert np.allclose(background, BACKGROUND, atol=1.0)
    stains = estimate_stains(rgb[tissue], background)
    assert stains.source == "estimated"
    assert angle_deg(stains.hematoxylin, TRUE_H) < 5.0
    assert angle_deg(stains.eosin, TRUE_E) < 5.0
    channels = deconvolve(rgb, stains)
    n = int(labels.max())
    stats = label_statistics(labels, channels, n)
    present = np.array([(labels == i).any() for i in range(1, n + 1)])  # a few are painted over
    truth = np.array([h[labels == i].mean() for i in range(1, n + 1) if present[i - 1]])
    found = stats["Hematoxylin: Mean"][present]
    assert np.all(np.abs(found - truth) <= 0.02 * truth), np.abs(found / truth - 1).max()
    assert np.isnan(stats["Hematoxylin: Mean"][~present]).all()
    # the defaults are further off: the estimate is what makes the means right
    default = label_statistics(labels, deconvolve(rgb, StainVectors(background=background)), n)
    assert np.abs(default["Hematoxylin: Mean"][present] / truth - 1).max() > 0.05


def test_too_little_or_implausible_tissue_falls_back_to_defaults() -> None:
    white = np.full((100, 3), 250, np.uint8)
    assert estimate_stains(white).source.startswith("default")
    green = np.tile(np.array([[40, 200, 60], [30, 120, 40]], np.uint8), (600, 1))
    found = estimate_stains(green)
    assert found.source.startswith("default") and found.hematoxylin == DEFAULT_HEMATOXYLIN


def test_qupath_string_round_trips() -> None:
    stains = StainVectors(TRUE_H, TRUE_E, BACKGROUND, name="H&E estimated", source="estimated")
    text = stains.to_qupath()
    assert text.startswith('{"Name" : "H&E estimated", "Stain 1" : "Hematoxylin", "Values 1" : "')
    assert '"Background" : "241 238 244"' in text
    back = StainVectors.parse(f"setColorDeconvolutionStains('{text}');")
    assert angle_deg(back.hematoxylin, TRUE_H) < 1e-3 and back.background == BACKGROUND
    assert StainVectors.parse("default").eosin == DEFAULT_EOSIN
    qupath = ('{"Name" : "H&E default", "Stain 1" : "Hematoxylin", "Values 1" : "0.65111 0.70119 0.29049", '
              '"Stain 2" : "Eosin", "Values 2" : "0.2159 0.8012 0.5581", "Background" : " 255 255 255"}')
    assert StainVectors.parse(qupath).hematoxylin == DEFAULT_HEMATOXYLIN
    with pytest.raises(ValueError, match="Values 1"):
        StainVectors.parse('{"Name": "x", "Values 1": "0.1 0.2"}')


def test_label_statistics_match_numpy() -> None:
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 6, (40, 50))
    labels[labels == 4] = 0  # label 4 has no pixels
    values = rng.normal(size=(40, 50))
    stats = label_statistics(labels, {"Hematoxylin": values}, 5, prefix="Nucleus: ")
    for i in (1, 2, 3, 5):
        v = values[labels == i]
        assert stats["Nucleus: Hematoxylin: Mean"][i - 1] == pytest.approx(v.mean())
        assert stats["Nucleus: Hematoxylin: Median"][i - 1] == pytest.approx(np.median(v))
        assert stats["Nucleus: Hematoxylin: Min"][i - 1] == pytest.approx(v.min())
        assert stats["Nucleus: Hematoxylin: Max"][i - 1] == pytest.approx(v.max())
        assert stats["Nucleus: Hematoxylin: Std.Dev."][i - 1] == pytest.approx(v.std(ddof=1))
    assert np.isnan(stats["Nucleus: Hematoxylin: Mean"][3])


def test_a_slide_s_stains_are_estimated_from_its_tissue_at_model_resolution() -> None:
    """``slide_run.plan.slide_stains``: windows spread over the tiles with tissue, pixels
    that are not H&E-coloured left out (a teal marking dye here), or the user's vectors."""
    from pipeline.slide.memory import MemorySlide
    from pipeline.slide.region import plan_read
    from pipeline.slide_run.plan import slide_stains
    from pipeline.tiling import plan_tiles

    rgb, _, _, tissue = synthetic_he(3, size=512)
    rgb[300:340, 300:420] = (60, 170, 170)  # teal marking dye on the tissue
    slide = MemorySlide(rgb, 0.5)
    plan = plan_read(slide.info, 0.5)
    tiles = tuple(plan_tiles(plan.shape, 128, 16, 16, 16))
    found = slide_stains(slide, plan, tiles, None)
    assert found.source == "estimated"
    assert angle_deg(found.hematoxylin, TRUE_H) < 5.0 and angle_deg(found.eosin, TRUE_E) < 5.0
    assert np.allclose(found.background, BACKGROUND, atol=2.0)
    assert slide_stains(slide, plan, tiles, "default").source == "user"
    assert slide_stains(slide, plan, (), None).source.startswith("default")


SLIDE_B = StainVectors((0.78, 0.58, 0.23), (0.30, 0.72, 0.62), (226.0, 219.0, 231.0))  # another lab


def _rendered(stains: StainVectors, gain: float = 1.0, seed: int = 3) -> np.ndarray:
    """The same haematoxylin / eosin concentrations (times ``gain``) rendered with
    ``stains`` (Beer-Lambert, log10, rounded to uint8): nuclei, stroma and glass."""
    rng = np.random.default_rng(seed)
    h = np.where(rng.random((96, 128)) < 0.3, rng.uniform(0.2, 0.8, (96, 128)), 0.0)
    e = rng.uniform(0.0, 0.5, (96, 128))
    h[:10], e[:10] = 0, 0  # glass
    m = stains.matrix()
    od = gain * (h[..., None] * m[0] + e[..., None] * m[1])
    return np.clip(np.rint(np.asarray(stains.background) * 10 ** -od), 0, 255).astype(np.uint8)


def test_normalising_another_lab_s_rendering_gives_the_reference_rendering() -> None:
    reference = StainVectors(TRUE_H, TRUE_E, BACKGROUND)
    a, b = _rendered(reference), _rendered(SLIDE_B)
    before = np.abs(b.astype(int) - a)
    assert before.max() > 40 and before.mean() > 10  # the two labs' pixels differ
    out = normalise_stains(b, SLIDE_B, reference)
    assert out.dtype == np.uint8 and out.shape == a.shape
    after = np.abs(out.astype(int) - a)
    assert after.max() <= 2 and after.mean() < 0.3, (after.max(), after.mean())
    # with vectors estimated from the pixels (as a slide's are), most of the way there
    found = stains_of_pixels(b.reshape(-1, 3), (b < 200).any(axis=-1).reshape(-1))
    assert found.source == "estimated"
    estimated = np.abs(normalise_stains(b, found, reference).astype(int) - a)
    assert estimated.mean() < 0.3 * before.mean(), (estimated.mean(), before.mean())


def test_normalising_with_the_reference_s_own_vectors_changes_nothing() -> None:
    noise = np.random.default_rng(0).integers(1, 256, (64, 80, 3), dtype=np.uint8)
    for stains in (REFERENCE, SLIDE_B):
        # every pixel up to the glass's colour comes back as it was; brighter is glass
        image = np.minimum(noise, np.asarray(stains.background, np.uint8))
        assert (normalise_stains(image, stains, stains) == image).all()
        assert (normalise_stains(noise, stains, stains) == image).all()
    assert (normalise_stains(image, SLIDE_B) != image).any(axis=-1).mean() > 0.9


def test_macenko_scaling_brings_a_stronger_staining_back() -> None:
    reference = StainVectors(TRUE_H, TRUE_E, BACKGROUND)
    a, strong = _rendered(reference), _rendered(SLIDE_B, gain=1.5)
    top_a = concentration_percentiles(a, reference)
    top_b = concentration_percentiles(strong, SLIDE_B)
    assert top_b[0] == pytest.approx(1.5 * top_a[0], rel=0.02)
    unscaled = np.abs(normalise_stains(strong, SLIDE_B, reference).astype(int) - a)
    scaled = np.abs(normalise_stains(strong, SLIDE_B, reference, top_b, top_a).astype(int) - a)
    assert unscaled.mean() > 5 and scaled.mean() < 0.5, (unscaled.mean(), scaled.mean())


def test_normalising_commutes_with_cropping() -> None:
    image = _rendered(SLIDE_B)
    whole = normalise_stains(image, SLIDE_B)
    assert (normalise_stains(image[17:61, 5:99], SLIDE_B) == whole[17:61, 5:99]).all()


def test_stain_intensities_rows_follow_ids_dense_or_sparse() -> None:
    """A tile's own ids (1..n, labels read as rows) and a slide's sparse global ids (looked
    up) give each object's row; labels not in ``ids`` are not measured."""
    from pipeline.measure.intensity import stain_intensities

    rng = np.random.default_rng(4)
    labels = rng.integers(0, 7, (30, 40))
    rgb = rng.integers(0, 256, (30, 40, 3)).astype(np.uint8)
    stains = StainVectors()
    channels = deconvolve(rgb, stains)
    for ids in (np.arange(1, 5), np.array([2, 5, 6])):
        found = stain_intensities(labels, rgb, stains, ids)
        for row, i in enumerate(ids):
            v = channels["Eosin"][labels == i].astype(np.float64)
            assert found["Eosin: Median"][row] == pytest.approx(np.median(v))
            assert found["Eosin: Std.Dev."][row] == pytest.approx(v.std(ddof=1))


@pytest.mark.parametrize("seed", range(6))
def test_cell_intensities_combine_nucleus_and_cytoplasm_exactly(seed: int) -> None:
    """A cell's statistics come from its nucleus's and its cytoplasm's sorted pixels
    combined (sums, extremes, the median's ranks by binary search): each equals numpy's
    on the cell's pixels, with cells wholly nucleus, without nucleus pixels, with one
    pixel, with tied values, and with sparse ids."""
    from pipeline.measure.intensity import STATISTICS, cell_intensities

    rng = np.random.default_rng(seed)
    h, w = 50, 60
    cells = rng.integers(0, 10, (h, w)) * (rng.random((h, w)) < 0.85)
    nuclei = np.where(rng.random((h, w)) < 0.35, cells, 0)
    nuclei[cells == 3] = 0  # no nucleus pixel in the crop
    nuclei[cells == 5] = 5  # all nucleus
    cells[cells == 7] = 0
    cells[0, 0] = 7  # one pixel
    rgb = rng.integers(0, 256, (h, w, 3)).astype(np.uint8)
    if seed % 2:
        rgb //= 64  # few distinct values: ties within and between the two runs
    ids = np.arange(1, 10) if seed < 3 else np.array([1, 2, 3, 5, 7, 9, 12])
    stains = StainVectors()
    found = cell_intensities(cells, nuclei, rgb, stains, ids, "Cell: ", "Cytoplasm: ")
    channels = deconvolve(rgb, stains)
    for name, plane in channels.items():
        for row, i in enumerate(ids):
            for prefix, where in (("Cell: ", cells == i), ("Cytoplasm: ", (cells == i) & (nuclei == 0))):
                v = plane[where].astype(np.float64)
                got = {stat: found[f"{prefix}{name}: {stat}"][row] for stat in STATISTICS}
                if not len(v):
                    assert all(np.isnan(x) for x in got.values())
                    continue
                assert got["Median"] == pytest.approx(np.median(v), abs=1e-12)
                assert got["Min"] == pytest.approx(v.min(), abs=1e-12)
                assert got["Max"] == pytest.approx(v.max(), abs=1e-12)
                assert got["Mean"] == pytest.approx(v.mean(), abs=1e-12)
                assert got["Std.Dev."] == pytest.approx(v.std(ddof=1) if len(v) > 1 else 0.0, abs=1e-7)


def test_deconvolution_tables_give_the_arithmetic_s_numbers() -> None:
    """8-bit pixels are deconvolved from per-value tables: bitwise the numbers of the
    float arithmetic on the same values, and near QuPath's formula (OD · inverse matrix)."""
    rng = np.random.default_rng(5)
    rgb = rng.integers(0, 256, (64, 80, 3)).astype(np.uint8)
    stains = StainVectors(background=(241.0, 238.0, 244.0))
    fast, slow = deconvolve(rgb, stains), deconvolve(rgb.astype(np.float32), stains)
    assert all(np.array_equal(fast[k], slow[k]) for k in fast)
    od = np.maximum(-np.log10(np.maximum(rgb.astype(np.float64), 1) / np.array(stains.background)), 0)
    conc = od @ np.linalg.inv(stains.matrix())
    np.testing.assert_allclose(fast["Hematoxylin"], conc[..., 0], atol=1e-5)
    np.testing.assert_allclose(fast["Eosin"], conc[..., 1], atol=1e-5)
    np.testing.assert_allclose(fast["OD Sum"], od.sum(axis=-1), atol=1e-5)
