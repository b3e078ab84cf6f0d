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

from gateway import inotify

log = logging.getLogger("gateway.watch")

#: quiet time after the last event of a burst before reloading (an editor's save is a burst)
DEBOUNCE_MS = 200
#: a burst ends when no event came for this long (within DEBOUNCE_MS of its first)
_STEP_MS = 100


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
    """Runs until cancelled: waits for relevant changes, then calls `reload`.

    On Linux the directories are watched with inotify on the event loop itself
    (gateway.inotify), so watching adds no thread to the serving process; elsewhere (or with
    `use_inotify=False`) with watchfiles, which waits on threads of its own."""

    def __init__(
        self,
        files: Callable[[], Iterable[str]],
        reload: Callable[[], Awaitable[object]],
        *,
        debounce_ms: int = DEBOUNCE_MS,
        use_inotify: bool | None = None,
    ) -> None:
        self._files = files
        self._reload = reload
        self._debounce_ms = debounce_ms
        self._use_inotify = inotify.available() if use_inotify is None else use_inotify
        #: set whenever a watch is in place (tests wait for it before writing files)
        self.ready = asyncio.Event()
        #: bursts of events judged so far, relevant or not (tests wait on it to know an
        #: irrelevant change was seen and ignored)
        self.bursts = 0
        #: watches set up so far (the first, then one each time the watched set changed)
        self.watches = 0

    async def run(self) -> None:
        if self._use_inotify:
            await self._run_inotify()
        else:
            await self._run_watchfiles()

    async def _run_inotify(self) -> None:
        while True:
            directories, names = watched_names(self._files())
            existing = {d for d in directories if d.is_dir()}
            # a directory that is not there (yet, or any more): its parent is watched for it
            missing = directories - existing
            appearing = {d.name for d in missing}
            parents = {d.parent for d in missing if d.parent.is_dir()}
            try:
                events = inotify.DirectoryEvents(str(d) for d in existing | parents)
            except OSError as exc:
                # e.g. fs.inotify.max_user_instances reached: watch all the same, on threads
                log.warning("inotify unavailable (%s): watching files with watchfiles", exc)
                self._use_inotify = False
                await self._run_watchfiles()
                return
            try:
                self.watches += 1
                self.ready.set()
                while True:
                    await events.wait()
                    # a burst: quiet for `step`, at most `debounce` (as watchfiles groups them)
                    await events.quiet(_STEP_MS / 1000, self._debounce_ms / 1000)
                    changed, lost = events.take()
                    self.bursts += 1
                    if not lost and not any(
                        is_relevant(name, names) or name in appearing for name in changed
                    ):
                        continue
                    log.info("watched files changed: reloading")
                    await self._reload()
                    if (
                        lost
                        or watched_names(self._files()) != (directories, names)
                        or {d for d in directories if d.is_dir()} != existing
                    ):
                        # other files now, or a watched directory gone, replaced or come:
                        # watch afresh
                        self.ready.clear()
                        break
            finally:
                events.close()

    async def _run_watchfiles(self) -> None:
        while True:
            directories, names = watched_names(self._files())
            existing = [str(d) for d in directories if d.is_dir()]
            stop = asyncio.Event()
            self.watches += 1
            self.ready.set()
            async for changes in watchfiles.awatch(
                *existing,
                debounce=self._debounce_ms,
                step=_STEP_MS,
                stop_event=stop,
                recursive=False,
                force_polling=False,
            ):
                self.bursts += 1
                if not any(is_relevant(path, names) for _, path in changes):
                    continue
                log.info("watched files changed: reloading")
                await self._reload()
                if watched_names(self._files()) != (directories, names):
                    # the config now references other files: watch those instead
                    self.ready.clear()
                    stop.set()
