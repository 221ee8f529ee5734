"""The ``wsi-nuclei`` command line: a thin layer that parses flags, configures logging,
calls the library and turns known errors into one clear line and a meaningful exit code.

Exit codes: 0 success, 1 some slides/images failed, 2 bad usage or input, 130 interrupted.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from typing import Any

from pipeline import __version__
from pipeline.cliutil import add_threads_argument, formatter
from pipeline.commands_export import add_export
from pipeline.commands_models import add_evaluate, add_tune
from pipeline.commands_prune import add_prune, add_prune_sweep
from pipeline.commands_run import add_demo, add_run
from pipeline.view import add_view

log = logging.getLogger("wsi_nuclei")

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


class UsageError(Exception):
    """Bad input from the user: reported as one line, exit code 2."""




def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train", formatter_class=formatter, help="train the two-branch network",
        description="Train the semantic + regression network on an annotated folder "
                    "(images/*.png, labels/*.tif).",
        epilog="examples:\n"
               "  wsi-nuclei train --data ../shared/data/monuseg/train --out runs/dense\n"
               "  wsi-nuclei train --out runs/dense --resume          # continue a run\n"
               "  wsi-nuclei train --data DIR --out runs/more --init dense.pt --lr 2e-4\n"
               "  wsi-nuclei train --data DIR --out runs/paper --arch paper   # the authors' U-Nets\n"
               "  wsi-nuclei train --data DIR --out runs/p80 --init slim80.pt --teacher dense.pt "
               "--lr 5e-4   # distil a pruned model")
    p.add_argument("--data", nargs="+", metavar="FOLDER[:MPP]",
                   help="annotated folder(s) with images/ and labels/, each optionally with the "
                        "µm/px of its images (default 0.25 = 40x); several folders are sampled "
                        "balanced per dataset and per slide, and each is split by slide "
                        "(name <slide>_<crop>) into training and validation")
    p.add_argument("--out", required=True, help="run folder (log.csv, last.pt, best.pt)")
    p.add_argument("--arch", choices=["paper", "dual"], default="dual")
    p.add_argument("--widths", default="16,32,64,128,256", help="filters per level")
    p.add_argument("--batchnorm", action=argparse.BooleanOptionalAction, default=None,
                   help="batch-norm after each conv (default: on for dual, off for paper)")
    p.add_argument("--dropout", type=float, default=None,
                   help="dropout between the two convs of a block (default: 0 for dual, "
                        "0.1 for paper, as the authors' U-Nets)")
    p.add_argument("--distance-norm", choices=["per_nucleus", "per_image"], default="per_nucleus")
    p.add_argument("--downsample", type=int, default=1,
                   help="train at 0.25 x N µm/px (2 = 20x / 0.5 µm/px from 40x data)")
    p.add_argument("--augment", choices=["full", "legacy"], default="full",
                   help="full: stain (HED), hue/saturation, brightness, rescale, rotation, shear, "
                        "blur and JPEG; legacy: HED and brightness jitter only (models before "
                        "multi-dataset training)")
    p.add_argument("--augment-off", default="", metavar="NAMES",
                   help="comma-separated augmentations to switch off, for ablations (fields of "
                        "models.config.AugmentConfig: stain, hue, saturation, brightness, scale, "
                        "rotate, shear, blur, jpeg)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (default 6000)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--patch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--val-every", type=int, default=500)
    p.add_argument("--checkpoint-every", type=int, default=250)
    add_threads_argument(p)
    p.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    p.add_argument("--init", default=None,
                   help="start from the weights of a model checkpoint (path or shipped name)")
    p.add_argument("--teacher", default=None,
                   help="distil from this checkpoint: training targets are blended with its "
                        "outputs (e.g. dense.pt when fine-tuning a pruned model)")
    p.add_argument("--distill", type=float, default=0.5,
                   help="weight of the teacher's outputs in the targets (with --teacher)")
    p.set_defaults(func=_run_train)


def _augment_config(preset: str, off: str) -> Any:
    """The AugmentConfig of ``--augment`` less the ``--augment-off`` names."""
    from dataclasses import fields, replace

    from models.config import AugmentConfig, TrainConfig

    base = AugmentConfig() if preset == "full" else AugmentConfig.legacy(TrainConfig.color_jitter)
    names = [n.strip() for n in off.split(",") if n.strip()]
    known = {f.name: f for f in fields(AugmentConfig)}
    unknown = sorted(set(names) - set(known))
    if unknown:
        raise UsageError(f"--augment-off: unknown augmentation(s) {', '.join(unknown)}; "
                         f"known: {', '.join(known)}")
    return replace(base, **{n: False if isinstance(getattr(base, n), bool) else 0.0 for n in names})


def _run_train(args: argparse.Namespace) -> int:
    from models.config import NetConfig, TargetConfig, TrainConfig
    from models.train import train

    if not args.resume and not args.data:
        raise UsageError("--data is required unless --resume is given")
    if not 0.0 <= args.distill <= 1.0:
        raise UsageError(f"--distill must be in [0, 1], not {args.distill}")
    net_cfg = NetConfig.for_arch(args.arch, tuple(int(w) for w in args.widths.split(",")),
                                 batchnorm=args.batchnorm, dropout=args.dropout)
    augment = _augment_config(args.augment, args.augment_off)
    cfg = TrainConfig(patch_size=args.patch_size, batch_size=args.batch_size, lr=args.lr, augment=augment,
                      seed=args.seed, val_every=args.val_every, downsample=args.downsample,
                      checkpoint_every=args.checkpoint_every, threads=args.threads,
                      teacher=args.teacher, distill=args.distill if args.teacher else 0.0)
    best = train(args.data, args.out, net_cfg, TargetConfig(args.distance_norm), cfg,
                 resume=args.resume, steps=args.steps, init=args.init)
    log.info("best checkpoint: %s", best)
    return EXIT_OK


COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [add_run, add_demo, _add_train, add_evaluate,
                                                                add_tune, add_prune, add_prune_sweep,
                                                                add_view, add_export]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="wsi-nuclei", formatter_class=formatter,
        description="Find every cell nucleus in H&E whole-slide images with a pruned "
                    "two-branch U-Net; outputs OME-Zarr labels, a nucleus table and "
                    "QuPath GeoJSON.",
        epilog="examples:\n"
               "  wsi-nuclei demo                                  # 1-minute demo\n"
               "  wsi-nuclei run slides/ --model pruned80.pt --out results/\n"
               "  wsi-nuclei evaluate --model dense.pt --data ../shared/data/monuseg/test")
    parser.add_argument("--version", action="version", version=f"wsi-nuclei {__version__}")
    parser.add_argument("--debug", action="store_true", help="full tracebacks, debug logs")
    parser.add_argument("--quiet", action="store_true", help="warnings and errors only")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.DEBUG if args.debug else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    if not args.debug:  # cluster chatter (scheduler/nanny start-up) is noise for users
        for name in ("distributed", "dask", "dask_jobqueue", "bokeh", "tornado"):
            logging.getLogger(name).setLevel(logging.WARNING)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USAGE
    try:
        return args.func(args)
    except KeyboardInterrupt:
        log.error("interrupted")
        return EXIT_INTERRUPTED
    except (UsageError, FileNotFoundError, ValueError) as exc:
        if args.debug:
            raise
        print(f"wsi-nuclei {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
