"""A normal install works: the wheel built from this checkout ships the sweep files, and an
installed uspsjax lists them and runs a sweep from any working directory.

The wheel goes into a fresh virtual environment. Nothing is downloaded: the wheel is built
without build isolation, and the new environment reaches the dependencies (jax, flax, ...)
through a `.pth` file naming this test's own site-packages, which comes after the new
environment's own, so `uspsjax` itself is imported from the wheel and never from the checkout.
"""

import os
import shlex
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import numpy as np
import pytest

from uspsjax import results

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = sorted(p.stem for p in (ROOT / "sweeps").glob("*.toml"))


def run(argv, **kwargs) -> subprocess.CompletedProcess:
    """Run a command, failing the test with its output if it fails."""
    proc = subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=300,
                          **kwargs)
    assert proc.returncode == 0, f"{argv}: exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel of this checkout, built from a copy so that the build leaves nothing (build/,
    *.egg-info) in the checkout."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    for name in ("uspsjax", "sweeps"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    run([sys.executable, "-m", "pip", "wheel", src, "--no-deps", "--no-build-isolation",
         "--no-index", "-q", "-w", tmp / "dist"])
    (built,) = (tmp / "dist").glob("uspsjax-*.whl")
    return built


@pytest.fixture(scope="module")
def venv_python(wheel, tmp_path_factory) -> Path:
    """The interpreter of a fresh virtual environment with the wheel installed."""
    venv = tmp_path_factory.mktemp("venv")
    run([sys.executable, "-m", "venv", "--without-pip", venv])
    python = venv / "bin" / "python"
    run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index",
         "-q", wheel])
    site = run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"])
    deps = {sysconfig.get_paths()[k] for k in ("purelib", "platlib")}
    Path(site.stdout.strip(), "dependencies.pth").write_text("".join(f"{d}\n" for d in deps))
    return python


@pytest.fixture
def env(shared_h5) -> dict:
    """The environment for the installed uspsjax: the suite's data file, no PYTHONPATH."""
    return {**{k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
            "USPSJAX_DATA": str(shared_h5)}


def test_the_wheel_ships_every_sweep_file_and_the_kernels_source(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert SHIPPED and all(f"uspsjax/sweeps/{n}.toml" in names for n in SHIPPED)
    assert "uspsjax/kernels.c" in names


def test_uspsjax_is_imported_from_the_wheel(venv_python, tmp_path, env):
    proc = run([venv_python, "-c", "import uspsjax.sweep as s; print(s.__file__)"], cwd=tmp_path,
               env=env)
    assert Path(proc.stdout.strip()).is_relative_to(venv_python.parents[1])


def test_list_from_another_directory(venv_python, tmp_path, env):
    proc = run([venv_python, "-m", "uspsjax.sweep", "--list"], cwd=tmp_path, env=env)
    listed = [line.split()[0] for line in proc.stdout.splitlines()]
    assert listed == SHIPPED


def test_a_sweep_runs_from_another_directory(venv_python, tmp_path, env):
    run([venv_python, "-m", "uspsjax.sweep", "lr", "--networks", "fc", "--epochs", "1",
         "--seeds", "1", "--out", "out", "--checkpoints", "ck"], cwd=tmp_path, env=env)
    folder = tmp_path / "out" / "lr"
    assert (folder / "summary.md").is_file()
    run_ = results.read_metrics(folder / "metrics.h5")
    assert [(s["network"], s["lr"]) for s in run_.settings] == [
        ("fc", 1e-6), ("fc", 1e-3), ("fc", 50.0)]
    assert run_.curves.shape == (3, 1, 4)
    assert np.all(np.isfinite(run_.curves[:2])) and run_.diverged[2] == 1


@pytest.mark.skipif(shutil.which(shlex.split(os.environ.get("CC", "cc"))[0]) is None,
                    reason="no C compiler")
def test_the_installed_package_builds_its_kernels_into_the_cache(venv_python, tmp_path, env):
    proc = run([venv_python, "-c", "from uspsjax import kernels; print(kernels.status())"],
               cwd=tmp_path, env={**env, "XDG_CACHE_HOME": str(tmp_path / "cache")})
    assert proc.stdout.startswith("C kernels (")
    assert len(list((tmp_path / "cache" / "uspsjax").glob("kernels-*.so"))) == 1
