"""Live files (SPEC §6): watch the config and every file it references, reload on a change.

Directories are watched, not files: editors save by writing a temporary file and renaming it
over the original, and Kubernetes swaps a `..data` symlink to a new directory, and a watch on
the old file (its inode) would miss both.  Any event in a watched directory that touches one of
our file names, or a `..`-prefixed entry (the ConfigMap/Secret machinery), triggers a reload
once the burst of events has been quiet for `debounce`.  The reload itself validates everything
and changes nothing when the content is the same (the version is a hash of the config and every
file it references), so a spurious event costs a parse, never a half-applied change.  After each
reload the watch is rebuilt if the set of referenced files changed.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path

import watchfiles

log = logging.getLogger("gateway.watch")

#: quiet time after the last event of a burst before reloading (an editor's save is a burst)
DEBOUNCE_MS = 200


def watched_names(files: Iterable[str]) -> tuple[set[Path], set[str]]:
    """The directories to watch and the file names in them that matter."""
    directories: set[Path] = set()
    names: set[str] = set()
    for file in files:
        path = Path(file)
        directories.add(path.parent)
        names.add(path.name)
    return directories, names


def is_relevant(changed: str, names: set[str]) -> bool:
    name = Path(changed).name
    return name in names or name.startswith("..")


class FileWatcher:
    """Runs until cancelled: waits for relevant changes, then calls `reload`."""

    def __init__(
        self,
        files: Callable[[], Iterable[str]],
        reload: Callable[[], Awaitable[object]],
        *,
        debounce_ms: int = DEBOUNCE_MS,
    ) -> None:
        self._files = files
        self._reload = reload
        self._debounce_ms = debounce_ms
        #: set whenever a watch is in place (tests wait for it before writing files)
        self.ready = asyncio.Event()

    async def run(self) -> None:
        while True:
            directories, names = watched_names(self._files())
            existing = [str(d) for d in directories if d.is_dir()]
            stop = asyncio.Event()
            self.ready.set()
            async for changes in watchfiles.awatch(
                *existing,
                debounce=self._debounce_ms,
                step=100,
                stop_event=stop,
                recursive=False,
                force_polling=False,
            ):
                if not any(is_relevant(path, names) for _, path in changes):
                    continue
                log.info("watched files changed: reloading")
                await self._reload()
                if watched_names(self._files()) != (directories, names):
                    # the config now references other files: watch those instead
                    self.ready.clear()
                    stop.set()
