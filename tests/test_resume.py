"""Resume never mixes settings: partial work is reused only when this run would make it
again, and a finished slide made otherwise says so when skipped."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from pipeline.fingerprint import differences, read_work_fingerprint, slide_fingerprint
from pipeline.run import process_slide
from pipeline.slide.memory import MemorySlide
from pipeline.slide.open import register_memory_slide
from pipeline.slide_run.config import WORK_DIR, RunConfig
from pipeline.slide_run.executors import SerialExecutor
from pipeline.synthetic import synthetic_he

MODEL = "pruned80.pt"


class Interrupted(BaseException):
    """Stands for a kill: not an ``Exception``, so process_slide does not catch it."""


@pytest.fixture(scope="module")
def slide() -> str:
    torch.set_num_threads(2)
    rgb, _ = synthetic_he(400, 460, seed=5, mpp=0.25)
    return register_memory_slide(MemorySlide(rgb, mpp=0.25, name="resume"))


def _cfg(out: Path, tile: int, **kw) -> RunConfig:
    return RunConfig(model=MODEL, out=str(out), tile_size=tile, chunk=256, tissue_mask=False, **kw)


def _interrupt_after(n: int):
    def progress(done: int, total: int) -> None:
        if done >= n:
            raise Interrupted
    return progress


def _labels(out_dir: str) -> np.ndarray:
    return zarr.open_group(str(Path(out_dir) / "nuclei.zarr"), mode="r")["labels/nuclei/s0"][...]


@pytest.mark.slow
def test_resume_with_other_tile_size_discards_partial_work(tmp_path: Path, slide: str, caplog) -> None:
    clean = process_slide(slide, _cfg(tmp_path / "clean", 256), SerialExecutor())
    assert clean.status == "done" and clean.nuclei > 30

    out = tmp_path / "resumed"
    with pytest.raises(Interrupted):
        process_slide(slide, _cfg(out, 128), SerialExecutor(), _interrupt_after(6))
    assert len(list((out / "resume" / WORK_DIR).glob("tile-*.npz"))) >= 6

    with caplog.at_level(logging.WARNING, logger="pipeline.slide_run.plan"):
        resumed = process_slide(slide, _cfg(out, 256), SerialExecutor())
    assert resumed.status == "done"
    assert resumed.counters["tiles_from_cache"] == 0
    assert "settings.tile_size" in caplog.text
    assert resumed.nuclei == clean.nuclei
    assert (_labels(resumed.out_dir) == _labels(clean.out_dir)).all()


@pytest.mark.slow
def test_resume_with_same_settings_reuses_partial_work(tmp_path: Path, slide: str) -> None:
    clean = process_slide(slide, _cfg(tmp_path / "clean", 256), SerialExecutor())
    out = tmp_path / "resumed"
    with pytest.raises(Interrupted):
        process_slide(slide, _cfg(out, 256), SerialExecutor(), _interrupt_after(2))
    assert read_work_fingerprint(out / "resume" / WORK_DIR)["settings"]["tile_size"] == 256

    resumed = process_slide(slide, _cfg(out, 256), SerialExecutor())
    assert resumed.status == "done" and resumed.counters["tiles_from_cache"] == 2
    assert resumed.nuclei == clean.nuclei
    assert (_labels(resumed.out_dir) == _labels(clean.out_dir)).all()


@pytest.mark.slow
def test_finished_slide_skipped_says_what_differs(tmp_path: Path, slide: str) -> None:
    first = process_slide(slide, _cfg(tmp_path, 256), SerialExecutor())
    same = process_slide(slide, _cfg(tmp_path, 256), SerialExecutor())
    assert same.skipped and same.note == ""

    other = process_slide(slide, _cfg(tmp_path, 512, cluster_margin=48), SerialExecutor())
    assert other.skipped and other.nuclei == first.nuclei
    assert "tile_size" in other.note and "cluster_margin" in other.note
    assert "--overwrite" in other.note

    redone = process_slide(slide, _cfg(tmp_path, 512, overwrite=True), SerialExecutor())
    assert not redone.skipped and redone.status == "done"


@pytest.mark.slow
def test_resume_with_stain_normalise_discards_tiles_made_without_it(tmp_path: Path, slide: str,
                                                                     caplog) -> None:
    clean = process_slide(slide, _cfg(tmp_path / "clean", 256, stain_normalise=True), SerialExecutor())
    out = tmp_path / "resumed"
    with pytest.raises(Interrupted):
        process_slide(slide, _cfg(out, 256), SerialExecutor(), _interrupt_after(2))
    assert "stain_normalise" not in read_work_fingerprint(out / "resume" / WORK_DIR)["settings"]

    with caplog.at_level(logging.WARNING, logger="pipeline.slide_run.plan"):
        resumed = process_slide(slide, _cfg(out, 256, stain_normalise=True), SerialExecutor())
    assert resumed.status == "done" and resumed.counters["tiles_from_cache"] == 0
    assert "settings.stain_normalise" in caplog.text
    assert (_labels(resumed.out_dir) == _labels(clean.out_dir)).all()
    skipped = process_slide(slide, _cfg(out, 256), SerialExecutor())
    assert skipped.skipped and "stain_normalise" in skipped.note


def test_differences_name_what_changed() -> None:
    old = {"settings": {"tile_size": 512, "watershed": {"fg": 0.5}}, "slide": {"halo": [1, 2]}}
    new = {"settings": {"tile_size": 1024, "watershed": {"fg": 0.5}}, "slide": {"halo": (1, 2)}}
    assert differences(old, new) == ["settings.tile_size"]
    assert differences(old, old) == []
    assert differences(None, new) == ["fingerprint missing"]
    new["settings"]["watershed"]["fg"] = 0.6
    new["slide"]["device"] = "cuda"
    assert differences(old, new) == ["settings.tile_size", "settings.watershed.fg", "slide.device"]


def test_slide_fingerprint_changes_when_the_file_is_replaced(tmp_path: Path) -> None:
    from types import SimpleNamespace

    plan = SimpleNamespace(plan=SimpleNamespace(level=0, scale=1.0, shape=(10, 10), mpp=0.25),
                           halo=96, margin=32, multiple=16, runtime={"kind": "cpu"})
    path = tmp_path / "slide.tif"
    path.write_bytes(b"one slide")
    first = slide_fingerprint(str(path), plan, 1)
    path.write_bytes(b"another slide, same name")
    assert "file.size" in differences(first, slide_fingerprint(str(path), plan, 1))


def test_batch_size_and_cuda_numerics_are_recorded_on_cuda_only() -> None:
    """The batch size changes no CPU output (measured: batches of 1, 2 and 4, torch and
    OpenVINO); on CUDA cuDNN picks algorithms by shape, and deterministic numerics are a
    setting of the worker."""
    from pipeline.fingerprint import _runtime_identity, run_runtime

    cuda = dict(_runtime_identity("cuda", None))
    assert cuda["cuda_deterministic"] is True and "int8_isa" not in cuda
    assert run_runtime(cuda, 4)["batch_size"] == 4
    assert "batch_size" not in run_runtime({"kind": "openvino-int8"}, 4)
    assert "batch_size" not in run_runtime({"kind": "cpu"}, 4)


OPENVINO_MODEL = "pruned20x.pt"  # shipped with its INT8 OpenVINO model


@pytest.fixture
def fresh_models():
    """Models loaded anew in this process (the runtime is chosen when a model loads), before
    and after the test, so that no other test gets a model loaded under its environment."""
    from pipeline.cluster.plugin import _load_in_process

    _load_in_process.cache_clear()
    yield
    _load_in_process.cache_clear()


def _use_runtime(monkeypatch, runtime: str) -> None:
    from models.runtime import RUNTIME_ENV
    from pipeline.cluster.plugin import _load_in_process

    monkeypatch.setenv(RUNTIME_ENV, runtime)
    _load_in_process.cache_clear()


def test_the_fingerprint_records_what_changes_outputs() -> None:
    from importlib.metadata import version

    from models.watershed import WatershedParams
    from pipeline.cluster import load_for_inference
    from pipeline.fingerprint import int8_isa, runtime_fingerprint, settings_fingerprint

    assert settings_fingerprint(_cfg(Path("x"), 256), "sha", WatershedParams())["package_version"] == \
        version("wsi-nuclei")
    on_torch = runtime_fingerprint(load_for_inference(MODEL, "cpu"))
    assert on_torch["kind"] == "cpu" and on_torch["torch"] == version("torch")
    assert "openvino" not in on_torch and "cuda_deterministic" not in on_torch
    # INT8 outputs depend on VNNI (measured with ONEDNN_MAX_CPU_ISA=AVX2 on a VNNI CPU:
    # probabilities up to 0.13 apart); the cap on the ISA counts too
    assert int8_isa({"avx2", "avx512_vnni"}, {}) == int8_isa({"avx2", "amx_int8"}, {}) == "vnni"
    assert int8_isa({"avx2", "avx512bw"}, {}) == "no-vnni"
    assert int8_isa({"avx2", "avx_vnni"}, {"ONEDNN_MAX_CPU_ISA": "AVX2"}) == "no-vnni"
    assert int8_isa({"avx2", "avx_vnni"}, {"ONEDNN_MAX_CPU_ISA": "AVX2_VNNI"}) == "vnni"
    pytest.importorskip("openvino")
    on_openvino = runtime_fingerprint(load_for_inference(OPENVINO_MODEL, "cpu"))
    assert on_openvino["kind"] == "openvino-int8" and on_openvino["openvino"] == version("openvino")
    assert len(on_openvino["openvino_model_sha256"]) == 64
    assert on_openvino["int8_isa"] in ("vnni", "no-vnni")


@pytest.mark.slow
def test_a_finished_slide_says_its_runtime_differs(tmp_path: Path, slide: str, monkeypatch,
                                                   fresh_models) -> None:
    """``WSI_NUCLEI_RUNTIME=torch`` on a slide finished by OpenVINO: skipped, but the note
    says the runtime differs, and from what to what (it said nothing)."""
    pytest.importorskip("openvino")
    cfg = RunConfig(model=OPENVINO_MODEL, out=str(tmp_path), tile_size=256, chunk=256,
                    tissue_mask=False)
    first = process_slide(slide, cfg, SerialExecutor())
    summary = json.loads((Path(first.out_dir) / "summary.json").read_text())
    assert summary["fingerprint"]["slide"]["runtime"]["kind"] == "openvino-int8"
    assert "openvino" in summary["versions"]
    assert process_slide(slide, cfg, SerialExecutor()).note == ""
    _use_runtime(monkeypatch, "torch")
    again = process_slide(slide, cfg, SerialExecutor())
    assert again.skipped and "runtime.kind" in again.note
    assert "openvino-int8 -> cpu" in again.note and "--overwrite" in again.note


@pytest.mark.slow
def test_a_worker_with_another_runtime_refuses_the_slides_tiles(tmp_path: Path, slide: str, monkeypatch,
                                                                fresh_models) -> None:
    """A cluster of mixed workers (here: planning on an OpenVINO worker, tiles on a torch
    one) must not stitch one slide from two runtimes' tiles: the tile tasks refuse, and
    the slide fails saying why."""
    pytest.importorskip("openvino")
    from pipeline.slide_run.tiles import infer_tiles

    class MixedWorkers(SerialExecutor):
        def map(self, fn, items):
            if getattr(fn, "fn", None) is infer_tiles:
                _use_runtime(monkeypatch, "torch")
            return super().map(fn, items)

    cfg = RunConfig(model=OPENVINO_MODEL, out=str(tmp_path), tile_size=256, chunk=256,
                    tissue_mask=False)
    outcome = process_slide(slide, cfg, MixedWorkers())
    assert outcome.status == "failed"
    assert "openvino-int8" in outcome.error and "cpu" in outcome.error
    assert not list((tmp_path / "resume" / WORK_DIR).glob("tile-*.npz"))
