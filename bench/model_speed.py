"""Network throughput, side by side in one run: Mpx/s of each model and runtime on the
same input with the same threads, warm-up excluded, ratios to the first model (the
reference, ``dense.pt``).

    python -m bench.model_speed                    # dense.pt, its unstructured 80 % copies, pruned80.pt
    python -m bench.model_speed --models dense.pt slim.pt --unstructured 0 --runtimes eager
    python -m bench.model_speed --quick            # tiny hand-made models, < 1 minute (CI smoke)

What it answers: does pruning make the network faster? Unstructured (layer-wise or
network-wide) 80 % copies of the reference are measured next to the structured model to
show that zeros in dense kernels save nothing, while fewer channels do.

Runtimes: ``eager`` (what the pipeline runs: BatchNorm folded into the convolutions,
channels-last tensors, oneDNN's NHWC convolutions), ``eager-bn`` (the same with BatchNorm
as separate layers, i.e. before folding), ``eager-nchw`` (unfolded, PyTorch's default
layout) and ``torchscript`` (channels-last, traced, frozen and ``optimize_for_inference``).
Each runtime's output is compared with eager's (``max_abs_diff``) so a faster runtime
cannot silently compute something else.

Fairness on a noisy machine: repeats are interleaved (one timed forward of every variant
per round) and the median round is used, so a burst of load hits all variants alike.
``model + ws`` adds the watershed (eager outputs of each model, same params as shipped).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from bench.common import default_json, headline, quiet_logs, run_info, set_threads, write_json
from models import checkpoints
from models.config import NetConfig, WatershedParams
from models.inference import fold_batchnorm
from models.network import NucleusNet, count_parameters
from models.watershed import postprocess

NAME = "model_speed"
RUNTIMES = ("eager", "eager-bn", "eager-nchw", "torchscript")
Forward = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.model_speed", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="*", default=None,
                   help="checkpoints, the first is the reference (default: dense.pt, and "
                        "pruned80.pt when shipped)")
    p.add_argument("--unstructured", type=float, default=0.8,
                   help="also measure layer-wise and global magnitude-pruned copies of the "
                        "reference at this ratio (0: skip)")
    p.add_argument("--runtimes", default=",".join(RUNTIMES), help="comma list of " + ", ".join(RUNTIMES))
    p.add_argument("--size", type=int, default=512, help="input side in px (model resolution)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=7, help="timed rounds (median reported)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (0: torch default)")
    p.add_argument("--quick", action="store_true", help="tiny hand-made models, small input")
    p.add_argument("--json", default=None)
    return p.parse_args(argv)


def _input(size: int, batch: int, seed: int = 0) -> np.ndarray:
    """An H&E-like test input: the shipped models see real tissue, random noise would make
    the watershed trivially cheap."""
    from pipeline.synthetic import synthetic_he

    rgb, _ = synthetic_he(size, size, seed=seed)
    return np.stack([rgb] * batch)


def _models(args: argparse.Namespace) -> dict[str, tuple[NucleusNet, WatershedParams]]:
    if args.quick:
        return {name: (NucleusNet(NetConfig(arch="dual", widths=w, batchnorm=True)).eval(),
                       WatershedParams())
                for name, w in (("tiny-dense", (8, 16, 32)), ("tiny-thin", (4, 8, 16)))}
    names = args.models
    if not names:
        names = ["dense.pt"]
        if (checkpoints.WEIGHTS_DIR / "pruned80.pt").exists():
            names.append("pruned80.pt")
    out = {}
    for name in names:
        b = checkpoints.load(name)
        out[name] = (b.net, b.watershed)
    return out


def _with_unstructured(models: dict[str, tuple[NucleusNet, WatershedParams]],
                       ratio: float) -> dict[str, tuple[NucleusNet, WatershedParams]]:
    """The reference, then its layer-wise and global magnitude-pruned copies, then the rest."""
    from models.pruning.unstructured import apply_masks, magnitude_masks

    items = list(models.items())
    ref_name, (ref, params) = items[0]
    extra = {}
    for method in ("layerwise", "global"):
        net = copy.deepcopy(ref).eval()
        apply_masks(net, magnitude_masks(net, method, ratio, "both"))
        extra[f"{ref_name} {method} {100 * ratio:g}%"] = (net, params)
    return {ref_name: (ref, params), **extra, **dict(items[1:])}


def _compile(net: NucleusNet, runtime: str, x: torch.Tensor) -> Forward:
    """A forward function taking the NCHW input; ``eager`` and ``torchscript`` run
    channels-last (NHWC) like ``models.inference.predict_batch``, ``eager-nchw`` does not."""
    nhwc = torch.channels_last
    if runtime == "eager-nchw":
        plain = copy.deepcopy(net).to(memory_format=torch.contiguous_format)
        return lambda t: plain(t.contiguous())
    last = copy.deepcopy(net).to(memory_format=nhwc)
    if runtime == "eager-bn":
        return lambda t: last(t.contiguous(memory_format=nhwc))
    if runtime == "eager":
        folded = fold_batchnorm(net).to(memory_format=nhwc)
        return lambda t: folded(t.contiguous(memory_format=nhwc))
    if runtime == "torchscript":
        with torch.inference_mode(False), torch.no_grad():
            traced = torch.jit.trace(last, x.contiguous(memory_format=nhwc), check_trace=False)
            frozen = torch.jit.optimize_for_inference(torch.jit.freeze(traced.eval()))
        return lambda t: frozen(t.contiguous(memory_format=nhwc))
    raise ValueError(f"unknown runtime {runtime!r}; choose from {', '.join(RUNTIMES)}")


def _time_once(fn: Forward, x: torch.Tensor) -> tuple[float, tuple[torch.Tensor, torch.Tensor]]:
    with torch.no_grad():
        t0 = time.perf_counter()
        out = fn(x)
        return time.perf_counter() - t0, out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    started = time.perf_counter()
    args = parse_args(argv)
    quiet_logs()
    threads = set_threads(args.threads)
    info = run_info(NAME, argv, threads)
    runtimes = [r.strip() for r in args.runtimes.split(",") if r.strip()]
    size, repeats = (128, 2) if args.quick else (args.size, args.repeats)
    models = _models(args)
    if args.unstructured > 0:
        models = _with_unstructured(models, args.unstructured)
    images = _input(size, args.batch)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255.0).contiguous()

    variants: dict[tuple[str, str], Forward] = {}
    eager_out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    diffs: dict[tuple[str, str], float] = {}
    for name, (net, _) in tqdm(models.items(), desc="prepare"):
        for runtime in runtimes:
            fn = _compile(net, runtime, x)
            _, out = _time_once(fn, x)  # warm-up (and TorchScript's profiling runs)
            _, out = _time_once(fn, x)
            if runtime == "eager":
                eager_out[name] = out
            variants[(name, runtime)] = fn
            if name in eager_out:
                ref = eager_out[name]
                diffs[(name, runtime)] = max(float((a - b).abs().max()) for a, b in zip(out, ref))

    times: dict[tuple[str, str], list[float]] = {k: [] for k in variants}
    for _ in tqdm(range(repeats), desc="rounds"):
        for key, fn in variants.items():
            times[key].append(_time_once(fn, x)[0])

    ws_times: dict[str, float] = {}
    for name, (_, params) in tqdm(models.items(), desc="watershed"):
        if name not in eager_out:
            continue
        logit, dist = eager_out[name]
        prob = torch.sigmoid(logit)[:, 0].numpy()
        t0 = time.perf_counter()
        for p, d in zip(prob, dist[:, 0].numpy()):
            postprocess(p, d, params)
        ws_times[name] = time.perf_counter() - t0

    mpx = x.shape[0] * x.shape[2] * x.shape[3] / 1e6
    ref_name = next(iter(models))
    ref_time = statistics.median(times[(ref_name, runtimes[0])])
    results: dict[str, dict[str, Any]] = {}
    for (name, runtime), ts in times.items():
        net = models[name][0]
        t = statistics.median(ts)
        row = results.setdefault(name, {
            "parameters": count_parameters(net),
            "nonzero_parameters": int(sum(int((p != 0).sum()) for p in net.parameters())),
            "runtimes": {}})
        row["runtimes"][runtime] = {
            "seconds_median": t, "model_mpx_s": mpx / t, "speedup_vs_reference": ref_time / t,
            "max_abs_diff_vs_eager": diffs.get((name, runtime))}
        if runtime == "eager" and name in ws_times:
            row["model_plus_watershed_mpx_s"] = mpx / (t + ws_times[name])
            row["watershed_share"] = ws_times[name] / (t + ws_times[name])

    print(f"\n{size}x{size} x batch {args.batch}, {threads} torch thread(s), median of {repeats} "
          f"interleaved rounds; speed-up vs {ref_name} ({runtimes[0]})")
    header = f"{'model':<32}{'params':>10}{'non-zero':>10}"
    header += "".join(f"{r + ' Mpx/s':>18}{'x':>7}" for r in runtimes) + f"{'model+ws':>10}"
    print(header)
    for name, row in results.items():
        line = f"{name:<32}{row['parameters']:>10}{row['nonzero_parameters']:>10}"
        for r in runtimes:
            v = row["runtimes"][r]
            line += f"{v['model_mpx_s']:>18.3f}{v['speedup_vs_reference']:>6.2f}x"
        line += f"{row.get('model_plus_watershed_mpx_s', float('nan')):>10.3f}"
        print(line)

    last = list(results)[-1]
    best_rt = {name: max(row["runtimes"], key=lambda r: row["runtimes"][r]["model_mpx_s"])
               for name, row in results.items()}
    text = (f"{last} : {ref_name} = {results[last]['runtimes'][runtimes[0]]['speedup_vs_reference']:.2f}x "
            f"({runtimes[0]}, {threads} thread(s), {size}^2)")
    if len(runtimes) > 1:
        fast = results[last]["runtimes"][best_rt[last]]
        ref_fast = results[ref_name]["runtimes"][best_rt[ref_name]]
        text += (f"; fastest runtimes: {last} {best_rt[last]} {fast['model_mpx_s']:.3f} Mpx/s, "
                 f"{ref_name} {best_rt[ref_name]} {ref_fast['model_mpx_s']:.3f} Mpx/s "
                 f"({fast['model_mpx_s'] / ref_fast['model_mpx_s']:.2f}x)")
    summary = {**info, "size": size, "batch": args.batch, "repeats": repeats, "threads": threads,
               "runtimes": runtimes, "reference": ref_name, "results": results,
               "best_runtime": best_rt}
    summary["headline"] = headline(text)
    summary["wall_s"] = time.perf_counter() - started
    write_json(args.json or default_json(NAME, args.quick), summary)
    return summary


if __name__ == "__main__":
    main()
