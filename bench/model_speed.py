"""Model throughput, side by side in one run: Mpx/s of each model (and model + watershed)
on the same input with the same threads, warm-up excluded. Prints ratios to the first
model, which is the reference (e.g. dense.pt).

    python -m bench.model_speed --models dense.pt pruned80.pt
    python -m bench.model_speed --quick          # tiny random models, < 1 minute (CI smoke)
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from models import checkpoints
from models.config import NetConfig, WatershedParams
from models.inference import predict_batch
from models.network import NucleusNet, count_parameters
from models.watershed import postprocess


def _input(size: int, batch: int, seed: int = 0) -> np.ndarray:
    """An H&E-like test input: the shipped models see real tissue, random noise would
    make the watershed trivially cheap."""
    from pipeline.synthetic import synthetic_he

    rgb, _ = synthetic_he(size, size, seed=seed)
    return np.stack([rgb] * batch)


def measure(net: NucleusNet, params: WatershedParams, images: np.ndarray, repeats: int) -> dict:
    predict_batch(net, images)  # warm-up
    t_model = t_ws = 0.0
    for _ in range(repeats):
        t0 = time.perf_counter()
        prob, dist = predict_batch(net, images)
        t1 = time.perf_counter()
        for p, d in zip(prob, dist):
            postprocess(p, d, params)
        t_ws += time.perf_counter() - t1
        t_model += t1 - t0
    mpx = images.shape[0] * images.shape[1] * images.shape[2] * repeats / 1e6
    return {"model_mpx_s": mpx / t_model, "pipeline_mpx_s": mpx / (t_model + t_ws),
            "watershed_share": t_ws / (t_model + t_ws)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="*", default=["dense.pt"])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads or torch.get_num_threads())

    if args.quick:
        bundles = {name: (NucleusNet(NetConfig(arch="dual", widths=w, batchnorm=True)).eval(),
                          WatershedParams())
                   for name, w in (("tiny-dense", (8, 16, 32)), ("tiny-thin", (4, 8, 16)))}
        size, repeats = 128, 2
    else:
        bundles = {}
        for name in args.models:
            b = checkpoints.load(name)
            bundles[name] = (b.net, b.watershed)
        size, repeats = args.size, args.repeats
    images = _input(size, args.batch)
    results = {}
    for name, (net, params) in tqdm(bundles.items(), desc="models"):
        results[name] = {"parameters": count_parameters(net),
                         "nonzero_parameters": int(sum((p != 0).sum() for p in net.parameters())),
                         **measure(net, params, images, repeats)}
    ref = next(iter(results.values()))
    print(f"{'model':<28}{'params':>10}{'Mpx/s model':>13}{'Mpx/s +ws':>11}{'speed-up':>10}")
    for name, r in results.items():
        r["speedup_vs_first"] = r["model_mpx_s"] / ref["model_mpx_s"]
        print(f"{name:<28}{r['parameters']:>10}{r['model_mpx_s']:>13.3f}{r['pipeline_mpx_s']:>11.3f}"
              f"{r['speedup_vs_first']:>9.2f}x")
    summary = {"threads": torch.get_num_threads(), "size": size, "batch": args.batch,
               "results": results, "date": time.strftime("%Y-%m-%d"),
               "command": "python -m bench.model_speed " + " ".join(argv or [])}
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))
    last = list(results)[-1]
    print(f"headline: {last} is {results[last]['speedup_vs_first']:.2f}x the speed of {list(results)[0]}")
    return summary


if __name__ == "__main__":
    main()
