"""``wsi-nuclei prune`` and ``wsi-nuclei prune-sweep``: thin wrappers around
:mod:`models.pruning` (parsing, logging, saving).

Does not import :mod:`pipeline.cli` (which imports this module to register the parsers);
bad input is reported by raising ``ValueError`` / ``FileNotFoundError``, which the CLI
turns into one line and exit code 2.
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

from pipeline.cliutil import add_threads_argument, formatter, set_torch_threads

log = logging.getLogger("wsi_nuclei")

METHOD_CHOICES = ("layerwise", "global", "structured")
BRANCH_CHOICES = ("both", "semantic", "regression")




def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of numbers: {text!r}") from exc


def _keep(text: str) -> str | tuple[float, ...]:
    """A keep-schedule preset name or per-level factors."""
    from models.pruning import KEEP_PRESETS

    if text in KEEP_PRESETS:
        return text
    try:
        return _floats(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f"one of {', '.join(KEEP_PRESETS)} or per-level factors, not {text!r}") from None


def _names(allowed: tuple[str, ...]):
    def parse(text: str) -> tuple[str, ...]:
        names = tuple(v.strip() for v in text.split(",") if v.strip())
        bad = [n for n in names if n not in allowed]
        if bad or not names:
            raise argparse.ArgumentTypeError(f"choose from {', '.join(allowed)} (got {text!r})")
        return names
    return parse


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="dense checkpoint (path or shipped name)")
    p.add_argument("--finetune-steps", type=int, default=0,
                   help="masked fine-tuning steps after pruning (0 = one-shot)")
    p.add_argument("--lr", type=float, default=1e-4, help="fine-tuning learning rate")
    p.add_argument("--batch-size", type=int, default=None,
                   help="fine-tuning batch (default: the dense model's)")
    p.add_argument("--patch-size", type=int, default=None,
                   help="fine-tuning patch size (default: the dense model's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--keep", type=_keep, default=None,
                   help="structured: where to cut, as a per-level relative keep schedule: "
                        "uniform (default), thin-top (thinner high-resolution levels: "
                        "fewest MACs, fastest), thin-deep (thinner deep levels: most MACs), "
                        "or factors from the top level down, e.g. 1,1,1,0.7,0.5"),
    p.add_argument("--bn-recalibrate", type=int, default=0, metavar="BATCHES",
                   help="after pruning, re-estimate the BatchNorm statistics on this many "
                        "training batches (no weight changes; 0 = off)")
    p.add_argument("--distill", type=float, default=0.0,
                   help="fine-tuning: weight of the dense model's outputs in the targets "
                        "(knowledge distillation; 0 = ground truth only)")
    add_threads_argument(p)


def add_prune(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "prune", formatter_class=formatter, help="prune a model (magnitude or structured)",
        description="Prune a checkpoint: unstructured magnitude pruning per layer "
                    "('layerwise') or with one network-wide threshold ('global'), or "
                    "structured filter pruning into a physically smaller, faster network "
                    "('structured'; --ratio is then the fraction of parameters removed). "
                    "Optionally fine-tune with the pruning masks fixed on the dense "
                    "model's training images. Resolution, watershed parameters and targets "
                    "are kept; the provenance records how the model was pruned.",
        epilog="examples:\n"
               "  wsi-nuclei prune --model dense.pt --method global --ratio 0.8 --out pruned80.pt\n"
               "  wsi-nuclei prune --model dense.pt --method structured --ratio 0.8 "
               "--finetune-steps 500 --data ../shared/data/monuseg/train --out slim80.pt\n"
               "  wsi-nuclei prune --model dense.pt --method structured --ratio 0.8 "
               "--keep thin-top --out fast80.pt\n"
               "  wsi-nuclei prune --model dense.pt --method layerwise --ratio 0.9 "
               "--branch semantic --out sem90.pt")
    _common(p)
    p.add_argument("--method", choices=METHOD_CHOICES, required=True)
    p.add_argument("--ratio", type=float, required=True,
                   help="fraction of prunable weights (structured: parameters) to remove")
    p.add_argument("--branch", choices=BRANCH_CHOICES, default="both")
    p.add_argument("--data", help="training folder of the dense model (for --finetune-steps)")
    p.add_argument("--out", required=True, help="pruned checkpoint to write")
    p.add_argument("--half", action="store_true",
                   help="store the weights as float16 (how shipped models are stored)")
    p.set_defaults(func=_run_prune)


def add_prune_sweep(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "prune-sweep", formatter_class=formatter, help="score pruned copies over a ratio grid",
        description="For every method, branch and ratio prune a copy of the dense model "
                    "one-shot (optionally fine-tune), score it on an annotated test folder "
                    "with the dense model's watershed parameters held fixed, and append a "
                    "row to OUT/sweep.csv (rows already there are skipped: re-running "
                    "resumes). Plots OUT/sweep.png.",
        epilog="examples:\n"
               "  wsi-nuclei prune-sweep --model dense.pt --data ../shared/data/monuseg/test "
               "--out sweep/\n"
               "  wsi-nuclei prune-sweep --model dense.pt --data TEST --out sweep_ft/ "
               "--finetune-steps 300 --train-data ../shared/data/monuseg/train")
    _common(p)
    p.add_argument("--data", required=True, help="annotated TEST folder")
    p.add_argument("--out", required=True, help="output folder (sweep.csv, sweep.png)")
    p.add_argument("--ratios", type=_floats,
                   default=(0.0, 0.5, 0.75, 0.8, 0.875, 0.9, 0.9375, 0.95, 0.975, 0.99))
    p.add_argument("--methods", type=_names(METHOD_CHOICES), default=("layerwise", "global"))
    p.add_argument("--branches", type=_names(BRANCH_CHOICES),
                   default=("semantic", "regression", "both"))
    p.add_argument("--train-data", help="training folder of the dense model (fine-tuning)")
    p.set_defaults(func=_run_sweep)


def _load(args: argparse.Namespace) -> Any:
    from models import checkpoints

    set_torch_threads(args.threads)
    return checkpoints.load(args.model)


def _prune_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return {"keep": args.keep, "lr": args.lr, "batch_size": args.batch_size,
            "patch_size": args.patch_size, "seed": args.seed, "distill": args.distill,
            "bn_batches": args.bn_recalibrate}


def _run_prune(args: argparse.Namespace) -> int:
    from models import checkpoints
    from models.pruning import prune_bundle

    if (args.finetune_steps > 0 or args.bn_recalibrate > 0) and not args.data:
        raise ValueError("--finetune-steps and --bn-recalibrate need --data (the dense model's "
                         "training folder)")
    if not 0.0 <= args.distill <= 1.0:
        raise ValueError(f"--distill must be in [0, 1], not {args.distill}")
    dense = _load(args)
    pruned = prune_bundle(dense, args.method, args.ratio, branch=args.branch,
                          finetune_steps=args.finetune_steps, data=args.data,
                          progress=not args.quiet, **_prune_kwargs(args))
    path = checkpoints.save(args.out, pruned.net, mpp=pruned.mpp, watershed=pruned.watershed,
                            targets=pruned.targets, provenance=pruned.provenance, half=args.half)
    record = pruned.provenance["pruning"]
    log.info("wrote %s: %s %s ratio %g, parameters %d -> %d, non-zero %d -> %d, "
             "GMAC per 512x512 tile %.2f -> %.2f",
             path, args.method, args.branch, args.ratio, record["parameters_before"],
             record["parameters_after"], record["nonzero_before"], record["nonzero_after"],
             record["macs_512_before"] / 1e9, record["macs_512_after"] / 1e9)
    return 0


def _run_sweep(args: argparse.Namespace) -> int:
    from models.pruning import sweep

    if (args.finetune_steps > 0 or args.bn_recalibrate > 0) and not args.train_data:
        raise ValueError("--finetune-steps and --bn-recalibrate need --train-data (the dense "
                         "model's training folder)")
    dense = _load(args)
    csv_path = sweep(dense, args.data, args.out, ratios=args.ratios, methods=args.methods,
                     branches=args.branches, finetune_steps=args.finetune_steps,
                     train_data=args.train_data, progress=not args.quiet, **_prune_kwargs(args))
    log.info("sweep table %s, plot %s", csv_path, csv_path.with_suffix(".png"))
    return 0
