"""`pip install .` in a fresh virtual environment, as a user runs it, where no C compiler works.

The compiled install is what tests/packaging/test_image.py builds and runs (the Dockerfile's
steps); this is the other branch of setup.py: a missing compiler gives pure Python and says so,
and GATEWAY_COMPILE=1 turns that into a failed install.  The compiler is hidden the way
setuptools is told which one to use, with CC.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.support.dockerfile import BASE_PYTHON, PASSED_ENV

REPO = Path(__file__).resolve().parents[2]

# pip installs the runtime dependencies and the build's (from its cache after the first run)
pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

#: what a fresh clone holds of the package, without in-place compiled modules or caches
SOURCES = ("pyproject.toml", "setup.py", "README.md", "gateway")


@pytest.fixture
def checkout(tmp_path: Path) -> Path:
    source = tmp_path / "src"
    for name in SOURCES:
        origin = REPO / name
        if origin.is_dir():
            shutil.copytree(
                origin, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.so")
            )
        else:
            source.mkdir(exist_ok=True)
            shutil.copy2(origin, source / name)
    return source


@pytest.fixture
def venv(tmp_path: Path) -> Path:
    path = tmp_path / "venv"
    subprocess.run([str(BASE_PYTHON), "-m", "venv", str(path)], check=True, timeout=120)
    return path


def _pip_install(venv: Path, source: Path, **env: str) -> subprocess.CompletedProcess[str]:
    plain = {k: os.environ[k] for k in PASSED_ENV if k in os.environ}
    return subprocess.run(
        [str(venv / "bin" / "pip"), "install", "-v", "."],
        cwd=source,
        # no pip configuration of this machine's: the index, as for anyone
        env={**plain, "PATH": "/usr/bin:/bin", "HOME": os.environ["HOME"], **env},
        capture_output=True,
        text=True,
        timeout=480,
        check=False,
    )


def test_without_a_compiler_pip_install_gives_pure_python_and_says_so(
    checkout: Path, venv: Path
) -> None:
    result = _pip_install(venv, checkout, CC="/bin/false", PIP_CONFIG_FILE=os.devnull)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    # pip shows a build's own output with -v, on stdout or stderr depending on its version
    said = result.stdout + result.stderr
    assert "no working C compiler, so the hot path is NOT compiled" in said
    assert "GATEWAY_COMPILE=1 to make this an error" in said
    check = subprocess.run(
        [
            str(venv / "bin" / "python"),
            "-I",
            "-c",
            "import gateway._compiled as c; print(len(c.compiled_modules()))",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert (check.returncode, check.stdout.strip()) == (0, "0"), check.stderr
    version = subprocess.run(
        [str(venv / "bin" / "gateway"), "version"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert version.stdout.startswith("gateway 0.1.0"), version.stderr


def test_gateway_compile_1_fails_the_install_without_a_compiler(
    checkout: Path, venv: Path
) -> None:
    result = _pip_install(
        venv, checkout, CC="/bin/false", GATEWAY_COMPILE="1", PIP_CONFIG_FILE=os.devnull
    )
    assert result.returncode != 0
    assert "GATEWAY_COMPILE=1 but no working C compiler" in result.stdout + result.stderr
    assert not (venv / "bin" / "gateway").exists()
