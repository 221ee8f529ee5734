"""A real single-node SLURM for the ``slurm`` tests, started by ../shared/hpc/slurm-up.sh.

Not a conftest (another module owns that): test modules import the fixture. Without the
script the tests are skipped with the reason; with the script but a failed start they are
skipped locally and FAIL on CI (``CI=true``), so a broken SLURM cannot pass CI silently.
SLURM jobs submitted by tests are tracked and cancelled by id at the end (``scancel``).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

log = logging.getLogger(__name__)

HPC_DIR = Path(__file__).resolve().parents[1] / ".." / "shared" / "hpc"
SLURM_UP_TIMEOUT_S = 900  # the first start may apt-get install slurm-wlm


@dataclass
class Slurm:
    """The running test SLURM: node, partition, and the jobs that tests submitted."""

    node: str
    cpus: int
    mem_mb: int
    partition: str = "debug"
    jobs: list[str] = field(default_factory=list)

    def track(self, job_id: str) -> str:
        """Remember a job id so that it is cancelled at the end of the session."""
        self.jobs.append(str(job_id).split(";")[0].strip())
        return self.jobs[-1]

    def queued(self, job_id: str) -> list[str]:
        """squeue lines (``id state name``) of a job, array tasks included; [] once gone."""
        out = subprocess.run(["squeue", "-h", "-j", str(job_id), "-o", "%i %T %j"],
                             capture_output=True, text=True, check=False)
        return out.stdout.split("\n") if out.returncode == 0 and out.stdout.strip() else []

    def jobs_named(self, name: str) -> list[str]:
        out = subprocess.run(["squeue", "-h", "-n", name, "-o", "%i"], capture_output=True,
                             text=True, check=True)
        return out.stdout.split()

    def wait_gone(self, job_id: str, timeout: float = 180) -> None:
        """Wait until a job (all its array tasks) left the queue."""
        deadline = time.monotonic() + timeout
        while self.queued(job_id):
            if time.monotonic() > deadline:
                raise TimeoutError(f"SLURM job {job_id} still queued after {timeout} s: "
                                   f"{self.queued(job_id)}")
            time.sleep(1)


def _fail_or_skip(message: str) -> None:
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="session", name="slurm")
def slurm_fixture() -> Iterator[Slurm]:
    """Start (idempotently) the single-node SLURM; cancel the tests' jobs afterwards."""
    script = (HPC_DIR / "slurm-up.sh").resolve()
    if not script.is_file():
        pytest.skip(f"no SLURM for tests: {script} not found")
    try:
        proc = subprocess.run(["bash", str(script)], capture_output=True, text=True,
                              timeout=SLURM_UP_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired:
        _fail_or_skip(f"{script} did not finish in {SLURM_UP_TIMEOUT_S} s")
        raise
    ready = re.search(r"slurm ready: (\S+) cpus=(\d+) mem=(\d+)", proc.stdout)
    if proc.returncode != 0 or not ready or not shutil.which("sbatch"):
        _fail_or_skip(f"{script} failed (exit {proc.returncode}):\n{proc.stdout[-2000:]}"
                      f"\n{proc.stderr[-3000:]}")
    assert ready is not None
    slurm = Slurm(node=ready[1], cpus=int(ready[2]), mem_mb=int(ready[3]))
    log.info("SLURM ready: %s", ready[0])
    try:
        yield slurm
    finally:
        leftovers = [job for job in slurm.jobs if slurm.queued(job)]
        if leftovers:
            subprocess.run(["scancel", *leftovers], check=False)
