"""Augmentation ablation: the same fine-tune with each augmentation switched off in turn,
each run's watershed tuned on its validation slides, so that every augmentation is kept
only if it helps (issue 22: "each measured on validation by ablation").

    python -m models.ablation --data ../shared/data/monuseg/train:0.25 ../shared/data/tnbc/train:0.25 \\
        --init models/weights/candidates/pruned20x-v1.pt --steps 250 --out runs/ablation --threads 1 \\
        --done docs/results/ablation

One run per variant (``all`` = every default augmentation, then ``no-<group>`` for each
group of ``GROUPS``, then ``legacy``; ``--seed S`` runs replicates named ``<variant>@seedS``,
``--variants`` a subset),
in ``OUT/<variant>/`` (a ``wsi-nuclei train`` folder: resumable, checkpoints); a finished
variant has ``OUT/<variant>/result.json`` and is skipped when the command runs again, so
the ablation survives interruptions. ``--done DIR`` keeps a copy of each finished result as
``DIR/<variant>.json`` and skips the variants found there: with DIR in the repository (e.g.
``docs/results/ablation``), an ablation longer than one machine's life resumes on a new one.
``OUT/ablation.json`` gathers the results: the tuned validation AJI (each dataset weighing
the same, as ``wsi-nuclei tune``), per dataset the final proxy score of ``log.csv``, and
the difference to ``all``.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import sys
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from models.config import AugmentConfig, TargetConfig, TrainConfig

log = logging.getLogger(__name__)


# The augmentations issue 22 added, one group per item it lists; ``brightness`` (with a
# weaker ``stain``) is what the models before it were trained with, the ``legacy`` baseline.
GROUPS: dict[str, tuple[str, ...]] = {
    "stain": ("stain", "hue", "saturation"),  # stronger HED jitter, hue/saturation
    "scale": ("scale",),  # random rescale
    "optics": ("blur", "jpeg"),  # scanner blur, JPEG re-compression
    "deform": ("rotate", "shear"),  # affine deformation
}


def variants(names: list[str] | None = None, jitter: float = TrainConfig.color_jitter
             ) -> dict[str, AugmentConfig]:
    """``all``, one ``no-<group>`` per group in ``names`` (default: every group) with that
    group's fields back at the legacy augmentation's values, and ``legacy`` (all of them)."""
    base, legacy = AugmentConfig(), AugmentConfig.legacy(jitter)
    unknown = sorted(set(names or []) - set(GROUPS))
    if unknown:
        raise ValueError(f"unknown augmentation group(s) {', '.join(unknown)}; known: {', '.join(GROUPS)}")
    out = {"all": base}
    for group in names or GROUPS:
        out[f"no-{group}"] = replace(base, **{f: getattr(legacy, f) for f in GROUPS[group]})
    out["legacy"] = legacy
    return out


def run_variant(name: str, augment: AugmentConfig, args: argparse.Namespace) -> dict[str, Any]:
    """Train (or resume) one variant, tune its watershed, and record the result."""
    from models.checkpoints import load
    from models.train import train
    from models.tune import retune_checkpoint

    if args.seed:  # a replicate with another seed (the noise between runs) is its own variant
        name = f"{name}@seed{args.seed}"
    folder = Path(args.out) / name
    result_path = folder / "result.json"
    kept = Path(args.done) / f"{name}.json" if args.done else None
    for path in (kept, result_path):
        if path is not None and path.exists():
            result = json.loads(path.read_text())
            _keep(result, kept)
            return result
    start = load(args.init)
    cfg = TrainConfig(augment=augment, steps=args.steps, val_every=args.steps, lr=args.lr,
                      patch_size=args.patch_size, batch_size=args.batch_size,
                      downsample=args.downsample, checkpoint_every=50, threads=args.threads, seed=args.seed)
    resume = (folder / "last.pt").exists()
    train(args.data, folder, start.config, start.targets or TargetConfig(), cfg, resume=resume,
          init=None if resume else args.init)
    final = folder / "final.pt" if (folder / "final.pt").exists() else folder / "best.pt"
    _, params, record = retune_checkpoint(final, None, folder / "tuned.pt", progress=False)
    last = _last_row(folder / "log.csv")
    result = {"variant": name, "augment": asdict(augment), "tuned_val_aji": record["best_aji"],
              "watershed": params.to_dict(), "final_val_score": float(last["val_score"]),
              **{k: float(v) for k, v in last.items() if k.startswith("val_score_") and v}}
    result_path.write_text(json.dumps(result, indent=1))
    _keep(result, kept)
    return result


def _keep(result: dict[str, Any], path: Path | None) -> None:
    """Copy a finished variant's result to the ``--done`` folder (atomically)."""
    if path is None or path.exists():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(path)


def _last_row(path: Path) -> dict[str, str]:
    with path.open() as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise RuntimeError(f"{path}: no validation row (is --steps a multiple of the validation interval?)")
    return rows[-1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m models.ablation", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", nargs="+", required=True, help="annotated folders, FOLDER[:MPP]")
    parser.add_argument("--init", required=True, help="the checkpoint every variant starts from")
    parser.add_argument("--out", required=True, help="folder of the runs and ablation.json")
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--patch-size", type=int, default=TrainConfig.patch_size)
    parser.add_argument("--batch-size", type=int, default=TrainConfig.batch_size)
    parser.add_argument("--downsample", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--done", default=None,
                        help="folder of finished variants' results, read to skip them and written on finish")
    parser.add_argument("--only", nargs="*", default=None,
                        help=f"groups to ablate (default: all of {', '.join(GROUPS)})")
    parser.add_argument("--variants", nargs="*", default=None,
                        help="run only these variants (e.g. 'all legacy' with another --seed, for the noise)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    chosen = {k: v for k, v in variants(args.only).items() if args.variants is None or k in args.variants}
    if not chosen:
        parser.error(f"--variants {' '.join(args.variants or [])}: none of {', '.join(variants(args.only))}")
    results = [run_variant(name, augment, args) for name, augment in chosen.items()]
    base = results[0]["tuned_val_aji"]  # "all" comes first where it runs
    for r in results:
        r["delta_vs_all"] = r["tuned_val_aji"] - base
        log.info("%-16s tuned val AJI %.4f (%+.4f vs all)", r["variant"], r["tuned_val_aji"],
                 r["delta_vs_all"])
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "ablation.json").write_text(json.dumps(
        {"command": "python -m models.ablation " + " ".join(sys.argv[1:] if argv is None else argv),
         "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
