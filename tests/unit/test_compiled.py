"""The guard against compiled hot-path modules that are older than their source."""

from __future__ import annotations

import importlib.machinery
import os
from pathlib import Path

import pytest

from gateway._compiled import StaleCompiledModule, check_fresh, compiled_modules

SUFFIX = importlib.machinery.EXTENSION_SUFFIXES[0]


def _package(root: Path) -> Path:
    (root / "setup.py").write_text("")  # a source checkout
    package = root / "pkg"
    (package / "http").mkdir(parents=True)
    for name in ("http/server.py", "routing.py", "cli.py"):
        (package / name).write_text("")
    for name in ("http/server", "routing"):
        (package / f"{name}{SUFFIX}").write_bytes(b"shim")
    (package / f"_group__mypyc{SUFFIX}").write_bytes(b"library")
    return package


def _touch(path: Path, when: float) -> None:
    os.utime(path, (when, when))


def test_lists_the_modules_that_have_an_extension(tmp_path: Path) -> None:
    package = _package(tmp_path)
    assert sorted(compiled_modules(package)) == ["pkg.http.server", "pkg.routing"]


def test_fresh_when_the_library_was_built_after_every_source(tmp_path: Path) -> None:
    package = _package(tmp_path)
    for path in package.rglob("*"):
        if path.is_file():
            _touch(path, 1000)
    # shims are left alone by a rebuild; the shared library carries the new code
    _touch(package / f"_group__mypyc{SUFFIX}", 3000)
    _touch(package / "http" / "server.py", 2000)
    check_fresh(package)


def test_an_edited_source_is_reported_by_name(tmp_path: Path) -> None:
    package = _package(tmp_path)
    for path in package.rglob("*"):
        if path.is_file():
            _touch(path, 1000)
    _touch(package / "routing.py", 2000)
    _touch(package / "cli.py", 5000)  # not compiled: never stale
    with pytest.raises(StaleCompiledModule, match=r"pkg\.routing;.*make build"):
        check_fresh(package)


def test_an_installed_package_is_not_checked(tmp_path: Path) -> None:
    package = _package(tmp_path)
    (tmp_path / "setup.py").unlink()  # site-packages: the installer set the times
    for path in package.rglob("*"):
        if path.is_file():
            _touch(path, 1000)
    _touch(package / "routing.py", 2000)
    check_fresh(package)
