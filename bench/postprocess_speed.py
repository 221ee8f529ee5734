"""Per-nucleus work after the watershed: old (per-nucleus Python) vs new (vectorised),
side by side on the same label crops, in ms per nucleus, and what the GeoJSON costs in
bytes per nucleus.

    python -m bench.postprocess_speed                # MoNuSeg test labels (when present) + synthetic tiles
    python -m bench.postprocess_speed --repeats 5 --no-monuseg
    python -m bench.postprocess_speed --quick        # two small crops, one repeat (CI smoke)
    python -m bench.postprocess_speed --origin 60000 # crops placed far into a slide: 5-digit coordinates

Phases, as the pipeline runs them (``slide_run.tile_file.save_tile`` on a worker, then
``slide_run.outputs.write_nuclei``, the single writer of table and GeoJSON):

* ``measurements``: the table's columns. Old: skimage ``regionprops_table`` (perimeter,
  eccentricity, solidity, intensity_mean, ...). New: ``table.instance_measurements``
  (mean probability by one ``bincount``; moments and bbox come with the tracing, counted
  under ``polygons``; perimeter and solidity from the outlines).
* ``polygons``: one outline per nucleus. Old: rasterio ``features.shapes`` + a per-polygon
  ``make_valid`` / ``set_precision`` / ``orient``. New: ``outlines.trace_tile`` (outlines
  and the label moments).
* ``feature text`` (worker): what a tile stores for the GeoJSON. Old: WKB per polygon.
  New: each nucleus's feature JSON but its id (``features.feature_bodies``).
* ``finalize`` (single writer): old: parse WKB, build a dict, ``json.dumps`` per nucleus;
  new: splice ``Nucleus id`` into the stored text (``feature_texts``) and write it.
  Both write a real ``.geojson`` file (plain), which gives the bytes per nucleus, and
  where the new file's bytes go (``bytes_breakdown_new``: the feature's type, its
  geometry, objectType + classification, measurements, separators).

Outline fidelity: the new outline's area over the label's pixel area (median, 5th and
95th percentile, share beyond 10 %), and its Hausdorff distance to the unsimplified
sub-pixel outline in model px (what ``outlines.SIMPLIFY_TOLERANCE`` is about), per resolution.

Crops: the 14 MoNuSeg test label images (1000^2 at 40x, 0.25 µm/px, dense tumour
nuclei; ``$WSI_NUCLEI_SHARED_DATA/monuseg/test``, default ``../shared/data``) and
synthetic 1024^2 tiles (``pipeline.synthetic.synthetic_region_labels``). "40x" runs them
as a 40x model sees them (scale 1: one model px = one level-0 px); "20x" as a 20x model on
a 40x slide sees them (labels sampled at 0.5 µm/px, scale 2). The probability map is
uniform noise, 0.5-1 inside the nuclei and 0-0.5 outside (only its mean is measured; the noise
gives the means the digits a real probability map gives). The old implementation is
a copy kept in this file only, to measure the ratio (``_old_*``; it was the pipeline's
code up to commit 6affab6). The crops sit at the slide's origin (coordinates of 1-4
digits) unless ``--origin`` moves them (``--origin 60000``: 5 digits, as far into a 40x
slide; the bytes per nucleus grow with the digits).

Timing: each phase of each crop runs ``--repeats`` times, old and new interleaved, and the
median is summed over crops and divided by the number of nuclei. Both clocks are kept:
**CPU** time of the process (``time.process_time``: what the work costs; on the shared
2-core machine the wall clock also counts the time spent waiting for a core) and wall
time; ``cpu_best`` sums the fastest repeat instead of the median (the least disturbed by
other jobs). Everything here is single-threaded. ``finalize`` counts the writing of the
features, not the file's opening and atomic rename (once per slide).
"""

from __future__ import annotations

import argparse
import gzip
import io
import logging
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import rasterio.features
import shapely
from rasterio.transform import Affine
from shapely.geometry import Polygon, shape
from shapely.geometry.polygon import orient
from skimage.measure import regionprops_table
from tqdm import tqdm

from bench.common import default_json, headline, quiet_logs, run_info, write_json
from pipeline.measure.intensity import INTENSITY_NAMES
from pipeline.writers.features import feature_bodies, feature_texts, nucleus_feature
from pipeline.writers.geojson import GeoJSONWriter
from pipeline.writers.outlines import SIMPLIFY_TOLERANCE, _largest_polygon, trace_tile
from pipeline.writers.table import COLUMNS, instance_measurements

NAME = "postprocess_speed"
PHASES = ("measurements", "polygons", "feature text", "finalize")
MPP = 0.25  # level-0 µm/px of the (40x) slide the crops come from
OLD_PRECISION = 0.01  # the old code's vertex grid (QuPath's)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=f"python -m bench.{NAME}", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=None, help="MoNuSeg test folder (labels/*.tif)")
    p.add_argument("--no-monuseg", action="store_true", help="synthetic crops only")
    p.add_argument("--synthetic", type=int, default=4, help="synthetic 1024^2 tiles (40x)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="two small crops, one repeat")
    p.add_argument("--origin", type=int, default=0,
                   help="level-0 px added to x and y of every crop (coordinate digits in the GeoJSON)")
    p.add_argument("--json", type=Path, default=None)
    return p.parse_args(argv)


# --------------------------------------------------------------------------- old path
# The implementation before the vectorised one, kept here only to measure the ratio.


def _old_instance_measurements(labels: np.ndarray, prob: np.ndarray, offset_yx: tuple[int, int],
                               scale: float, mpp: float) -> pd.DataFrame:
    props = ("label", "area", "centroid", "bbox", "perimeter", "eccentricity", "solidity", "intensity_mean")
    p = regionprops_table(labels, np.asarray(prob, dtype=np.float64), properties=props)
    oy, ox, s = float(offset_yx[0]), float(offset_yx[1]), float(scale)
    cy = (p["centroid-0"] + oy + 0.5) * s - 0.5
    cx = (p["centroid-1"] + ox + 0.5) * s - 0.5
    area = p["area"].astype(np.float64) * s * s
    out = {
        "id": p["label"].astype(np.int64).astype("uint32"),
        "centroid_x_px": cx, "centroid_y_px": cy, "centroid_x_um": cx * mpp, "centroid_y_um": cy * mpp,
        "area_px": area, "Area µm^2": area * mpp * mpp, "Length µm": p["perimeter"] * s * mpp,
        "Circularity": 4 * np.pi * p["area"] / np.maximum(p["perimeter"], 1e-9) ** 2,
        "Solidity": p["solidity"], "Max diameter µm": np.nan, "Min diameter µm": np.nan,
        "Eccentricity": p["eccentricity"], "Detection probability": p["intensity_mean"],
        **{name: np.nan for name in INTENSITY_NAMES},  # the old path had no stain intensities
        "bbox_x0": np.floor((p["bbox-1"] + ox) * s).astype(np.int64),
        "bbox_y0": np.floor((p["bbox-0"] + oy) * s).astype(np.int64),
        "bbox_x1": np.ceil((p["bbox-3"] + ox) * s).astype(np.int64),
        "bbox_y1": np.ceil((p["bbox-2"] + oy) * s).astype(np.int64),
    }
    return pd.DataFrame(out).astype(COLUMNS)


def _old_clean(poly: Polygon, value: int) -> Polygon:
    geom = poly if poly.is_valid else shapely.make_valid(poly)
    part = _largest_polygon(geom, value) or poly
    snapped = _largest_polygon(shapely.set_precision(part, OLD_PRECISION), value) or part
    return orient(snapped, sign=1.0)


def _old_label_polygons(labels: np.ndarray, offset_yx: tuple[int, int], scale: float) -> list[Polygon]:
    lab = labels.astype(np.int32, copy=False)
    s = float(scale)
    transform = Affine(s, 0.0, offset_yx[1] * s, 0.0, s, offset_yx[0] * s)
    parts: dict[int, list[Polygon]] = {}
    for geom, value in rasterio.features.shapes(lab, mask=lab > 0, connectivity=4, transform=transform):
        parts.setdefault(int(value), []).append(shape(geom))
    return [_old_clean(max(parts[v], key=lambda p: p.area), v) for v in sorted(parts)]


def _old_feature_text(polygons: list[Polygon]) -> tuple[bytes, np.ndarray]:
    wkb = io.BytesIO()
    lengths = []
    for polygon in polygons:
        data = polygon.wkb
        wkb.write(data)
        lengths.append(len(data))
    return wkb.getvalue(), np.array(lengths, dtype=np.int64)


def _old_finalize(writer: GeoJSONWriter, table: pd.DataFrame, stored: tuple[bytes, np.ndarray]) -> None:
    wkb, lengths = stored
    cols = {k: table[k].to_numpy() for k in table}
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    names = [k for k in cols if k != "id"]
    for i, (start, length) in enumerate(zip(starts, lengths)):
        polygon = shapely.from_wkb(wkb[start:start + length])
        measurements = {name: float(cols[name][i]) for name in names}
        writer.write(nucleus_feature(int(cols["id"][i]), polygon, measurements))


# --------------------------------------------------------------------------- new path


def _new_feature_text(polygons: np.ndarray, table: pd.DataFrame) -> bytes:
    return "\n".join(feature_bodies(polygons, {k: table[k].to_numpy() for k in table})).encode("utf-8")


def _new_finalize(writer: GeoJSONWriter, table: pd.DataFrame, stored: bytes) -> None:
    bodies = stored.decode("utf-8").split("\n")
    writer.write_texts(feature_texts(table["id"].tolist(), bodies))


# --------------------------------------------------------------------------- crops


def _probability(labels: np.ndarray) -> np.ndarray:
    """A nucleus probability map for the crop: noise above 0.5 on the nuclei, below it
    elsewhere (seeded), so that the mean probabilities have as many digits as real ones."""
    noise = np.random.default_rng(0).uniform(0.0, 0.5, labels.shape)
    return (noise + 0.5 * (labels > 0)).astype(np.float32)


def _local(labels: np.ndarray) -> np.ndarray:
    """Consecutive local ids 1..n, as the watershed hands them to ``save_tile``."""
    _, inverse = np.unique(labels, return_inverse=True)
    return inverse.reshape(labels.shape).astype(np.int32)


def _crops(args: argparse.Namespace) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
    """(name, 40x labels, 20x labels) of every crop."""
    from models.data import downsample_labels
    from pipeline.synthetic import synthetic_region_labels
    from pipeline.types import Box

    side, n_syn = (384, 1) if args.quick else (1024, args.synthetic)
    for i in range(n_syn):
        box = Box(0, i * side, side, (i + 1) * side)
        half = Box(0, i * side // 2, side // 2, (i + 1) * side // 2)
        yield (f"synthetic-{i}", _local(synthetic_region_labels(box, seed=5, mpp=0.25)),
               _local(synthetic_region_labels(half, seed=5, mpp=0.5)))
    if args.no_monuseg:
        return
    import tifffile

    from bench.accuracy_speed import default_data

    files = sorted(((args.data or default_data()) / "labels").glob("*.tif"))
    for path in files[:1] if args.quick else files:
        lab = tifffile.imread(path)
        if args.quick:
            lab = lab[:400, :400]
        yield f"monuseg/{path.stem}", _local(lab), _local(downsample_labels(lab, 2))


# --------------------------------------------------------------------------- measuring


CLOCKS = ("cpu", "wall", "cpu_best")  # medians of CPU and wall time; best (min) CPU time


def _timed(fn: Callable[[], Any]) -> tuple[tuple[float, float], Any]:
    """((CPU seconds of this process, wall seconds), fn())."""
    c0, t0 = time.process_time(), time.perf_counter()
    out = fn()
    return (time.process_time() - c0, time.perf_counter() - t0), out


# where a feature's bytes go: the parts of its text, each from its marker to the next one
PARTS = (("type", b'{"type":"Feature"'), ("geometry", b'"geometry":'),
         ("classification", b',"properties":'), ("measurements", b'"measurements":'))
SIZE_PARTS = (*(name for name, _ in PARTS), "separators")


def _byte_parts(data: bytes) -> dict[str, int]:
    """Bytes of each part (``PARTS``) summed over the features of a GeoJSON file written
    one feature per line; ``separators``: the rest (line ends, commas, the collection)."""
    out = dict.fromkeys([name for name, _ in PARTS], 0)
    for line in data.split(b"\n"):
        feature = line.rstrip(b",")
        starts = [feature.find(marker) for _, marker in PARTS]
        if min(starts) < 0:
            continue
        for (name, _), a, b in zip(PARTS, starts, [*starts[1:], len(feature)]):
            out[name] += b - a
    out["separators"] = len(data) - sum(out.values())
    return out


def _run_once(labels: np.ndarray, prob: np.ndarray, scale: float, folder: Path, origin: int = 0,
              ) -> dict[str, dict[str, Any]]:
    """Both paths on one crop: (cpu, wall) seconds per phase, and the outputs for the checks.
    ``origin``: level-0 px of the crop's corner in x and y (rounded to whole model px)."""
    mpp = MPP  # level-0 µm/px
    at = (round(origin / scale),) * 2  # model px
    res: dict[str, dict[str, Any]] = {"old": {}, "new": {}}
    old, new = res["old"], res["new"]
    old["polygons"], old_polys = _timed(lambda: _old_label_polygons(labels, at, scale))
    new["polygons"], outlines = _timed(lambda: trace_tile(labels, at, scale))
    new_polys = outlines.polygons
    old["measurements"], old_table = _timed(
        lambda: _old_instance_measurements(labels, prob, at, scale, mpp))
    new["measurements"], new_table = _timed(
        lambda: instance_measurements(labels, prob, at, scale, mpp, outlines=outlines))
    old["feature text"], old_stored = _timed(lambda: _old_feature_text(old_polys))
    new["feature text"], new_stored = _timed(lambda: _new_feature_text(new_polys, new_table))
    for name, fn, stored, table in (("old", _old_finalize, old_stored, old_table),
                                    ("new", _new_finalize, new_stored, new_table)):
        path = folder / f"{name}.geojson"
        with GeoJSONWriter(path) as writer:  # opening and the atomic rename: per slide, not timed
            res[name]["finalize"], _ = _timed(lambda: fn(writer, table, stored))  # noqa: B023
        data = path.read_bytes()
        res[name]["bytes"] = len(data)
        res[name]["bytes_gz"] = len(gzip.compress(data, compresslevel=6, mtime=0))
        res[name]["parts"] = _byte_parts(data)
    res["new"]["polygons_out"], res["old"]["polygons_out"] = new_polys, old_polys
    return res


def _hausdorff(labels: np.ndarray, scale: float, polygons: np.ndarray, origin: int) -> np.ndarray:
    """Hausdorff distance (model px) of each outline to the unsimplified midpoint outline
    (GEOS, segments densified to a tenth), what the simplification tolerance bounds."""
    at = (round(origin / scale),) * 2
    full = trace_tile(labels, at, scale, tolerance=0).polygons
    return shapely.hausdorff_distance(polygons, full, densify=0.1) / scale


def _summarise(seconds: dict[tuple[str, ...], float], sizes: dict[tuple[str, str, str], int],
               n: int, ratio: np.ndarray, hausdorff: np.ndarray, res: str) -> dict[str, Any]:
    """One resolution's row: ms per nucleus per phase (CPU and wall), speed-ups, sizes,
    outline-vs-label area agreement."""
    n = max(n, 1)
    row: dict[str, Any] = {"nuclei": n}
    for clock in CLOCKS:
        ms_all, speed = {}, {}
        for path in ("old", "new"):
            ms = {ph: 1e3 * seconds[(res, path, ph, clock)] / n for ph in PHASES}
            ms["total"] = sum(ms.values())
            ms_all[path] = ms
        for ph in (*PHASES, "total"):
            speed[ph] = ms_all["old"][ph] / ms_all["new"][ph]
        row[f"ms_per_nucleus_{clock}"], row[f"speedup_{clock}"] = ms_all, speed
    for path in ("old", "new"):
        for key in ("bytes", "gzip_bytes", "vertices"):
            row[f"{key}_per_nucleus_{path}"] = sizes[(res, path, key)] / n
    row["bytes_breakdown_new"] = {part: sizes[(res, "new", part)] / n for part in SIZE_PARTS}
    row["outline_area_vs_label_area"] = {
        "mean_abs_rel_diff": float(np.mean(np.abs(ratio - 1))),
        "median_ratio": float(np.median(ratio)),
        "p5_ratio": float(np.percentile(ratio, 5)),
        "p95_ratio": float(np.percentile(ratio, 95)),
        "share_beyond_10pct": float(np.mean(np.abs(ratio - 1) > 0.1)),
    }
    row["hausdorff_to_unsimplified_model_px"] = {
        "median": float(np.median(hausdorff)), "p99": float(np.percentile(hausdorff, 99)),
        "max": float(hausdorff.max()),
        "share_over_tolerance": float(np.mean(hausdorff > SIMPLIFY_TOLERANCE + 0.01)),
    }
    return row


def _print_tables(results: dict[str, dict[str, Any]], n_crops: int, repeats: int) -> None:
    print(f"\n{n_crops} crops, median of {repeats} run(s) per phase; "
          "ms per nucleus: old / new = speed-up")
    print(f"{'':<12}{'nuclei':>7}" + "".join(f"{ph:>27}" for ph in (*PHASES, "total")))
    for r, row in results.items():
        for clock in CLOCKS:
            ms, speed = row[f"ms_per_nucleus_{clock}"], row[f"speedup_{clock}"]
            cells = [f"{ms['old'][ph]:>9.4f} / {ms['new'][ph]:.4f} ={speed[ph]:>5.1f}x"
                     for ph in (*PHASES, "total")]
            print(f"{r + ' ' + clock:<12}{row['nuclei']:>7}" + "".join(f"{c:>27}" for c in cells))
    print(f"\n{'':<6}{'B/nucleus old':>15}{'new':>7}{'gzip old':>10}{'new':>7}{'vertices old':>14}"
          f"{'new':>7}{'outline/label area p50 [p5, p95]':>34}{'mean |r - 1|':>14}{'> 10 %':>8}")
    for r, row in results.items():
        agree = row["outline_area_vs_label_area"]
        spread = f"{agree['median_ratio']:.3f} [{agree['p5_ratio']:.3f}, {agree['p95_ratio']:.3f}]"
        print(f"{r:<6}{row['bytes_per_nucleus_old']:>15.0f}{row['bytes_per_nucleus_new']:>7.0f}"
              f"{row['gzip_bytes_per_nucleus_old']:>10.0f}{row['gzip_bytes_per_nucleus_new']:>7.0f}"
              f"{row['vertices_per_nucleus_old']:>14.1f}{row['vertices_per_nucleus_new']:>7.1f}"
              f"{spread:>34}{100 * agree['mean_abs_rel_diff']:>13.2f}%"
              f"{100 * agree['share_beyond_10pct']:>7.1f}%")
    print("\nnew GeoJSON, bytes per nucleus by part; Hausdorff distance to the unsimplified outline:")
    for r, row in results.items():
        dist = row["hausdorff_to_unsimplified_model_px"]
        print(f"{r:<6}" + "  ".join(f"{k} {v:.1f}" for k, v in row["bytes_breakdown_new"].items())
              + f"  | Hausdorff median {dist['median']:.3f}, p99 {dist['p99']:.3f}, max {dist['max']:.3f}"
              + f" model px ({100 * dist['share_over_tolerance']:.2f} % over {SIMPLIFY_TOLERANCE})")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    # split-part notices of the writer would flood the table; restored afterwards, since
    # main() also runs inside other processes (the smoke tests)
    writer_log = logging.getLogger("pipeline.writers.geojson")
    level = writer_log.level
    writer_log.setLevel(logging.ERROR)
    try:
        return _main(argv)
    finally:
        writer_log.setLevel(level)


def _main(argv: list[str] | None) -> dict[str, Any]:
    started = time.perf_counter()
    args = parse_args(argv)
    quiet_logs()
    info = run_info(NAME, argv, 1)
    repeats = 1 if args.quick else max(1, args.repeats)
    crops = list(_crops(args))
    resolutions = {"40x": (1, 1.0), "20x": (2, 2.0)}  # index into the crop tuple, scale
    paths = ("old", "new")
    seconds = {(r, p, ph, c): 0.0 for r in resolutions for p in paths for ph in PHASES for c in CLOCKS}
    sizes = {(r, p, k): 0 for r in resolutions for p in paths
             for k in ("bytes", "gzip_bytes", "vertices", *SIZE_PARTS)}
    nuclei = {r: 0 for r in resolutions}
    ratios: dict[str, list[np.ndarray]] = {r: [] for r in resolutions}
    hausdorff: dict[str, list[np.ndarray]] = {r: [] for r in resolutions}
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-postprocess-") as tmp:  # warm-up: first calls
        small = crops[0][1][:128, :128]
        _run_once(_local(small), _probability(small), 1.0, Path(tmp))
    with tempfile.TemporaryDirectory(prefix="bench-postprocess-") as tmp, \
            tqdm(total=len(crops) * len(resolutions) * repeats, desc="crops x resolutions x repeats",
                 unit="run") as bar:
        for crop in crops:
            for res_name, (k, scale) in resolutions.items():
                labels = crop[k]
                prob = _probability(labels)
                runs = []
                for _ in range(repeats):
                    runs.append(_run_once(labels, prob, scale, Path(tmp), args.origin))
                    bar.update()
                nuclei[res_name] += int(labels.max())
                for path in paths:
                    for ph in PHASES:
                        for c, clock in enumerate(CLOCKS[:2]):
                            seconds[(res_name, path, ph, clock)] += statistics.median(
                                r[path][ph][c] for r in runs)
                        seconds[(res_name, path, ph, "cpu_best")] += min(r[path][ph][0] for r in runs)
                    last = runs[-1][path]
                    sizes[(res_name, path, "bytes")] += last["bytes"]
                    sizes[(res_name, path, "gzip_bytes")] += last["bytes_gz"]
                    for part, count in last["parts"].items():
                        sizes[(res_name, path, part)] += count
                    sizes[(res_name, path, "vertices")] += int(shapely.get_num_coordinates(
                        np.asarray(last["polygons_out"], dtype=object)).sum())
                label_area = np.bincount(labels.ravel())[1:] * scale * scale
                outlines = runs[-1]["new"]["polygons_out"]
                ratios[res_name].append(shapely.area(outlines) / label_area)
                hausdorff[res_name].append(_hausdorff(labels, scale, outlines, args.origin))
                rows.append({"name": crop[0], "resolution": res_name, "nuclei": int(labels.max())})

    results = {r: _summarise(seconds, sizes, nuclei[r], np.concatenate(ratios[r]),
                             np.concatenate(hausdorff[r]), r) for r in resolutions}
    _print_tables(results, len(crops), repeats)
    a, b = results["40x"], results["20x"]
    cpu, wall = a["ms_per_nucleus_cpu"], a["ms_per_nucleus_wall"]
    best = a["ms_per_nucleus_cpu_best"]

    def spread(row: dict[str, Any]) -> str:
        agree = row["outline_area_vs_label_area"]
        return f"{agree['median_ratio']:.3f} [{agree['p5_ratio']:.3f}, {agree['p95_ratio']:.3f}]"

    text = (f"new {cpu['new']['total']:.3f} ms/nucleus CPU (best {best['new']['total']:.3f}, wall "
            f"{wall['new']['total']:.3f}) vs old "
            f"{cpu['old']['total']:.3f} ({a['speedup_cpu']['total']:.0f}x) at 40x; GeoJSON "
            f"{a['bytes_per_nucleus_new']:.0f} B/nucleus at 40x (old {a['bytes_per_nucleus_old']:.0f}), "
            f"{b['bytes_per_nucleus_new']:.0f} at 20x (old {b['bytes_per_nucleus_old']:.0f}); "
            f"outline area / label area {spread(a)} at 40x, {spread(b)} at 20x (median [p5, p95])")
    summary = {**info, "repeats": repeats, "origin": args.origin, "crops": rows, "phases": list(PHASES),
               "results": results}
    summary["headline"] = headline(text)
    summary["wall_s"] = time.perf_counter() - started
    write_json(args.json or default_json(NAME, args.quick), summary)
    return summary


if __name__ == "__main__":
    main()
