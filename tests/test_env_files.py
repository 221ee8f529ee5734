"""conda-env.yml and pyproject.toml must list the same dependencies with the same bounds.

Compared: pyproject ``dependencies`` + the ``hpc`` and ``openvino`` extras (what a cluster node
needs: SLURM, and the CPU runtime of the default model) against
conda-env.yml's conda packages and its ``pip:`` section. Not compared: ``python``/``pip``
themselves and the project's own ``-e .`` line (checked separately).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import yaml  # a dependency of dask
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]

# PyPI name -> conda-forge name, where they differ (why: see the header of conda-env.yml)
PYPI_TO_CONDA = {
    "torch": "pytorch",
    "dask": "dask-core",  # conda-forge "dask" is the metapackage with bokeh, etc.
    "matplotlib": "matplotlib-base",  # the same library without a GUI toolkit
}
# PyPI packages that conda-forge does not have under any name: they go in the pip section
PIP_ONLY = {"openslide-bin"}
CONDA_SPEC = re.compile(r"^\s*([A-Za-z0-9_.\-]+)\s*(.*?)\s*$")
# the extras a cluster node needs: SLURM (hpc) and the CPU runtime of the default model
ENV_EXTRAS = ("hpc", "openvino")


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _pyproject_requirements() -> dict[str, Requirement]:
    project = _pyproject()["project"]
    extras = project["optional-dependencies"]
    reqs = [Requirement(r) for r in project["dependencies"] + [r for e in ENV_EXTRAS for r in extras[e]]]
    return {canonicalize_name(r.name): r for r in reqs}


def _conda_env() -> tuple[dict[str, str], dict[str, str], list[str]]:
    """(conda name -> spec, pip name -> spec, other pip lines)."""
    env = yaml.safe_load((ROOT / "conda-env.yml").read_text())
    conda, pip, other = {}, {}, []
    for entry in env["dependencies"]:
        if isinstance(entry, dict):
            for line in entry["pip"]:
                if line.startswith("-"):
                    other.append(line)
                else:
                    req = Requirement(line)
                    pip[canonicalize_name(req.name)] = str(req.specifier)
            continue
        name, spec = CONDA_SPEC.match(str(entry)).groups()
        conda[canonicalize_name(name)] = spec
    return conda, pip, other


def _same_bounds(a: str, b: str) -> bool:
    return set(SpecifierSet(a.replace(" ", ""))) == set(SpecifierSet(b.replace(" ", "")))


def test_every_pyproject_dependency_is_in_the_conda_env() -> None:
    conda, pip, _ = _conda_env()
    missing, drift = [], []
    for name, req in _pyproject_requirements().items():
        if name in PIP_ONLY:
            found = pip.get(name)
            where = "pip section"
        else:
            found = conda.get(canonicalize_name(PYPI_TO_CONDA.get(name, name)))
            where = f"conda package {PYPI_TO_CONDA.get(name, name)}"
        if found is None:
            missing.append(f"{req} (expected as {where})")
        elif not _same_bounds(found, str(req.specifier)):
            drift.append(f"{name}: pyproject {req.specifier} vs conda-env.yml {found}")
    assert not missing, f"in pyproject.toml but not in conda-env.yml: {missing}"
    assert not drift, f"version bounds differ: {drift}"


def test_every_conda_env_package_is_in_pyproject() -> None:
    conda, pip, _ = _conda_env()
    conda_to_pypi = {canonicalize_name(v): k for k, v in PYPI_TO_CONDA.items()}
    known = set(_pyproject_requirements())
    extra = [name for name in conda if name not in ("python", "pip")
             and conda_to_pypi.get(name, name) not in known]
    extra += [name for name in pip if name not in known]
    assert not extra, f"in conda-env.yml but not in pyproject.toml (dependencies + {ENV_EXTRAS}): {extra}"
    assert set(pip) <= PIP_ONLY, f"pip section should only hold what conda-forge lacks: {set(pip)}"


def test_conda_env_python_and_project_install() -> None:
    conda, _, other = _conda_env()
    python = conda["python"].lstrip("=")
    requires = SpecifierSet(_pyproject()["project"]["requires-python"])
    assert python in requires, f"python={python} does not satisfy requires-python {requires}"
    assert f"-e .[{','.join(ENV_EXTRAS)}]" in other, f"the env must install the project with {ENV_EXTRAS}"
    assert set(ENV_EXTRAS) <= set(_pyproject()["project"]["optional-dependencies"])


@pytest.mark.parametrize("name, expected", [("openslide_python", "openslide-python"),
                                            ("OpenSlide.Python", "openslide-python")])
def test_name_normalisation(name: str, expected: str) -> None:
    assert canonicalize_name(name) == expected
