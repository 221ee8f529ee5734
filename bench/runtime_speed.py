"""CPU inference runtimes side by side: eager PyTorch (what the pipeline runs) against ONNX
Runtime FP32, OpenVINO FP32 and OpenVINO INT8 (static post-training quantization), with
speed, output differences and MoNuSeg accuracy of each, per model.

    python -m bench.runtime_speed                   # pruned80.pt and dense.pt, 1376^2 window, 14 test images
    python -m bench.runtime_speed --models pruned80.pt --images 4 --size 1024
    python -m bench.runtime_speed --quick           # tiny hand-set model, synthetic images, < 1 minute

Why: published CPU figures for similar U-Nets (StarDist, Cellpose) put OpenVINO at ~1.5x
the framework in FP32 and ~2x in INT8; whether that holds for this network, and what INT8
costs in AJI, decided the runtime the pipeline ships: OpenVINO INT8 (MIXED preset, full bias
correction) for ``pruned20x.pt``, made by ``python -m models.quantize`` and run by
``models.runtime`` where the ``[openvino]`` extra is installed.

Every runtime runs through ``models.inference.predict_batch`` (uint8 NHWC windows, /255,
sigmoid): the ONNX and OpenVINO networks are wrapped in :class:`models.runtime.CompiledNet`, which looks to
``predict_batch`` (and so to ``models.evaluate``) like a ``NucleusNet``, so only the forward
pass differs. Speed: the pipeline's tile-1024 window (1376^2 px, ``--size``), the same
threads for every runtime (torch threads = ONNX Runtime intra-op threads = OpenVINO
``INFERENCE_NUM_THREADS``), two warm-up calls excluded, repeats interleaved across the
runtimes of a model, median. Models are measured one after another (each one's runtimes
hold their own buffers; four at a time of dense.pt at 1376^2 is enough memory).

Window invariance (what exact stitching needs of a runtime): each runtime's outputs on five
grid-aligned sub-windows of the timed window, away from their edges, against its own outputs
on the whole window (``win |d|``: largest difference; ``flips``: pixels whose > 0.5
foreground decision differs).

Checks: max abs difference of the probability and the distance map from torch's on a real
image window (the first test image, reflect-padded to the window), and AJI / PQ / Dice on
the MoNuSeg test folder from ``models.evaluate.evaluate_folder`` with each runtime; the
adoption bar is AJI within 1 % of torch's.

INT8: NNCF ``quantize`` (static PTQ) on the OpenVINO model, with its default preset
(``openvino-int8``: symmetric 8-bit weights and activations) and with the MIXED preset
(``openvino-int8-mixed``: asymmetric activations, a closer fit for ranges not centred on
zero, such as a signed up-convolution concatenated with a ReLU skip), both calibrated on
the same ``--calib`` random 256^2 patches of the MoNuSeg *training* images
(box-downsampled to the model's resolution; never test images); fast bias correction, or
the slower layer-by-layer one with ``--bias-correction full``. ``--quick``: synthetic
images for calibration and accuracy.
"""

from __future__ import annotations

import argparse
import copy
import gc
import importlib.metadata
import importlib.util
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from bench.common import (
    REPO,
    default_json,
    headline,
    quiet_logs,
    run_info,
    scratch,
    set_threads,
    tiny_checkpoint,
    write_json,
)
from models.inference import retain_freed_memory
from models.quantize import calibration_patches, quantize_int8, to_openvino
from models.runtime import CompiledNet, compile_openvino

NAME = "runtime_speed"
RUNTIMES = ("torch", "onnxruntime", "openvino", "openvino-int8", "openvino-int8-mixed")
# what each runtime imports; a runtime whose packages are missing is skipped (with the reason)
PACKAGES = {"torch": (), "onnxruntime": ("onnx", "onnxruntime"), "openvino": ("openvino",),
            "openvino-int8": ("openvino", "nncf"), "openvino-int8-mixed": ("openvino", "nncf")}
AJI_BAR_PCT = 1.0  # adoption bar: AJI within 1 % of torch's
CALIB_SIDE = 256


def shared_data() -> Path:
    """``$WSI_NUCLEI_SHARED_DATA``, else ``../shared/data`` next to the repository."""
    import os

    return Path(os.environ.get("WSI_NUCLEI_SHARED_DATA", REPO.parent / "shared" / "data"))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=f"python -m bench.{NAME}", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="*", default=None,
                   help="checkpoints (default: pruned80.pt and dense.pt, those shipped)")
    p.add_argument("--runtimes", default=",".join(RUNTIMES), help="comma list of " + ", ".join(RUNTIMES))
    p.add_argument("--size", type=int, default=1376,
                   help="window side in px at model resolution (1376: the tile-1024 window)")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds (median reported)")
    p.add_argument("--threads", type=int, default=1, help="threads of every runtime (0: torch default)")
    p.add_argument("--data", type=Path, default=None, help="annotated test folder (MoNuSeg test)")
    p.add_argument("--train", type=Path, default=None,
                   help="calibration images folder (MoNuSeg train/images)")
    p.add_argument("--images", type=int, default=0, help="first N test images only (0 = all)")
    p.add_argument("--calib", type=int, default=128, help="calibration patches (256^2) for INT8")
    p.add_argument("--bias-correction", choices=("fast", "full"), default="fast",
                   help="NNCF's bias correction after INT8 quantization (full: slower to quantize)")
    p.add_argument("--malloc", choices=("default", "retain"), default="default",
                   help="retain: glibc keeps freed memory for reuse (see retain_freed_memory)")
    p.add_argument("--quick", action="store_true",
                   help="tiny hand-set model, 128^2 window, synthetic images (no data needed)")
    p.add_argument("--json", type=Path, default=None)
    return p.parse_args(argv)


def missing_packages(runtime: str) -> list[str]:
    """Packages a runtime needs that are not installed."""
    return [m for m in PACKAGES[runtime] if importlib.util.find_spec(m) is None]


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for dist in ("torch", "onnx", "onnxruntime", "openvino", "nncf"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = None
    return out



# --------------------------------------------------------------------------- runtimes


def onnxruntime_net(net: torch.nn.Module, folder: Path, threads: int) -> CompiledNet:
    """Export to ONNX (dynamic batch, height, width; the TorchScript exporter: the dynamo
    one needs onnxscript) and open a CPUExecutionProvider session, all graph optimisations."""
    import onnxruntime as ort

    path = folder / "model.onnx"
    m = net.config.size_multiple
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(copy.deepcopy(net).eval(), (torch.zeros(1, 3, 4 * m, 4 * m),), str(path),
                          input_names=["image"], output_names=["logit", "dist"],
                          dynamic_axes={"image": {0: "n", 2: "h", 3: "w"}}, opset_version=17,
                          dynamo=False)
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return CompiledNet(net.config, lambda x: session.run(None, {"image": x}), "onnxruntime")


def build(runtime: str, net: torch.nn.Module, threads: int, folder: Path, cache: dict[str, Any],
          patches: Callable[[], list[np.ndarray]], fast_bc: bool = True) -> Any:
    """The network of one runtime (``cache`` shares the OpenVINO FP32 model with INT8)."""
    if runtime == "torch":
        return net
    if runtime == "onnxruntime":
        return onnxruntime_net(net, folder, threads)
    if "ov" not in cache:
        cache["ov"] = to_openvino(net)
    if runtime == "openvino":
        return compile_openvino(cache["ov"], net.config, threads)
    if runtime in ("openvino-int8", "openvino-int8-mixed"):
        if "patches" not in cache:
            cache["patches"] = patches()
        q = quantize_int8(cache["ov"], cache["patches"], mixed=runtime.endswith("mixed"), fast_bc=fast_bc)
        return compile_openvino(q, net.config, threads, runtime)
    raise ValueError(f"unknown runtime {runtime!r}; choose from {', '.join(RUNTIMES)}")


# --------------------------------------------------------------------------- inputs


def box_factor(mpp: float) -> int:
    """Integer box downsampling from MoNuSeg's 0.25 um/px to the model's resolution."""
    from models.evaluate import resolution_factor

    return resolution_factor(mpp)


def load_rgb(path: Path, factor: int) -> np.ndarray:
    from PIL import Image

    from models.data import downsample_image

    return downsample_image(np.asarray(Image.open(path).convert("RGB")), factor)


def window(image: np.ndarray, size: int) -> np.ndarray:
    """A ``size``^2 window of real pixels: the image reflect-padded (centred) and cropped."""
    from models.inference import reflect_pad

    ph, pw = max(0, size - image.shape[0]), max(0, size - image.shape[1])
    padded = reflect_pad(image, ((ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2)))
    return np.ascontiguousarray(padded[:size, :size])


def synthetic_folder(folder: Path, n: int, side: int) -> Path:
    """A MoNuSeg-layout annotated folder of ``synthetic_he`` images (quick mode)."""
    import tifffile
    from PIL import Image

    from pipeline.synthetic import synthetic_he

    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "labels").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        rgb, labels = synthetic_he(side, side, seed=100 + i)
        Image.fromarray(rgb).save(folder / "images" / f"synthetic-{i}.png")
        tifffile.imwrite(folder / "labels" / f"synthetic-{i}.tif", labels.astype(np.uint32))
    return folder


# --------------------------------------------------------------------------- measuring


def _max_diff(out: tuple[np.ndarray, np.ndarray], ref: tuple[np.ndarray, np.ndarray]) -> tuple[float, float]:
    return (float(np.abs(out[0] - ref[0]).max()), float(np.abs(out[1] - ref[1]).max()))


def sub_windows(size: int, m: int) -> list[tuple[int, int, int, int]]:
    """Grid-aligned (y, x, h, w) windows inside a ``size``^2 one, of several shapes and
    origins (as tiles, border tiles and grown cluster windows are)."""
    q = max(m, size // 4 // m * m)
    boxes = [(0, 0, 2 * q, 2 * q), (q, q, 2 * q, 2 * q), (q // 2 // m * m, 0, size - q, 2 * q + m),
             (0, size - q - m, 2 * q, q + m), (q, q // 2 // m * m, size - q, size - q)]
    return [(y, x, min(h, size - y), min(w, size - x)) for y, x, h, w in boxes]


def window_invariance(net: Any, image: np.ndarray, full: tuple[np.ndarray, np.ndarray]) -> dict[str, float]:
    """Exact stitching needs a pixel's output not to depend on its window: each
    sub-window's interior (farther than ``context_margin`` from its edge) against the same
    pixels of the full window: largest |difference| (probability or distance) and pixels
    whose foreground decision (> 0.5) flips."""
    from models.inference import context_margin, predict_batch

    margin = context_margin(net.config)
    worst, flips = 0.0, 0
    for y, x, h, w in sub_windows(image.shape[0], net.config.size_multiple):
        if h <= 2 * margin or w <= 2 * margin:
            continue
        p, d = predict_batch(net, np.ascontiguousarray(image[y:y + h, x:x + w])[None])
        inner = (slice(margin, h - margin), slice(margin, w - margin))
        whole = (slice(y + margin, y + h - margin), slice(x + margin, x + w - margin))
        worst = max(worst, float(np.abs(p[0][inner] - full[0][0][whole]).max()),
                    float(np.abs(d[0][inner] - full[1][0][whole]).max()))
        flips += int(((p[0][inner] > 0.5) != (full[0][0][whole] > 0.5)).sum())
    return {"max_abs_diff": worst, "foreground_flips": flips}


def measure_model(bundle: Any, runtimes: list[str], args: argparse.Namespace, threads: int,
                  size: int, repeats: int, test: Path | None, names: list[str],
                  calib_images: Callable[[int], list[np.ndarray]], bar: tqdm) -> dict[str, Any]:
    """Speed, output differences and accuracy of every runtime for one model."""
    from models.evaluate import evaluate_folder
    from models.inference import predict_batch

    net = bundle.net
    m = net.config.size_multiple
    if size % m:
        raise SystemExit(f"--size {size} is not a multiple of {m}")
    factor = box_factor(bundle.mpp)
    if test is not None and names:
        image = load_rgb(test / "images" / f"{names[0]}.png", factor)
        source = f"{names[0]} (reflect-padded)"
    else:
        from pipeline.synthetic import synthetic_he

        image, source = synthetic_he(size, size, seed=0, mpp=bundle.mpp)[0], "synthetic_he"
    x = window(image, size)[None]

    def patches() -> list[np.ndarray]:
        return calibration_patches(calib_images(factor), args.calib, min(CALIB_SIDE, size))

    rows: dict[str, dict[str, Any]] = {}
    nets: dict[str, Any] = {}
    outs: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    cache: dict[str, Any] = {}
    with scratch("bench-runtime-") as work:
        for rt in runtimes:
            t0 = time.perf_counter()
            nets[rt] = build(rt, net, threads, work, cache, patches, args.bias_correction == "fast")
            prepare = time.perf_counter() - t0
            t0 = time.perf_counter()
            predict_batch(nets[rt], x)  # warm-up: shape-specific kernels, buffers
            first = time.perf_counter() - t0
            outs[rt] = predict_batch(nets[rt], x)
            rows[rt] = {"prepare_s": prepare, "first_call_s": first}
            bar.update()
    ref = outs["torch"]
    for rt in runtimes:
        rows[rt]["max_abs_diff_prob"], rows[rt]["max_abs_diff_dist"] = _max_diff(outs[rt], ref)
        rows[rt]["window_invariance"] = window_invariance(nets[rt], x[0], outs[rt])

    times: dict[str, list[float]] = {rt: [] for rt in runtimes}
    for _ in range(repeats):
        for rt in runtimes:
            t0 = time.perf_counter()
            predict_batch(nets[rt], x)
            times[rt].append(time.perf_counter() - t0)
        bar.update()
    mpx = size * size / 1e6
    t_ref = statistics.median(times["torch"])
    for rt in runtimes:
        t = statistics.median(times[rt])
        rows[rt].update({"seconds_median": t, "seconds": times[rt], "model_mpx_s": mpx / t,
                         "speedup_vs_torch": t_ref / t})

    if test is not None and names:
        for rt in runtimes:
            scores = evaluate_folder(replace(bundle, net=nets[rt]), test, names=names, progress=False)
            rows[rt].update({k: scores[k] for k in ("aji", "pq", "dice", "f1", "semantic_dice")})
            bar.update()
        aji_ref = rows["torch"]["aji"]
        for rt in runtimes:
            rows[rt]["delta_aji_pct"] = 100.0 * (rows[rt]["aji"] - aji_ref) / aji_ref
    del nets, cache
    gc.collect()
    ok = [rt for rt in runtimes if rows[rt].get("delta_aji_pct", 0.0) >= -AJI_BAR_PCT]
    return {"mpp": bundle.mpp, "sha256": bundle.sha256, "window": source,
            "accuracy_measured": test is not None and bool(names),
            "fastest_within_bar": max(ok, key=lambda rt: rows[rt]["model_mpx_s"]),
            "runtimes": rows}


def default_models() -> list[str]:
    from models import checkpoints

    names = [n for n in ("pruned80.pt", "dense.pt") if (checkpoints.WEIGHTS_DIR / n).exists()]
    if not names:
        raise SystemExit("no shipped pruned80.pt / dense.pt: pass --models")
    return names


def main(argv: list[str] | None = None) -> dict[str, Any]:
    started = time.perf_counter()
    args = parse_args(argv)
    quiet_logs()
    threads = set_threads(args.threads)
    info = run_info(NAME, argv, threads)
    out_json = args.json or default_json(NAME, args.quick)
    size, repeats = (128, 2) if args.quick else (args.size, args.repeats)
    if args.quick:
        args.calib = min(args.calib, 8)
    if args.malloc == "retain" and not retain_freed_memory():
        raise SystemExit("--malloc retain needs glibc (mallopt)")

    runtimes, skipped = [], {}
    for rt in ["torch"] + [r.strip() for r in args.runtimes.split(",") if r.strip() and r.strip() != "torch"]:
        if rt not in PACKAGES:
            raise SystemExit(f"unknown runtime {rt!r}; choose from {', '.join(RUNTIMES)}")
        missing = missing_packages(rt)
        if missing:
            skipped[rt] = f"not installed: {', '.join(missing)} (pip install -e '.[onnx,quantize]')"
            print(f"skipped {rt}: {skipped[rt]}")
        else:
            runtimes.append(rt)

    from models import checkpoints
    from models.data import list_pairs

    with scratch("bench-runtime-data-") as work:
        if args.quick:
            test: Path | None = synthetic_folder(work / "synthetic", 2, 192)
            models = args.models or [str(tiny_checkpoint(work))]
        else:
            test = args.data or shared_data() / "monuseg" / "test"
            models = args.models or default_models()
        names: list[str] = []
        if (test / "images").is_dir():
            names = [p.stem for p, _ in list_pairs(test)]
            names = names[:args.images] if args.images else names
        else:
            print(f"accuracy skipped: no annotated test folder at {test} (pass --data)")
            test = None
        train = args.train or shared_data() / "monuseg" / "train" / "images"
        if args.quick:
            calib_source = "synthetic_he"
        else:
            calib_source = str(train)
            if any("int8" in rt for rt in runtimes) and not sorted(train.glob("*.png")):
                raise SystemExit(f"no calibration images {train}/*.png (pass --train)")
        calib_cache: dict[int, list[np.ndarray]] = {}

        def calib_images(factor: int) -> list[np.ndarray]:
            """Calibration images at the model's resolution (training images only)."""
            if factor not in calib_cache:
                if args.quick:
                    from pipeline.synthetic import synthetic_he

                    calib_cache[factor] = [synthetic_he(256, 256, seed=200 + i)[0] for i in range(2)]
                else:
                    calib_cache[factor] = [load_rgb(p, factor) for p in sorted(train.glob("*.png"))]
            return calib_cache[factor]

        results: dict[str, dict[str, Any]] = {}
        steps = len(models) * (2 * len(runtimes) + repeats)
        with tqdm(total=steps if names else steps - len(models) * len(runtimes), desc="runtimes",
                  unit="step", file=sys.stderr) as bar:
            for model in models:
                bundle = checkpoints.load(model, fold_bn=True)
                results[Path(model).name] = measure_model(bundle, runtimes, args, threads, size, repeats,
                                                          test, names, calib_images, bar)
                del bundle
                gc.collect()

    print(f"\n{size}x{size} window, {threads} thread(s) per runtime, median of {repeats} interleaved "
          f"rounds, malloc {args.malloc}; accuracy: {len(names)} image(s) of {test or '-'}")
    print(f"{'model':<14}{'runtime':<21}{'Mpx/s':>8}{'x torch':>9}{'max|dP|':>10}{'max|dD|':>10}"
          f"{'AJI':>8}{'dAJI %':>8}{'PQ':>7}{'Dice':>7}{'prep s':>8}{'win |d|':>9}{'flips':>6}")
    nan = float("nan")
    for model, res in results.items():
        for rt, r in res["runtimes"].items():
            print(f"{model:<14}{rt:<21}{r['model_mpx_s']:>8.3f}{r['speedup_vs_torch']:>8.2f}x"
                  f"{r['max_abs_diff_prob']:>10.2e}{r['max_abs_diff_dist']:>10.2e}{r.get('aji', nan):>8.4f}"
                  f"{r.get('delta_aji_pct', nan):>+8.2f}{r.get('pq', nan):>7.3f}{r.get('dice', nan):>7.3f}"
                  f"{r['prepare_s']:>8.1f}{r['window_invariance']['max_abs_diff']:>9.1e}"
                  f"{r['window_invariance']['foreground_flips']:>6d}")
    parts = []
    for model, res in results.items():
        rt = res["fastest_within_bar"]
        r = res["runtimes"][rt]
        acc = f", AJI {r['delta_aji_pct']:+.2f} %" if "delta_aji_pct" in r else ""
        parts.append(f"{model} {rt} {r['speedup_vs_torch']:.2f}x torch{acc}")
    bar_text = (f"within {AJI_BAR_PCT:g} % AJI of torch ({len(names)} images)" if names
                else "(accuracy not measured)")
    text = f"fastest runtime {bar_text}: " + "; ".join(parts) + f" ({size}^2, {threads} thread(s))"
    summary = {**info, "size": size, "repeats": repeats, "threads": threads, "runtimes": runtimes,
               "skipped": skipped, "versions": versions(), "malloc": args.malloc,
               "aji_bar_pct": AJI_BAR_PCT,
               "data": str(test) if test else None, "images": names,
               "int8": {"route": "nncf.quantize (static PTQ) on the OpenVINO model; openvino-int8: "
                                 "default preset (PERFORMANCE, symmetric), openvino-int8-mixed: MIXED "
                                 "(asymmetric activations)",
                        "bias_correction": args.bias_correction,
                        "calibration": calib_source, "patches": args.calib,
                        "patch_side": min(CALIB_SIDE, size)},
               "results": results}
    summary["headline"] = headline(text)
    summary["wall_s"] = time.perf_counter() - started
    write_json(out_json, summary)
    return summary


if __name__ == "__main__":
    main()
