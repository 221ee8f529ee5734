"""Helpers shared by the benchmarks: slides, models, child processes, memory, output.

Why these live here and not in ``pipeline/``: they exist only to measure the pipeline
(fake gigapixel slides, peak RSS of a child process, a random model for smoke runs) and
must never become something the pipeline depends on.

Measuring on a shared machine: absolute times move with the load, so every benchmark
measures the things it compares *side by side in one run* and reports ratios; the
absolute numbers are printed for orientation only.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.types import Box

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
GLASS_RGB = (244, 244, 246)  # slightly grey, as scanned glass; unsaturated -> no tissue
TISSUE_RGB = (214, 150, 190)  # flat pink: what the coarse levels of an island show


# --------------------------------------------------------------------------- output


def default_json(name: str, quick: bool) -> Path:
    """``bench/results/<name>.json`` for full runs; quick runs get ``<name>.quick.json``
    so that a smoke run never overwrites (or gets committed as) a real result."""
    return RESULTS / (f"{name}.quick.json" if quick else f"{name}.json")


def write_json(path: str | os.PathLike[str], data: dict[str, Any]) -> Path:
    """Write ``data`` as indented JSON (parent folders created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=_jsonable) + "\n")
    return path


def _jsonable(value: Any) -> Any:
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def run_info(name: str, argv: Sequence[str] | None, threads: int) -> dict[str, Any]:
    """Provenance stored with every result: command, date, load, machine."""
    try:
        load = [round(v, 2) for v in os.getloadavg()]
    except OSError:  # pragma: no cover - not on Linux/macOS
        load = []
    return {"command": " ".join(["python -m", f"bench.{name}", *(argv or [])]),
            "date": time.strftime("%Y-%m-%d %H:%M:%S"), "cpus": os.cpu_count(),
            "torch_threads": threads, "load_avg_at_start": load}


def headline(text: str) -> str:
    """Print ``headline: <text>``, the one line a reader (and the smoke test) looks for;
    returns ``text`` for the JSON."""
    print(f"headline: {text}", flush=True)
    return text


def quiet_logs() -> None:
    """Warnings only: Dask's INFO lines (cluster start, scheduler closing) would bury the
    tables the benchmarks print."""
    import logging

    logging.basicConfig(level=logging.WARNING)
    for name in ("distributed", "dask", "bokeh", "tornado"):
        logging.getLogger(name).setLevel(logging.WARNING)
    import dask

    dask.config.set({"distributed.admin.log-length": 0, "logging.distributed": "warning"})


def set_threads(n: int) -> int:
    """Use ``n`` torch threads (0: torch's default); returns the number in effect.

    Why 1 by default in the benchmarks: on a machine shared with a training job, two
    OpenMP threads per process thrash; ratios are what we compare, and they need the same
    threads on both sides, not many.
    """
    import torch

    if n > 0:
        torch.set_num_threads(n)
    return torch.get_num_threads()


# --------------------------------------------------------------------------- models


def tiny_checkpoint(folder: str | os.PathLike[str], name: str = "tiny.pt", *, mpp: float = 0.25,
                    widths: tuple[int, ...] = (8, 16, 32)) -> Path:
    """A small network with hand-set weights ("dark pixels are nuclei"), saved as a real
    checkpoint.

    Quick modes use it so that smoke runs take seconds and do not depend on the trained
    weights. Why not random weights: a random network often calls glass or whole islands
    foreground, and the stitcher then recomputes that "cluster" on windows growing up
    to ``stitch.grown.MAX_WINDOW`` (8192 px a side), which needs tens of GB. This one segments
    dark (haematoxylin) blobs, so components stay nucleus-sized and every code path runs
    with realistic sizes.
    """
    from models import checkpoints
    from models.config import NetConfig, TargetConfig, WatershedParams
    from models.network import NucleusNet

    net = NucleusNet(NetConfig(arch="dual", widths=widths, batchnorm=False, dropout=0.0)).eval()
    _darkness_weights(net)
    return checkpoints.save(Path(folder) / name, net, mpp=mpp,
                            watershed=WatershedParams(min_size=5, min_marker_size=2),
                            targets=TargetConfig(), provenance={"bench": "hand-set darkness model"})


def _darkness_weights(net: Any, threshold: float = 0.55) -> None:
    """Zero every weight, then route ``relu(threshold - mean RGB)`` (darkness) from the
    first encoder conv through the finest skip to both heads: logit = 40 d - 2, distance
    = 4 x (3x3-box-smoothed d), so nucleus centres pass the marker threshold."""
    import torch

    with torch.no_grad():
        for p in net.parameters():
            p.zero_()
        first = net.encoder.blocks[0]
        convs = [m for m in first if isinstance(m, torch.nn.Conv2d)]
        convs[0].weight[0, :, 1, 1] = -1.0 / 3.0
        convs[0].bias[0] = threshold
        convs[1].weight[0, 0, 1, 1] = 1.0
        for decoder, smooth, (gain, offset) in ((net.semantic_decoder, False, (40.0, -2.0)),
                                                (net.regression_decoder, True, (4.0, 0.0))):
            skip_at = decoder.ups[-1].out_channels  # cat([up(x), skip]): skip comes after
            c1, c2 = [m for m in decoder.blocks[-1] if isinstance(m, torch.nn.Conv2d)]
            if smooth:
                c1.weight[0, skip_at] = 1.0 / 9.0
                c2.weight[0, 0] = 1.0 / 9.0
            else:
                c1.weight[0, skip_at, 1, 1] = 1.0
                c2.weight[0, 0, 1, 1] = 1.0
            decoder.head.weight[0, 0] = gain
            decoder.head.bias[0] = offset


def weight_files() -> list[Path]:
    """Every shipped checkpoint (``models/weights/*.pt``), sorted by name."""
    from models.checkpoints import WEIGHTS_DIR

    return sorted(WEIGHTS_DIR.glob("*.pt"))


# --------------------------------------------------------------------------- slides


@dataclass(frozen=True)
class IslandPixels:
    """Pixel function of a procedural slide: a few rectangular tissue islands on glass.

    Why: to grow a slide's extent 16x while its tissue (and so its compute) stays fixed,
    the slide must cost nothing where there is no tissue, at every pyramid level. Level 0
    inside an island is a synthetic H&E image of the island (``synthetic_he``, seeded per
    island, computed for the whole island and cropped, so a pixel does not depend on the
    box it is read with, as the exact stitcher requires); coarser levels paint the island
    rectangles in a flat pink, which is all the tissue mask needs. Frozen and made of
    tuples, so it pickles to Dask workers and into child processes.
    """

    islands: tuple[Box, ...]  # level-0 boxes
    seed: int = 7
    mpp: float = 0.25

    def __call__(self, level: int, box: Box) -> np.ndarray:
        out = np.empty(box.shape + (3,), np.uint8)
        out[:] = GLASS_RGB
        ds = 2**level
        for i, island in enumerate(self.islands):
            if level == 0:
                inter = island.intersect(box)
                if inter.is_empty():
                    continue
                out[inter.slices((box.y0, box.x0))] = self._island_rgb(i)[
                    inter.slices((island.y0, island.x0))]
            else:
                scaled = Box(island.y0 // ds, island.x0 // ds, -(-island.y1 // ds), -(-island.x1 // ds))
                inter = scaled.intersect(box)
                if not inter.is_empty():
                    out[inter.slices((box.y0, box.x0))] = TISSUE_RGB
        return out

    def _island_rgb(self, i: int) -> np.ndarray:
        from pipeline.synthetic import synthetic_he

        island = self.islands[i]
        rgb, _ = synthetic_he(island.height, island.width, seed=self.seed * 1000 + i, mpp=self.mpp)
        return rgb

    @property
    def tissue_px(self) -> int:
        """Level-0 pixels inside islands (islands never overlap)."""
        return sum(b.height * b.width for b in self.islands)


def spread_islands(height: int, width: int, n: int, size: int, grid: int = 1024) -> tuple[Box, ...]:
    """``n`` square islands of ``size`` px spread evenly over a ``height x width`` slide,
    each centred in a ``grid``-px cell so that with tiles of ``grid`` px one island is one
    tile (no neighbour tile sees tissue through the mask's one-pixel dilation)."""
    if size > grid - 128:
        raise ValueError(f"island size {size} must leave a margin in its {grid}-px cell")
    k = math.ceil(math.sqrt(n))
    pad = (grid - size) // 2
    boxes = []
    for i in range(n):
        r, c = divmod(i, k)
        y = int((r + 0.5) * height / k) // grid * grid + pad
        x = int((c + 0.5) * width / k) // grid * grid + pad
        if y + size > height or x + size > width:
            raise ValueError(f"slide {height}x{width} too small for {n} islands of {size} px")
        boxes.append(Box(y, x, y + size, x + size))
    return tuple(boxes)


def island_slide(side: int, n_islands: int, island: int, *, mpp: float = 0.25, seed: int = 7,
                 name: str | None = None) -> Any:
    """A ``side x side`` procedural ``MemorySlide`` holding ``n_islands`` islands."""
    from pipeline.slide.memory import MemorySlide

    fn = IslandPixels(spread_islands(side, side, n_islands, island), seed=seed, mpp=mpp)
    return MemorySlide.procedural(side, side, mpp, fn, name=name or f"islands-{side}-{n_islands}")


def synthetic_tiff(path: str | os.PathLike[str], side: int, *, seed: int = 2022,
                   mpp: float = 0.25) -> Path:
    """A pyramidal JPEG TIFF of a ``synthetic_he`` image (made once, reused if present:
    writing it is not what the benchmarks measure)."""
    from pipeline.pyramid_tiff import write_pyramidal_tiff
    from pipeline.synthetic import synthetic_he

    path = Path(path)
    if not path.exists():
        rgb, _ = synthetic_he(side, side, seed=seed, mpp=mpp)
        write_pyramidal_tiff(path, rgb, mpp=mpp)
    return path


# --------------------------------------------------------------------------- memory


def peak_rss_self() -> int:
    """Peak resident set size of this process so far, bytes (Linux reports KiB)."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


class RssSampler:
    """Samples a process's current RSS in a thread; ``peak`` is the largest sample.

    Used where ``ru_maxrss`` cannot answer: the growth of a long-lived process (the
    Dask client) during one phase, after its start-up peak.
    """

    def __init__(self, pid: int | None = None, interval: float = 0.05):
        import psutil

        self._proc = psutil.Process(pid or os.getpid())
        self.interval = interval
        self.start = self.peak = self._proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._proc.memory_info().rss)
            self._stop.wait(self.interval)

    def current(self) -> int:
        """RSS now, bytes."""
        return int(self._proc.memory_info().rss)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.end = self._proc.memory_info().rss
        self.peak = max(self.peak, self.end)


@dataclass
class ChildResult:
    """What a benchmark child process reported, and what the kernel says it cost."""

    returncode: int
    peak_rss: int  # bytes, the child's own maximum resident set (wait4)
    seconds: float
    data: dict[str, Any] = field(default_factory=dict)


def run_child(module: str, args: Sequence[str], timeout: float | None = None) -> ChildResult:
    """Run ``python -m <module> <args> --child-json FILE`` in a fresh process.

    Why a fresh process per measurement: peak RSS is a high-water mark, so each size must
    start from nothing; ``os.wait4`` returns that child's own ``ru_maxrss`` (unlike
    ``RUSAGE_CHILDREN``, which is the maximum over all children waited for so far). The
    child writes its results to FILE; its stderr (progress, logs) passes through.
    """
    with tempfile.TemporaryDirectory(prefix="bench-child-") as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", module, *args, "--child-json", str(out)]
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL)
        deadline = None if timeout is None else t0 + timeout
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if deadline is not None and time.perf_counter() > deadline:
                proc.kill()
                pid, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.05)
        seconds = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        data = json.loads(out.read_text()) if out.exists() else {}
        peak = usage.ru_maxrss if sys.platform == "darwin" else usage.ru_maxrss * 1024
        return ChildResult(proc.returncode, int(peak), seconds, data)


def mib(n_bytes: float) -> float:
    return n_bytes / 2**20


# --------------------------------------------------------------------------- misc


@contextlib.contextmanager
def scratch(prefix: str, keep: str | os.PathLike[str] | None = None) -> Iterator[Path]:
    """A temporary folder for outputs (or ``keep``, created and left in place)."""
    if keep:
        path = Path(keep)
        path.mkdir(parents=True, exist_ok=True)
        yield path
        return
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        yield Path(tmp)


class Stopwatch:
    """``with Stopwatch() as t: ...``; then ``t.seconds``."""

    def __enter__(self) -> Stopwatch:
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self._t0
