"""Accuracy against speed for every model: AJI on the MoNuSeg test set vs network Mpx/s.

Why one benchmark for both: a pruned model is only worth shipping if it is faster *and*
nearly as accurate, and speed ratios are only trustworthy when the models are timed side
by side in the same run (same input, same threads, interleaved repeats, warm-up
excluded). Accuracy is ``models.evaluate.evaluate_folder`` with each model's own
watershed parameters, exactly what ``wsi-nuclei evaluate`` reports.

Writes a table, a JSON and a PNG (AJI against speed, one point per model). Speed is given
per model pixel and per slide area (Mpx at 40x per second): a 20x model's pixel covers
four 40x pixels, so it segments a slide 4x faster at the same per-pixel speed.

    python -m bench.accuracy_speed                          # every models/weights/*.pt
    python -m bench.accuracy_speed --models dense.pt pruned80.pt --data /path/monuseg/test
    python -m bench.accuracy_speed --quick                  # 2 images, small input, tiny model
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

from bench.common import (
    REPO,
    RESULTS,
    default_json,
    headline,
    quiet_logs,
    run_info,
    scratch,
    set_threads,
    tiny_checkpoint,
    weight_files,
    write_json,
)

NAME = "accuracy_speed"
AREA_MPP = 0.25  # slide area is counted in megapixels at 40x


def default_data() -> Path:
    """MoNuSeg test folder: ``$WSI_NUCLEI_SHARED_DATA/monuseg/test``, else the shared data
    next to the repository (as the tests look for it)."""
    shared = Path(os.environ.get("WSI_NUCLEI_SHARED_DATA", REPO.parent / "shared" / "data"))
    return shared / "monuseg" / "test"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=f"python -m bench.{NAME}", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="*", default=None,
                        help="checkpoints (default: every models/weights/*.pt; --quick: a tiny model)")
    parser.add_argument("--data", type=Path, default=None, help="annotated folder (MoNuSeg test)")
    parser.add_argument("--images", type=int, default=0, help="first N images only (0 = all)")
    parser.add_argument("--size", type=int, default=512, help="side of the speed input")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--png", type=Path, default=None)
    return parser.parse_args(argv)


def time_models(nets: dict[str, Any], size: int, repeats: int, bar: tqdm) -> dict[str, float]:
    """Mpx/s of each network on one H&E-like input, repeats interleaved across models so
    that a change of machine load hits every model alike."""
    from models.inference import predict_batch
    from pipeline.synthetic import synthetic_he

    rgb, _ = synthetic_he(size, size, seed=0)
    images = rgb[None]
    seconds = dict.fromkeys(nets, 0.0)
    for net in nets.values():
        predict_batch(net, images)  # warm-up
    for _ in range(repeats):
        for name, net in nets.items():
            t0 = time.perf_counter()
            predict_batch(net, images)
            seconds[name] += time.perf_counter() - t0
            bar.update()
    return {name: size * size * repeats / 1e6 / s for name, s in seconds.items()}


def plot(path: Path, rows: dict[str, dict[str, Any]], title: str) -> Path:
    """AJI against Mpx/s, one labelled point per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5), dpi=120)
    for name, r in rows.items():
        speed = r.get("area_mpx40_s", r["model_mpx_s"])
        ax.scatter(speed, r["aji"], s=40)
        ax.annotate(name, (speed, r["aji"]), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.set_xlabel("network throughput, slide area per second\n(Mpx at 0.25 um/px; same run, same threads)")
    ax.set_ylabel("AJI (MoNuSeg test)")
    ax.set_title(title, fontsize=9)
    ax.set_xlim(left=0)  # speed-ups read as distances from the origin
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> dict[str, Any]:
    started = time.perf_counter()
    args = parse_args(argv)
    quiet_logs()
    threads = set_threads(args.threads)
    data = args.data or default_data()
    info = run_info(NAME, argv, threads)
    out_json = args.json or default_json(NAME, args.quick)
    if not (data / "images").is_dir():
        reason = f"MoNuSeg test data not found at {data} (pass --data)"
        print(f"skipped: {reason}")
        summary = {**info, "skipped": reason}
        summary["headline"] = headline(f"skipped: {reason}")
        write_json(out_json, summary)
        return summary

    from models import checkpoints
    from models.data import list_pairs
    from models.evaluate import evaluate_folder
    from models.network import count_parameters

    n_images, size, repeats = args.images, args.size, args.repeats
    if args.quick:
        n_images, size, repeats = n_images or 2, 128, 2
    names = [p.stem for p, _ in list_pairs(data)]
    names = names[:n_images] if n_images else names
    with scratch("bench-accuracy-") as work:
        if args.models:
            models = args.models
        elif args.quick:
            models = [str(tiny_checkpoint(work))]
        else:
            found = weight_files()
            if not found:
                raise SystemExit("no models/weights/*.pt: pass --models")
            # dense first: it is the reference for the speed-up column
            models = [str(p) for p in sorted(found, key=lambda p: (p.stem != "dense", p.name))]
        bundles = {Path(m).name: checkpoints.load(m) for m in models}
        rows: dict[str, dict[str, Any]] = {}
        with tqdm(total=len(bundles) * (len(names) + repeats), desc="evaluate + time", unit="step",
                  file=sys.stderr) as bar:
            speeds = time_models({k: b.net for k, b in bundles.items()}, size, repeats, bar)
            for name, bundle in bundles.items():
                scores = evaluate_folder(bundle, data, names=names, progress=False)
                bar.update(len(names))
                net = bundle.net
                rows[name] = {"aji": scores["aji"], "pq": scores["pq"], "f1": scores["f1"],
                              "dice": scores["dice"], "model_mpx_s": speeds[name],
                              "parameters": count_parameters(net),
                              "nonzero_parameters": int(sum(int((p != 0).sum()) for p in net.parameters())),
                              "sha256": bundle.sha256, "mpp": bundle.mpp,
                              # a 20x model covers 4x the tissue per pixel: slide area per
                              # second, counted in 40x (0.25 um/px) megapixels
                              "area_mpx40_s": speeds[name] * (bundle.mpp / AREA_MPP) ** 2}
    ref_name = next(iter(rows))
    ref = rows[ref_name]
    print(f"{len(names)} image(s) of {data}; speed on a {size}^2 input, {repeats} interleaved repeats, "
          f"{threads} torch thread(s)")
    print(f"{'model':<24}{'um/px':>6}{'params':>10}{'nonzero':>10}{'AJI':>8}{'PQ':>8}{'F1':>8}"
          f"{'Mpx/s':>9}{'speed-up':>10}{'40x Mpx/s':>11}{'area x':>8}")
    for name, r in rows.items():
        r["speedup_vs_first"] = r["model_mpx_s"] / ref["model_mpx_s"]
        r["area_speedup_vs_first"] = r["area_mpx40_s"] / ref["area_mpx40_s"]
        print(f"{name:<24}{r['mpp']:>6.2f}{r['parameters']:>10}{r['nonzero_parameters']:>10}{r['aji']:>8.3f}"
              f"{r['pq']:>8.3f}{r['f1']:>8.3f}{r['model_mpx_s']:>9.3f}{r['speedup_vs_first']:>9.2f}x"
              f"{r['area_mpx40_s']:>11.3f}{r['area_speedup_vs_first']:>7.2f}x")
    png = args.png or (RESULTS / (f"{NAME}.quick.png" if args.quick else f"{NAME}.png"))
    plot(png, rows, f"{len(names)} MoNuSeg test images, {size}^2 input, {threads} thread(s), "
                    f"{info['date'][:10]}")
    summary = {**info, "data": str(data), "images": names, "input_size": size, "repeats": repeats,
               "models": rows, "png": str(png)}
    if len(rows) == 1:
        text = f"{ref_name}: AJI {ref['aji']:.3f} at {ref['model_mpx_s']:.3f} Mpx/s ({len(names)} images)"
    else:
        fast = max(rows, key=lambda k: rows[k]["model_mpx_s"])
        f = rows[fast]
        text = (f"fastest {fast} is {f['speedup_vs_first']:.2f}x {ref_name} at AJI {f['aji']:.3f} vs "
                f"{ref['aji']:.3f} ({f['aji'] - ref['aji']:+.3f}; {len(names)} images)")
    summary["headline"] = headline(text)
    summary["wall_s"] = time.perf_counter() - started
    write_json(out_json, summary)
    return summary


if __name__ == "__main__":
    main()
