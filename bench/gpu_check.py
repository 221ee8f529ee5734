"""GPU check: on CUDA, is tiled inference exactly whole-image inference, and how fast is it?

    python -m bench.gpu_check                       # CUDA machine: < 5 min on an H200
    python -m bench.gpu_check --device cpu --quick  # CPU smoke run (tiny model, seconds)

The pipeline's exactness guarantee (``docs/design.md``: the tiled label image equals
whole-image inference, up to id numbering) is tested on the CPU (``tests/test_run.py``);
this script checks it on CUDA, where cuDNN may pick other algorithms for other window
shapes. On a synthetic slide at the model's resolution it runs, for several tile sizes,
the pipeline's own tiling (``plan_tiles``), window reads (``read_region``, mirrored at the
edges), batched forward passes per window shape and exact stitching (``segment_tile`` with
the recomputation of clusters larger than the halo), and compares the labels with
``predict_image`` + ``postprocess`` on the whole image. It also reports, per tile size,
the largest float difference between a tile's outputs and the whole image's (zero when
outputs are window-invariant), network throughput (Mpx/s of tile cores, tiles/s), the
end-to-end throughput with reads and stitching, and the GPU's utilisation while the
network runs (``torch.cuda.utilization()`` with pynvml, else ``nvidia-smi``, else n/a).

With ``--relaxed`` (the default on CUDA) the largest tile size is checked once more with
PyTorch's fast settings (TF32, cuDNN benchmark, non-deterministic algorithms): what
``WSI_NUCLEI_CUDA_DETERMINISTIC=0`` would give. It is reported, not required.

Imports only torch, numpy, scipy, scikit-image and tifffile (through ``models/`` and the
pipeline's pure modules), so it runs on a bare GPU machine without Dask, zarr, OpenSlide
or shapely. Exit status 1 when the labels differ with the deterministic settings; 0 with
"no CUDA device: skipped" on a machine without CUDA.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.common import default_json, headline, run_info, tiny_checkpoint, write_json
from models import checkpoints
from models.inference import context_margin, predict_batch, predict_image, retain_freed_memory
from models.watershed import postprocess
from pipeline.determinism import cuda_flags, pin_cuda_numerics
from pipeline.slide.memory import MemorySlide
from pipeline.slide.region import plan_read, read_region
from pipeline.stitch.grown import subwindow_predictor
from pipeline.stitch.tile import segment_tile
from pipeline.synthetic import synthetic_he
from pipeline.tiling import halo_for, plan_tiles
from pipeline.types import Box

NAME = "gpu_check"
SKIPPED = "no CUDA device: skipped"
SAMPLE_EVERY_S = 0.2  # GPU utilisation polling period while the network runs
FULL = {"size": 3072, "tiles": (256, 512, 1024), "batch": 8, "repeats": 2}
QUICK = {"size": 256, "tiles": (64, 128), "batch": 4, "repeats": 1}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (default cuda)")
    p.add_argument("--model", default=None, help="checkpoint (default: the shipped default model)")
    p.add_argument("--size", type=int, default=None, help="synthetic slide side, model px (default 3072)")
    p.add_argument("--tiles", default=None, help="tile sizes, comma-separated (default 256,512,1024)")
    p.add_argument("--batch", type=int, default=None, help="windows per forward pass (default 8)")
    p.add_argument("--repeats", type=int, default=None,
                   help="network passes per tile size; the last is timed (default 2: one warm-up)")
    p.add_argument("--relaxed", action=argparse.BooleanOptionalAction, default=None,
                   help="also check PyTorch's fast CUDA settings (default: on for CUDA)")
    p.add_argument("--quick", action="store_true", help="tiny hand-set model, small slide (smoke run)")
    p.add_argument("--json", type=Path, default=None, help="result file (default bench/results/)")
    args = p.parse_args(argv)
    preset = QUICK if args.quick else FULL
    args.size = args.size or preset["size"]
    args.tiles = tuple(int(t) for t in args.tiles.split(",")) if args.tiles else preset["tiles"]
    args.batch = args.batch or preset["batch"]
    args.repeats = max(1, args.repeats or preset["repeats"])
    return args


# --------------------------------------------------------------------------- GPU utilisation


def utilisation_reader(device: torch.device) -> tuple[str, Callable[[], float | None] | None]:
    """``(source, read)``: a function returning the device's utilisation in %, from pynvml
    (``torch.cuda.utilization``), else ``nvidia-smi``, else none (``"n/a"``)."""
    if device.type != "cuda":
        return "n/a", None
    index = device.index if device.index is not None else torch.cuda.current_device()
    try:
        torch.cuda.utilization(index)
        return "pynvml", lambda: float(torch.cuda.utilization(index))
    except Exception:  # pynvml missing or NVML unusable: torch raises several types
        pass
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return "n/a", None
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    target = visible[index] if index < len(visible) else str(index)  # nvidia-smi's own numbering

    def read() -> float | None:
        out = subprocess.run([smi, "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
                              "-i", target], capture_output=True, text=True, timeout=10)
        try:
            return float(out.stdout.strip().splitlines()[0])
        except (ValueError, IndexError):
            return None

    return ("nvidia-smi", read) if read() is not None else ("n/a", None)


class Sampler:
    """Polls ``read`` every ``SAMPLE_EVERY_S`` in a thread while the ``with`` block runs."""

    def __init__(self, read: Callable[[], float | None] | None) -> None:
        self.read, self.values = read, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(SAMPLE_EVERY_S):
            value = self.read() if self.read else None
            if value is not None:
                self.values.append(value)

    def __enter__(self) -> Sampler:
        if self.read:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self.read:
            self._thread.join()

    def summary(self) -> dict[str, Any]:
        if not self.values:
            return {"mean_pct": "n/a", "max_pct": "n/a", "samples": 0}
        return {"mean_pct": round(float(np.mean(self.values)), 1), "max_pct": max(self.values),
                "samples": len(self.values)}


# --------------------------------------------------------------------------- one check


def whole_image(net: Any, params: Any, rgb: np.ndarray) -> dict[str, Any]:
    """The canonical output: the network on the whole (mirrored) image, then the watershed."""
    t0 = time.perf_counter()
    prob, dist = predict_image(net, rgb)
    t1 = time.perf_counter()
    labels = postprocess(prob, dist, params)
    return {"prob": prob, "dist": dist, "labels": labels, "network_s": t1 - t0,
            "watershed_s": time.perf_counter() - t1}


def network_outputs(net: Any, windows: list[np.ndarray], batch: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Outputs per window; windows of one shape share forward passes of ``batch`` windows
    (as the pipeline groups border and interior tiles)."""
    out: list[tuple[np.ndarray, np.ndarray]] = [(np.empty(0), np.empty(0))] * len(windows)
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, w in enumerate(windows):
        groups.setdefault(w.shape, []).append(i)
    for members in groups.values():
        for start in range(0, len(members), batch):
            chunk = members[start:start + batch]
            prob, dist = predict_batch(net, np.stack([windows[i] for i in chunk]))
            for k, i in enumerate(chunk):
                out[i] = (prob[k], dist[k])
    return out


def same_partition(a: np.ndarray, b: np.ndarray) -> tuple[bool, int]:
    """Whether two label images are the same instances up to numbering; and how many
    pixels differ in being foreground."""
    differ = int(((a > 0) != (b > 0)).sum())
    if differ:
        return False, differ
    pairs = np.unique(np.stack([a[a > 0], b[b > 0]]), axis=1)
    return len(np.unique(pairs[0])) == pairs.shape[1] == len(np.unique(pairs[1])), 0


def tiled(net: Any, params: Any, reader: MemorySlide, plan: Any, tile: int, batch: int, repeats: int,
          whole: dict[str, Any], read_util: Callable[[], float | None] | None) -> dict[str, Any]:
    """The pipeline's tiled path for one tile size, compared with ``whole``."""
    cfg = net.config
    margin, multiple = context_margin(cfg), cfg.size_multiple
    shape = plan.shape
    image = Box(0, 0, *shape)
    tiles = plan_tiles(shape, tile, halo_for(cfg), multiple, margin)
    t0 = time.perf_counter()
    windows = [read_region(reader, plan, t.window) for t in tiles]
    read_s = time.perf_counter() - t0
    for _ in range(repeats - 1):  # warm-up: cuDNN's per-shape set-up, allocator growth
        network_outputs(net, windows, batch)
    with Sampler(read_util) as sampler:
        t0 = time.perf_counter()
        outputs = network_outputs(net, windows, batch)
        network_s = time.perf_counter() - t0

    def predict_window(box: Box) -> tuple[np.ndarray, np.ndarray]:
        p, d = predict_batch(net, read_region(reader, plan, box)[None])
        return p[0], d[0]

    predict = subwindow_predictor(predict_window, margin, multiple,
                                  max(max(w.shape[:2]) for w in windows), image)
    labels = np.zeros(shape, dtype=np.int64)
    max_dprob = max_ddist = 0.0
    painted_twice = recomputed = offset = 0
    t0 = time.perf_counter()
    for t, (prob, dist) in zip(tiles, outputs):
        valid = t.window.grow(-margin).intersect(image)
        local, glob = valid.slices((t.window.y0, t.window.x0)), valid.slices()
        max_dprob = max(max_dprob, float(np.abs(prob[local] - whole["prob"][glob]).max()))
        max_ddist = max(max_ddist, float(np.abs(dist[local] - whole["dist"][glob]).max()))
        result = segment_tile(t.core, t.window, prob, dist, image, params, margin, multiple, predict)
        recomputed += result.recomputed
        mine = result.labels > 0
        target = labels[result.extent.slices()]
        painted_twice += int((target[mine] > 0).sum())
        target[mine] = result.labels[mine] + offset
        offset += result.count
    stitch_s = time.perf_counter() - t0
    same, differ = same_partition(labels, whole["labels"].astype(np.int64))
    exact = same and painted_twice == 0 and offset == int(whole["labels"].max())
    core_mpx = shape[0] * shape[1] / 1e6
    window_mpx = sum(w.shape[0] * w.shape[1] for w in windows) / 1e6
    return {"tiles": len(tiles), "window_shapes": len({w.shape for w in windows}),
            "same_labels": exact, "foreground_pixels_differ": differ, "painted_twice": painted_twice,
            "nuclei": offset, "clusters_recomputed": recomputed, "max_abs_dprob": max_dprob,
            "max_abs_ddist": max_ddist, "read_s": read_s, "network_s": network_s, "stitch_s": stitch_s,
            "network_mpx_s": core_mpx / network_s, "network_window_mpx_s": window_mpx / network_s,
            "tiles_s": len(tiles) / network_s,
            "end_to_end_mpx_s": core_mpx / (read_s + network_s + stitch_s),
            "halo_overhead": window_mpx / core_mpx, "gpu_utilisation": sampler.summary()}


def relax_cuda_numerics() -> None:
    """PyTorch's fast CUDA settings: TF32, cuDNN autotuning, any algorithm."""
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
    torch.backends.cudnn.deterministic = False


# --------------------------------------------------------------------------- main


def _device_info(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {"device": str(device), "torch": torch.__version__}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update({"gpu": props.name, "gpu_memory_gib": round(props.total_memory / 2**30, 1),
                     "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
                     "flags": cuda_flags()})
        conv = getattr(getattr(torch.backends.cudnn, "conv", None), "fp32_precision", None)
        if conv is not None:
            info["cudnn_conv_fp32_precision"] = conv
    return info


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    device = torch.device(args.device)
    out = args.json or default_json(NAME, args.quick)
    summary: dict[str, Any] = run_info(NAME, argv, torch.get_num_threads())
    if device.type == "cuda" and not torch.cuda.is_available():
        summary.update({"skipped": SKIPPED, "headline": headline(SKIPPED)})
        write_json(out, summary)
        return summary
    retain_freed_memory()  # as the pipeline's workers do
    pinned = pin_cuda_numerics(device)
    with tempfile.TemporaryDirectory() as tmp:
        model = tiny_checkpoint(tmp) if args.quick else args.model or checkpoints.default_model()
        bundle = checkpoints.load(model, device, fold_bn=True)
    net, params = bundle.net, bundle.watershed
    summary.update(_device_info(device))
    summary.update({"model": Path(str(model)).name if not args.quick else "tiny (hand-set)",
                    "model_mpp": bundle.mpp, "size": args.size, "batch": args.batch,
                    "deterministic_flags_set": pinned})
    source, read_util = utilisation_reader(device)
    summary["gpu_utilisation_source"] = source
    print(f"{summary['device']} {summary.get('gpu', '')}  model {summary['model']} "
          f"({bundle.mpp} um/px)  slide {args.size}^2 px  utilisation: {source}", flush=True)

    rgb, _ = synthetic_he(args.size, args.size, seed=2022, mpp=bundle.mpp)
    reader = MemorySlide(rgb, mpp=bundle.mpp, name="gpu-check")
    plan = plan_read(reader.info, bundle.mpp)
    predict_image(net, rgb[:256, :256])  # warm-up
    whole = whole_image(net, params, rgb)
    summary["whole_image"] = {"nuclei": int(whole["labels"].max()), "network_s": whole["network_s"],
                              "watershed_s": whole["watershed_s"]}
    rows: dict[str, dict[str, Any]] = {}
    print(f"{'tile':>6}{'tiles':>7}{'shapes':>7}{'same':>6}{'nuclei':>8}{'max|dP|':>10}"
          f"{'net Mpx/s':>11}{'tiles/s':>9}{'e2e Mpx/s':>11}{'GPU %':>7}", flush=True)
    for tile in args.tiles:
        row = tiled(net, params, reader, plan, tile, args.batch, args.repeats, whole, read_util)
        rows[str(tile)] = row
        print(f"{tile:>6}{row['tiles']:>7}{row['window_shapes']:>7}{'yes' if row['same_labels'] else 'NO':>6}"
              f"{row['nuclei']:>8}{row['max_abs_dprob']:>10.2e}{row['network_mpx_s']:>11.2f}"
              f"{row['tiles_s']:>9.1f}{row['end_to_end_mpx_s']:>11.2f}"
              f"{row['gpu_utilisation']['mean_pct']!s:>7}", flush=True)
    summary["tile_sizes"] = rows
    summary["exact"] = all(r["same_labels"] for r in rows.values())
    if args.relaxed is None:
        args.relaxed = device.type == "cuda" and not args.quick
    if args.relaxed and device.type == "cuda":
        relax_cuda_numerics()
        fast = whole_image(net, params, rgb)
        tile = max(args.tiles)
        row = tiled(net, params, reader, plan, tile, args.batch, args.repeats, fast, read_util)
        summary["relaxed"] = {"flags": cuda_flags(), "tile": tile, **row}
        print(f"relaxed (TF32, cuDNN benchmark) at tile {tile}: same labels "
              f"{'yes' if row['same_labels'] else 'NO'}, max |dP| {row['max_abs_dprob']:.2e}, "
              f"network {row['network_mpx_s']:.2f} Mpx/s", flush=True)
    if device.type == "cuda":
        summary["peak_gpu_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    best = max(rows.values(), key=lambda r: r["network_mpx_s"])
    best_tile = next(t for t, r in rows.items() if r is best)
    verdict = "tiled == whole" if summary["exact"] else "tiled != whole (NOT EXACT)"
    summary["headline"] = headline(
        f"{summary['device']} {summary.get('gpu', '')}: {verdict} at tiles "
        f"{'/'.join(str(t) for t in args.tiles)} ({summary['whole_image']['nuclei']} nuclei); "
        f"network {best['network_mpx_s']:.2f} Mpx/s ({best['tiles_s']:.1f} tiles/s at tile {best_tile}), "
        f"end to end {best['end_to_end_mpx_s']:.2f} Mpx/s; GPU utilisation "
        f"{best['gpu_utilisation']['mean_pct']} % ({source})")
    write_json(out, summary)
    return summary


if __name__ == "__main__":
    result = main()
    sys.exit(0 if result.get("exact", True) else 1)
