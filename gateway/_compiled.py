"""Which modules run compiled, and a guard against compiled modules older than their source.

`setup.py` compiles the hot path with mypyc into extension modules that sit beside their `.py`
files, and Python imports an extension in preference to the source.  After an edit, a stale
extension would silently run the old code, so importing the package checks first and names the
fix.  The check is a few `stat` calls at start-up, nothing per request.
"""

from __future__ import annotations

import importlib.machinery
from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent


class StaleCompiledModule(ImportError):
    """A compiled module is older than the source it was compiled from."""


def compiled_modules(package: Path = _PACKAGE) -> dict[str, Path]:
    """Dotted module name -> its compiled extension, for every module that has one."""
    found: dict[str, Path] = {}
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        for extension in package.rglob(f"*{suffix}"):
            source = extension.with_name(extension.name[: -len(suffix)] + ".py")
            if source.exists():
                relative = source.relative_to(package.parent).with_suffix("")
                found[".".join(relative.parts)] = extension
    return found


def check_fresh(package: Path = _PACKAGE) -> None:
    """Raise `StaleCompiledModule` when a source file changed after it was compiled.

    Only in a source checkout (setup.py beside the package), where `make build` compiles in
    place: an installed package has its files' times set by the installer, not by the build.
    """
    if not (package.parent / "setup.py").exists():
        return
    # each module's extension is a small shim that loads the group's shared library, where the
    # code is; a rebuild rewrites the library and leaves an unchanged shim alone
    libraries = [
        library.stat().st_mtime
        for suffix in importlib.machinery.EXTENSION_SUFFIXES
        for library in package.glob(f"*__mypyc{suffix}")
    ]
    stale = []
    for name, extension in compiled_modules(package).items():
        built = max([extension.stat().st_mtime, *libraries])
        source = extension.with_name(name.rsplit(".", 1)[-1] + ".py")
        if source.stat().st_mtime > built:
            stale.append(name)
    if stale:
        raise StaleCompiledModule(
            f"compiled module(s) older than their source: {', '.join(sorted(stale))}; "
            "run `make build` to recompile, or `make clean-build` to run pure Python"
        )
