"""Pruning a checkpoint (one method, ratio, branch) and the sparsity sweep of the paper.

The sweep prunes a fresh copy of the dense network one-shot for every (method, branch,
ratio), optionally fine-tunes it, scores it on a test folder with the dense checkpoint's
watershed parameters **held fixed** (so that post-processing cannot hide or compensate a
loss), and appends one row per setting to ``sweep.csv``. Rows already in the file are
skipped, so an interrupted sweep resumes where it stopped. ``sweep.png`` plots
semantic Dice (semantic branch pruned), regression MSE (regression branch pruned) and
AJI / PQ / Dice (both pruned) against sparsity, one line per method.

The evaluator is a parameter (``Evaluator``) so that tests can run the bookkeeping with a
fake and so that other scorers can be plugged in. Ratio 0 is the dense network for every
method and branch, so it is scored once and reused.
"""

from __future__ import annotations

import copy
import csv
import logging
import math
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tqdm import tqdm

from models.checkpoints import ModelBundle
from models.config import WatershedParams
from models.data import load_training_items
from models.evaluate import predict_folder, resolution_factor, score_predictions
from models.network import NucleusNet, count_parameters
from models.pruning.finetune import finetune, recalibrate_batchnorm
from models.pruning.structured import Keep, conv_macs, keep_schedule, structured_prune
from models.pruning.unstructured import BRANCHES, apply_masks, magnitude_masks, sparsity_report

log = logging.getLogger(__name__)

METHODS = ("layerwise", "global", "structured")
DEFAULT_RATIOS = (0.0, 0.5, 0.75, 0.8, 0.875, 0.9, 0.9375, 0.95, 0.975, 0.99)
SCORE_COLUMNS = ("dice", "aji", "pq", "f1", "semantic_dice", "regression_mse")
CSV_COLUMNS = ("method", "branch", "ratio", "finetune_steps", "sparsity", "parameters",
               "nonzero", "gmacs_512", *SCORE_COLUMNS, "seconds")
MAC_SIZE = 512  # MACs are reported for one 512 x 512 model-resolution tile

Evaluator = Callable[[ModelBundle, Path, WatershedParams], dict[str, Any]]


def default_evaluator(bundle: ModelBundle, folder: Path, watershed: WatershedParams) -> dict[str, Any]:
    """Network once per test image, then the fixed watershed and all scores."""
    return score_predictions(predict_folder(bundle, folder, progress=False), watershed)


def _counts(net: NucleusNet, branch: str) -> dict[str, int]:
    report = sparsity_report(net, branch)
    return {"parameters": report["parameters"], "nonzero": report["nonzero_parameters"],
            "prunable_weights": report["prunable_weights"],
            "prunable_nonzero": report["prunable_nonzero"]}


def _train_names(bundle: ModelBundle, data: Path) -> list[str] | None:
    """The dense model's training images; without a record, all images of the folder
    except its validation images (with a warning)."""
    names = list(bundle.provenance.get("train_images") or [])
    if names:
        return names
    from models.data import list_pairs

    val = set(bundle.provenance.get("val_images") or [])
    names = [img.stem for img, _ in list_pairs(data) if img.stem not in val]
    log.warning("checkpoint records no training images: fine-tuning on %d image(s) of %s "
                "that are not its validation images", len(names), data)
    return names


def prune_bundle(bundle: ModelBundle, method: str, ratio: float, *, branch: str = "both",
                 finetune_steps: int = 0, data: str | Path | None = None,
                 keep: Keep = None, lr: float = 1e-4,
                 batch_size: int | None = None, patch_size: int | None = None, seed: int = 0,
                 distill: float = 0.0, bn_batches: int = 0, progress: bool = True) -> ModelBundle:
    """A pruned copy of ``bundle`` (same mpp, watershed, targets) whose provenance records
    how it was made. ``bundle`` itself is left untouched. ``bn_batches`` > 0 re-estimates
    the BatchNorm statistics on that many training batches after pruning (no weight
    changes; see :func:`recalibrate_batchnorm`)."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, not {method!r}")
    if branch not in BRANCHES:
        raise ValueError(f"branch must be one of {', '.join(BRANCHES)}, not {branch!r}")
    if (finetune_steps > 0 or bn_batches > 0) and data is None:
        raise ValueError("fine-tuning and BatchNorm re-estimation need the training data folder")
    dense = bundle.net
    before = _counts(dense, branch)
    masks = None
    if method == "structured":
        net = structured_prune(dense, ratio, keep=keep, branch=branch).eval()
    else:
        net = copy.deepcopy(dense).eval()
        masks = magnitude_masks(net, method, ratio, branch)
        apply_masks(net, masks)
    tuned: dict[str, float] = {}
    train_cfg = bundle.provenance.get("train_config") or {}
    batch = batch_size or int(train_cfg.get("batch_size", 8))
    patch = patch_size or int(train_cfg.get("patch_size", 256))
    bn_layers = 0
    if bn_batches > 0 or finetune_steps > 0:  # the training images, loaded once for both
        items = load_training_items(data, _train_names(bundle, Path(data)),
                                    resolution_factor(bundle.mpp), bundle.targets.distance_norm)
    if bn_batches > 0:
        bn_layers = recalibrate_batchnorm(net, items, bn_batches, patch_size=patch,
                                          batch_size=batch, seed=seed)
    if finetune_steps > 0:
        tuned = finetune(net, data, finetune_steps, masks=masks, lr=lr, batch_size=batch,
                         patch_size=patch, seed=seed, items=items,
                         teacher=dense if distill > 0 else None, distill=distill,
                         progress=progress)
    after = _counts(net, branch)
    record = {
        "method": method, "ratio": float(ratio), "branch": branch,
        "keep_schedule": (list(keep_schedule(keep, dense.config.depth))
                          if method == "structured" else None),
        "keep_preset": _preset_name(keep) if method == "structured" else None,
        "parameters_before": before["parameters"], "parameters_after": after["parameters"],
        "nonzero_before": before["nonzero"], "nonzero_after": after["nonzero"],
        "scope_parameters_before": sum(count_parameters(m) for m in dense.branch_modules(branch)),
        "scope_parameters_after": sum(count_parameters(m) for m in net.branch_modules(branch)),
        "prunable_weights": after["prunable_weights"], "prunable_nonzero": after["prunable_nonzero"],
        "heads_pruned": False,
        # dense kernels compute zeros too: only structured pruning lowers the MACs
        "macs_512_before": conv_macs(dense, MAC_SIZE, MAC_SIZE),
        "macs_512_after": conv_macs(net, MAC_SIZE, MAC_SIZE),
        "finetune_steps": int(finetune_steps),
        "finetune_data": str(Path(data).resolve()) if finetune_steps > 0 else None,
        "finetune_lr": lr if finetune_steps > 0 else None,
        "finetune_seed": seed if finetune_steps > 0 else None,
        "finetune_distill": distill if finetune_steps > 0 else None,
        "bn_recalibration_batches": int(bn_batches) if bn_layers else 0,
        "finetune_final_losses": tuned,
        "source_model": str(bundle.path) if bundle.path else None,
        "source_sha256": bundle.sha256,
    }
    log.info("pruned %s %s %.4f: parameters %d -> %d, non-zero %d -> %d", method, branch, ratio,
             before["parameters"], after["parameters"], before["nonzero"], after["nonzero"])
    return ModelBundle(net=net, mpp=bundle.mpp, watershed=bundle.watershed,
                       targets=bundle.targets,
                       provenance={**bundle.provenance, "pruning": record}, metrics={})


def _preset_name(keep: Keep) -> str:
    if keep is None:
        return "uniform"
    return keep if isinstance(keep, str) else "custom"


def method_label(method: str, keep: Keep = None, bn_batches: int = 0, distill: float = 0.0) -> str:
    """The sweep's name of a method: structured runs with a non-uniform keep schedule get
    it appended (``structured[thin-top]``), BatchNorm re-estimation ``+bn`` and distilled
    fine-tuning ``+kd``, so that they are separate rows and lines."""
    label = method
    if method == "structured" and _preset_name(keep) != "uniform":
        label = (f"structured[{keep}]" if isinstance(keep, str)
                 else "structured[" + ",".join(f"{float(k):g}" for k in keep) + "]")
    if bn_batches > 0:
        label += "+bn"
    if distill > 0:
        label += "+kd"
    return label


def _key(method: str, branch: str, ratio: float, steps: int) -> tuple[str, str, str, int]:
    return method, branch, f"{float(ratio):g}", int(steps)


def read_rows(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def sweep(bundle: ModelBundle, data: str | Path, out: str | Path, *,
          ratios: Sequence[float] = DEFAULT_RATIOS, methods: Sequence[str] = ("layerwise", "global"),
          branches: Sequence[str] = ("semantic", "regression", "both"), finetune_steps: int = 0,
          train_data: str | Path | None = None, evaluator: Evaluator = default_evaluator,
          progress: bool = True, **prune_kwargs: Any) -> Path:
    """Run (or resume) the sweep into ``out/sweep.csv`` and plot ``out/sweep.png``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    csv_path = out / "sweep.csv"
    done = {_key(r["method"], r["branch"], float(r["ratio"]), int(r["finetune_steps"]))
            for r in read_rows(csv_path)}
    watershed = bundle.watershed  # fixed: tuned once on the dense model's validation images
    keep = prune_kwargs.get("keep")
    label_options = {"bn_batches": int(prune_kwargs.get("bn_batches") or 0),
                     "distill": float(prune_kwargs.get("distill") or 0.0) if finetune_steps > 0 else 0.0}
    todo = [(m, b, r) for m in methods for b in branches for r in ratios
            if _key(method_label(m, keep, **label_options), b, r, finetune_steps) not in done]
    log.info("sweep: %d setting(s) to run, %d already in %s", len(todo), len(done), csv_path)
    dense_scores: dict[str, Any] | None = None
    new_file = not csv_path.exists() or csv_path.stat().st_size == 0
    columns: Sequence[str] = CSV_COLUMNS
    if not new_file:  # keep appending in the layout the file was started with
        with open(csv_path, newline="") as f:
            columns = next(csv.reader(f))
    with open(csv_path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        if new_file:
            writer.writeheader()
            f.flush()
        for method, branch, ratio in tqdm(todo, desc="sweep", unit="model", disable=not progress,
                                          file=sys.stderr):
            started = time.time()
            if ratio == 0 and finetune_steps == 0 and not label_options["bn_batches"]:
                pruned = bundle
                if dense_scores is None:
                    dense_scores = evaluator(bundle, Path(data), watershed)
                scores = dense_scores
            else:
                try:
                    pruned = prune_bundle(bundle, method, ratio, branch=branch,
                                          finetune_steps=finetune_steps, data=train_data,
                                          progress=False, **prune_kwargs)
                except ValueError as exc:  # e.g. structured pruning beyond 2 channels/conv
                    log.warning("skipping %s %s %g: %s", method, branch, ratio, exc)
                    continue
                scores = evaluator(pruned, Path(data), watershed)
            counts = sparsity_report(pruned.net, branch)
            if method == "structured":
                dense_scope = sum(count_parameters(m) for m in bundle.net.branch_modules(branch))
                scope = sum(count_parameters(m) for m in pruned.net.branch_modules(branch))
                sparsity = 1.0 - scope / dense_scope
            else:
                sparsity = counts["prunable_sparsity"]
            row = {"method": method_label(method, keep, **label_options), "branch": branch,
                   "ratio": f"{float(ratio):g}",
                   "finetune_steps": int(finetune_steps), "sparsity": round(sparsity, 6),
                   "parameters": counts["parameters"], "nonzero": counts["nonzero_parameters"],
                   "gmacs_512": round(conv_macs(pruned.net, MAC_SIZE, MAC_SIZE) / 1e9, 4),
                   **{k: scores.get(k, math.nan) for k in SCORE_COLUMNS},
                   "seconds": round(time.time() - started, 2)}
            writer.writerow(row)
            f.flush()
            log.info("sweep row: %s", row)
    plot_sweep(csv_path, out / "sweep.png")
    (out / "sweep.md").write_text(summarize_sweep(read_rows(csv_path)))
    return csv_path


# (branch pruned, metric, higher is better) for the paper's three targets
TARGETS = (("semantic", "semantic_dice", True), ("regression", "regression_mse", False),
           ("both", "aji", True))
MAX_LOSS = 0.02  # the paper's "< 2 % reduction", relative to the dense model


def tolerated_ratio(rows: list[dict[str, Any]], metric: str, higher_is_better: bool,
                    max_loss: float = MAX_LOSS) -> float | None:
    """The largest ratio up to which every pruned setting of one series (one method,
    branch and fine-tune setting) stays within ``max_loss`` relative loss of its ratio-0
    row; None without a ratio-0 row. Scanning stops at the first failure, so a lucky
    point beyond a collapse does not count."""
    by_ratio = sorted(rows, key=lambda r: float(r["ratio"]))
    if not by_ratio or float(by_ratio[0]["ratio"]) != 0.0:
        return None
    dense = float(by_ratio[0][metric])
    best = 0.0
    for r in by_ratio[1:]:
        value = float(r[metric])
        loss = (dense - value) / dense if higher_is_better else (value - dense) / dense
        if not loss < max_loss:
            break
        best = float(r["ratio"])
    return best


def summarize_sweep(rows: list[dict[str, Any]]) -> str:
    """Markdown: per target and method, the metric at every ratio and the largest ratio
    within 2 % of dense (the paper's headline figures are 93.75 % semantic, 95 %
    regression, 80 % instance, layer-wise)."""
    series: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for r in rows:
        series.setdefault((r["branch"], r["method"], str(r["finetune_steps"])), []).append(r)
    ratios = sorted({float(r["ratio"]) for r in rows})
    lines = ["# Pruning sweep", "",
             f"Largest pruning ratio within {100 * MAX_LOSS:g} % (relative) of the dense model, "
             "and the metric at each ratio.", ""]
    for branch, metric, higher in TARGETS:
        keys = sorted(k for k in series if k[0] == branch)
        if not keys:
            continue
        lines += [f"## {metric} ({branch} pruned; {'higher' if higher else 'lower'} is better)", "",
                  "| method | fine-tune steps | within 2 % up to | "
                  + " | ".join(f"{100 * r:g} %" for r in ratios) + " |",
                  "|---|---|---|" + "---|" * len(ratios)]
        for key in keys:
            values = {float(r["ratio"]): float(r[metric]) for r in series[key]}
            tol = tolerated_ratio(series[key], metric, higher)
            cells = [f"{values[r]:.4f}" if r in values else "" for r in ratios]
            tol_text = "n/a" if tol is None else f"{100 * tol:g} %"
            lines.append(f"| {key[1]} | {key[2]} | {tol_text} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


PANELS = (("semantic", ("semantic_dice",), "semantic Dice (semantic branch pruned)"),
          ("regression", ("regression_mse",), "regression MSE (regression branch pruned)"),
          ("both", ("aji", "pq", "dice"), "instance scores (both branches pruned)"))


def plot_sweep(csv_path: str | Path, png_path: str | Path) -> Path:
    """Three panels of score vs. sparsity, one line per method (and fine-tune setting)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_rows(Path(csv_path))
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    styles = {"aji": "-", "pq": "--", "dice": ":", "semantic_dice": "-", "regression_mse": "-"}
    for ax, (branch, metrics, title) in zip(axes, PANELS):
        series: dict[tuple[str, str], list[dict[str, Any]]] = {}
        for r in rows:
            if r["branch"] == branch:
                series.setdefault((r["method"], r["finetune_steps"]), []).append(r)
        for k, ((method, steps), items) in enumerate(sorted(series.items())):
            items.sort(key=lambda r: float(r["sparsity"]))
            label = method if int(steps) == 0 else f"{method} +ft{steps}"
            # compression ratio, as the paper counts: 1 / (1 - sparsity), log axis
            crs = [1.0 / max(1.0 - float(r["sparsity"]), 1e-3) for r in items]
            for metric in metrics:  # one colour per series, one line style per metric
                ax.plot(crs, [float(r[metric]) for r in items], styles[metric], color=f"C{k % 10}",
                        marker="o", ms=3, label=label if len(metrics) == 1 else f"{label} {metric}")
        ax.set_title(title, fontsize=10)
        ax.set_xscale("log")
        ticks = [1, 2, 5, 10, 20, 50, 100]
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.minorticks_off()
        ax.set_xlabel("compression ratio 1 / (1 - sparsity) of prunable weights")
        ax.grid(alpha=0.3)
        if series:
            ax.legend(fontsize=7)
    fig.tight_layout()
    png_path = Path(png_path)
    fig.savefig(png_path, dpi=120)
    plt.close(fig)
    return png_path
