"""The OpenVINO runtime beside a checkpoint: chosen only for its own weights, recorded in the
resume fingerprint, and exact: tiled slide inference equals whole-image inference with the
shipped INT8 model, as with torch."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from conftest import save_tiny_checkpoint, tiny_net

from models import checkpoints
from models.inference import predict_image
from models.quantize import make_openvino
from models.runtime import RUNTIME_ENV, CompiledNet, openvino_path
from models.watershed import postprocess
from pipeline.cluster.plugin import load_for_inference
from pipeline.run import process_slide
from pipeline.slide.memory import MemorySlide
from pipeline.slide.open import register_memory_slide
from pipeline.slide_run.config import RunConfig
from pipeline.slide_run.executors import SerialExecutor
from pipeline.synthetic import synthetic_he

pytest.importorskip("openvino")

MODEL = "pruned20x.pt"  # the shipped default, with its shipped INT8 OpenVINO model


def test_the_default_model_runs_on_its_int8_openvino_model() -> None:
    assert openvino_path(checkpoints.resolve(MODEL)).exists()
    net = load_for_inference(MODEL, "cpu").net
    assert isinstance(net, CompiledNet) and net.runtime == "openvino-int8"


def test_openvino_is_used_only_for_its_own_weights(tmp_path: Path, monkeypatch, caplog) -> None:
    ckpt = save_tiny_checkpoint(tmp_path / "tiny.pt")
    assert not isinstance(load_for_inference(ckpt, "cpu").net, CompiledNet)  # none beside it
    bundle = checkpoints.load(ckpt, fold_bn=True)
    make_openvino(ckpt, "fp32")
    loaded = load_for_inference(ckpt, "cpu")
    assert isinstance(loaded.net, CompiledNet) and loaded.net.runtime == "openvino-fp32"
    rgb = synthetic_he(96, 112, seed=3, mpp=0.5)[0]
    torch_out = predict_image(bundle.net, rgb)
    ov_out = predict_image(loaded.net, rgb)
    assert np.abs(torch_out[0] - ov_out[0]).max() < 1e-5  # FP32: the same network
    monkeypatch.setenv(RUNTIME_ENV, "torch")
    assert not isinstance(load_for_inference(ckpt, "cpu").net, CompiledNet)
    # weights retrained after the OpenVINO model was made: never used, and said why
    monkeypatch.delenv(RUNTIME_ENV)
    checkpoints.save(ckpt, tiny_net(seed=1), mpp=0.5, watershed=bundle.watershed, targets=bundle.targets)
    with caplog.at_level(logging.WARNING, logger="models.runtime"):
        assert not isinstance(load_for_inference(ckpt, "cpu").net, CompiledNet)
    assert "other weights" in caplog.text
    monkeypatch.setenv(RUNTIME_ENV, "openvino")
    with pytest.raises(ValueError, match="other weights"):
        load_for_inference(ckpt, "cpu")


@pytest.mark.slow
@pytest.mark.parametrize("tile", [128, 304])
def test_tiled_int8_pipeline_equals_whole_image(tmp_path: Path, tile: int) -> None:
    import zarr
    from test_run import _same_partition

    bundle = load_for_inference(MODEL, "cpu")
    assert isinstance(bundle.net, CompiledNet)
    rgb, _ = synthetic_he(400, 464, seed=11, mpp=0.5)
    whole = postprocess(*predict_image(bundle.net, rgb), bundle.watershed)
    path = register_memory_slide(MemorySlide(rgb, mpp=0.5, name=f"int8-{tile}"))
    cfg = RunConfig(model=MODEL, out=str(tmp_path), tile_size=tile, chunk=256, tissue_mask=False)
    outcome = process_slide(path, cfg, SerialExecutor())
    assert outcome.status == "done", outcome.error
    labels = zarr.open_group(str(Path(outcome.out_dir) / "nuclei.zarr"), mode="r")["labels/nuclei/s0"][...]
    assert whole.max() > 50
    _same_partition(labels.astype(np.int64), whole.astype(np.int64))
    assert outcome.nuclei == whole.max()
    summary = json.loads((Path(outcome.out_dir) / "summary.json").read_text())
    assert summary["fingerprint"]["slide"]["runtime"]["kind"] == "openvino-int8"  # never mixed


def test_evaluate_scores_the_network_slides_run(tmp_path: Path, synthetic_folder: Path, capsys) -> None:
    """``wsi-nuclei evaluate`` runs the OpenVINO model beside a checkpoint, as slides do,
    and says which runtime it scored."""
    from pipeline.cli import main

    ckpt = save_tiny_checkpoint(tmp_path / "tiny.pt")
    args = ["evaluate", "--model", str(ckpt), "--data", str(synthetic_folder), "--device", "cpu",
            "--mpp", "0.5"]
    assert main(args) == 0
    assert ", torch) on data" in capsys.readouterr().out
    make_openvino(ckpt, "fp32")
    assert main(args) == 0
    assert ", openvino-fp32) on data" in capsys.readouterr().out
