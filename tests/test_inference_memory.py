"""``retain_freed_memory``: glibc keeps freed activation maps for reuse, so repeated
forward passes stop page-faulting their working set (what makes eager CPU inference
~1.5x faster in ``bench.runtime_speed --malloc retain``). Workers call it on model load."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

CHILD = textwrap.dedent("""
    import resource, sys
    import numpy as np, torch
    torch.set_num_threads(1)
    from models.inference import predict_batch, retain_freed_memory
    from models.config import NetConfig
    from models.network import NucleusNet
    if sys.argv[1] == "retain":
        assert retain_freed_memory()
    net = NucleusNet(NetConfig(arch="dual", widths=(8, 16, 32), batchnorm=False, dropout=0.0)).eval()
    x = np.zeros((1, 1024, 1024, 3), np.uint8)
    predict_batch(net, x)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(3):
        predict_batch(net, x)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
""")


def _faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", CHILD, mode], capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_retained_memory_stops_page_faults_per_pass() -> None:
    default, retained = _faults("default"), _faults("retain")
    assert retained * 4 < default, (default, retained)


def test_workers_retain_freed_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline.cluster import plugin

    calls = []
    monkeypatch.setattr(plugin, "retain_freed_memory", lambda: calls.append(1) or True)
    plugin._load_in_process.cache_clear()  # an earlier test may have loaded it
    plugin._load_in_process("dense.pt", "cpu")
    plugin._load_in_process.cache_clear()
    assert calls
