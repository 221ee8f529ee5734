"""Make the OpenVINO model that ``models.runtime`` runs beside a checkpoint: INT8 by static
post-training quantization (NNCF), calibrated on training images, or FP32.

    python -m models.quantize pruned20x.pt --calib ../shared/data/monuseg/train/images
    python -m models.quantize my.pt --precision fp32        # no calibration, no NNCF

INT8 uses NNCF's MIXED preset (symmetric weights, asymmetric activations: a closer fit for
ranges not centred on zero, such as an up-convolution concatenated with a ReLU skip) and its
full (layer-by-layer) bias correction, on random 256^2 patches of the calibration images
box-downsampled to the model's resolution. Measured on ``pruned20x.pt`` (256 patches of the
MoNuSeg training images): AJI -0.10 % on the MoNuSeg test set, 3.65x torch's speed
(``bench/results/runtime_speed_pruned20x.json``). The BN-folded network is converted, so
the result is what a worker would run with torch. Needs the ``[openvino]`` extra.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.runtime import PRECISION_KEY, SOURCE_KEY, openvino_path

CALIB_SIDE = 256
IMAGE_SUFFIXES = (".png", ".tif", ".tiff", ".jpg", ".jpeg")


def to_openvino(net: torch.nn.Module) -> Any:
    """``openvino.convert_model`` straight from torch; height, width and batch stay dynamic."""
    import openvino as ov

    m = net.config.size_multiple
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ov.convert_model(copy.deepcopy(net).eval(), example_input=torch.zeros(1, 3, 4 * m, 4 * m))


def calibration_patches(images: list[np.ndarray], n: int, side: int, seed: int = 0) -> list[np.ndarray]:
    """``n`` random ``side``^2 crops, the images taken in turn (shuffled), so that every
    image contributes."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(images))
    out = []
    for i in range(n):
        img = images[order[i % len(images)]]
        y = int(rng.integers(0, img.shape[0] - side + 1))
        x = int(rng.integers(0, img.shape[1] - side + 1))
        out.append(np.ascontiguousarray(img[y:y + side, x:x + side]))
    return out


def quantize_int8(model: Any, patches: list[np.ndarray], mixed: bool = True, fast_bc: bool = False) -> Any:
    """NNCF static PTQ of an OpenVINO model on uint8 HWC patches, fed as ``predict_batch``
    feeds the network (/255, NCHW). NNCF's progress bars go to stderr."""
    import nncf

    preset = nncf.QuantizationPreset.MIXED if mixed else None

    def transform(patch: np.ndarray) -> np.ndarray:
        return patch.transpose(2, 0, 1)[None].astype(np.float32) / np.float32(255.0)

    with contextlib.redirect_stdout(sys.stderr):
        return nncf.quantize(model, nncf.Dataset(patches, transform), subset_size=len(patches),
                             preset=preset, fast_bias_correction=fast_bc)


def load_calibration(folder: Path, mpp: float, native_mpp: float,
                     names: set[str] | None = None) -> list[np.ndarray]:
    """The images of a folder (or of its ``images/``), only ``names`` where given, brought
    to the model's resolution."""
    from PIL import Image

    from models.data import downsample_image
    from models.evaluate import resolution_factor

    if (folder / "images").is_dir():
        folder = folder / "images"
    factor = resolution_factor(mpp, native_mpp)
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES
                   and (names is None or p.stem in names))
    if not files:
        raise SystemExit(f"{folder}: no calibration images")
    return [downsample_image(np.asarray(Image.open(p).convert("RGB")), factor) for p in files]


def balanced_patches(image_sets: list[list[np.ndarray]], n: int, side: int) -> list[np.ndarray]:
    """``n`` patches shared equally between the datasets (each dataset's images in turn)."""
    out: list[np.ndarray] = []
    for k, images in enumerate(image_sets):
        share = n // len(image_sets) + (1 if k < n % len(image_sets) else 0)
        out += calibration_patches(images, share, side, seed=k)
    return out


def training_names(provenance: dict[str, Any], folder: Path) -> set[str] | None:
    """The training images the checkpoint records for ``folder`` (calibration never sees
    its validation slides), or None where it records none."""
    for record in provenance.get("datasets") or []:
        recorded = Path(record["folder"]).resolve()
        if recorded in (folder.resolve(), folder.resolve().parent):
            return set(record["train_images"])
    return None


def make_openvino(checkpoint: str | Path, precision: str = "int8",
                  calib: Path | list[Any] | None = None, patches: int = 256, native_mpp: float = 0.25,
                  out: Path | None = None) -> Path:
    """Write the checkpoint's OpenVINO model (``models.runtime.openvino_path``) and return it."""
    import openvino as ov

    from models.checkpoints import load

    bundle = load(checkpoint, "cpu", fold_bn=True)
    model = to_openvino(bundle.net)
    if precision == "int8":
        if not calib:
            raise SystemExit("--calib FOLDER (training images) is needed for int8")
        from models.datasets import DatasetSpec, parse_dataset

        specs = [c if isinstance(c, DatasetSpec) else parse_dataset(str(c), native_mpp)
                 for c in (calib if isinstance(calib, list) else [calib])]
        sets = [load_calibration(s.folder, bundle.mpp, s.mpp, training_names(bundle.provenance, s.folder))
                for s in specs]
        model = quantize_int8(model, balanced_patches(sets, patches, CALIB_SIDE))
    model.set_rt_info(bundle.sha256, SOURCE_KEY)
    model.set_rt_info(precision, PRECISION_KEY)
    assert bundle.path is not None
    path = out or openvino_path(bundle.path)
    ov.save_model(model, path, compress_to_fp16=False)
    return path


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m models.quantize", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="checkpoint (path or shipped name)")
    p.add_argument("--precision", choices=("int8", "fp32"), default="int8")
    p.add_argument("--calib", nargs="+", default=None, metavar="FOLDER[:MPP]",
                   help="calibration images (training folders, or their images/); several "
                        "share the patches equally; a model trained on several datasets is "
                        "calibrated on their training slides only")
    p.add_argument("--calib-mpp", type=float, default=0.25,
                   help="µm/px of calibration folders named without one")
    p.add_argument("--patches", type=int, default=256, help="calibration patches (256^2)")
    p.add_argument("--out", type=Path, default=None, help="default: beside the checkpoint")
    args = p.parse_args(argv)
    path = make_openvino(args.model, args.precision, args.calib, args.patches, args.calib_mpp, args.out)
    print(f"wrote {path} and {path.with_suffix('.bin').name}")


if __name__ == "__main__":
    main()
