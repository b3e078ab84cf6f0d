"""Linux inotify on the event loop: which names changed in a few directories.

The file watcher (gateway.watch) uses it instead of watchfiles wherever inotify exists:
watchfiles waits for events on two threads of its own (its notifier, and the thread its async
iterator blocks in), and a serving process with other threads pays for them on every system
call (gateway.runtime.threads).  Here the inotify descriptor is one more reader on the loop:
the kernel queues the events, the loop reads them when it is readable, no thread is involved.

Only what the watcher needs: non-recursive watches on directories, the names of the entries
that changed, and "something was lost" (the kernel's queue overflowed, or a watched directory
itself was removed or moved) said as `lost`, after which the caller must assume anything
changed.  libc is reached through ctypes (Python has no inotify binding); `available()` says
whether this system has it.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import os
import struct
from collections.abc import Iterable
from typing import Final

#: <sys/inotify.h>
_IN_MODIFY: Final = 0x00000002
_IN_ATTRIB: Final = 0x00000004
_IN_CLOSE_WRITE: Final = 0x00000008
_IN_MOVED_FROM: Final = 0x00000040
_IN_MOVED_TO: Final = 0x00000080
_IN_CREATE: Final = 0x00000100
_IN_DELETE: Final = 0x00000200
_IN_DELETE_SELF: Final = 0x00000400
_IN_MOVE_SELF: Final = 0x00000800
_IN_Q_OVERFLOW: Final = 0x00004000
_IN_IGNORED: Final = 0x00008000
_IN_ONLYDIR: Final = 0x01000000
_IN_NONBLOCK: Final = os.O_NONBLOCK
_IN_CLOEXEC: Final = os.O_CLOEXEC

#: what happens to an entry (written, renamed in or out, created, removed, chmod-ed — a
#: Secret's files change mode when the kubelet rewrites them), or to the directory itself
_MASK: Final = (
    _IN_MODIFY
    | _IN_ATTRIB
    | _IN_CLOSE_WRITE
    | _IN_MOVED_FROM
    | _IN_MOVED_TO
    | _IN_CREATE
    | _IN_DELETE
    | _IN_DELETE_SELF
    | _IN_MOVE_SELF
    | _IN_ONLYDIR
)
#: the directory went away (or its watch did): its later changes would be missed
_LOST: Final = _IN_Q_OVERFLOW | _IN_IGNORED | _IN_DELETE_SELF | _IN_MOVE_SELF

#: struct inotify_event: wd, mask, cookie, len, then `len` bytes of NUL-padded name
_EVENT: Final = struct.Struct("iIII")
_READ_SIZE: Final = 64 * 1024


def _libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None
    if not hasattr(libc, "inotify_init1") or not hasattr(libc, "inotify_add_watch"):
        return None
    libc.inotify_init1.argtypes = [ctypes.c_int]
    libc.inotify_init1.restype = ctypes.c_int
    libc.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
    libc.inotify_add_watch.restype = ctypes.c_int
    return libc


_LIBC: Final = _libc()


def available() -> bool:
    """Whether this system has inotify (Linux)."""
    return _LIBC is not None


class DirectoryEvents:
    """Watches `directories` (each non-recursively) from the running loop until `close`.
    Raises OSError when the watches cannot be set up (no inotify, the per-user limit reached,
    a directory unreadable)."""

    def __init__(self, directories: Iterable[str]) -> None:
        if _LIBC is None:
            raise OSError(errno.ENOSYS, "inotify is not available on this system")
        self._loop = asyncio.get_running_loop()
        fd = _LIBC.inotify_init1(_IN_NONBLOCK | _IN_CLOEXEC)
        if fd < 0:
            code = ctypes.get_errno()
            raise OSError(code, f"inotify_init1: {os.strerror(code)}")
        self._fd = fd
        try:
            for directory in directories:
                if _LIBC.inotify_add_watch(fd, os.fsencode(directory), _MASK) < 0:
                    code = ctypes.get_errno()
                    raise OSError(code, f"inotify_add_watch: {os.strerror(code)}", directory)
        except BaseException:
            os.close(fd)
            raise
        #: names changed since `take` last ran
        self._names: set[str] = set()
        self._lost = False
        self._arrived = asyncio.Event()
        self._loop.add_reader(fd, self._readable)

    def _readable(self) -> None:
        while True:
            try:
                data = os.read(self._fd, _READ_SIZE)
            except BlockingIOError:
                break
            except OSError:
                self._lost = True  # nothing more can be read: say so rather than go quiet
                break
            if not data:
                break
            self._parse(data)
        if self._names or self._lost:
            self._arrived.set()

    def _parse(self, data: bytes) -> None:
        offset = 0
        while offset + _EVENT.size <= len(data):
            _, mask, _, size = _EVENT.unpack_from(data, offset)
            offset += _EVENT.size
            raw = data[offset : offset + size]
            offset += size
            if mask & _LOST:
                self._lost = True
            name = raw.rstrip(b"\0")
            if name:
                self._names.add(os.fsdecode(name))

    async def wait(self) -> None:
        """Until something arrived that `take` has not taken."""
        while not (self._names or self._lost):
            self._arrived.clear()
            await self._arrived.wait()

    def take(self) -> tuple[set[str], bool]:
        """The names changed since the last call, and whether events were lost."""
        names, lost = self._names, self._lost
        self._names = set()
        self._lost = False
        self._arrived.clear()
        return names, lost

    async def quiet(self, step: float, longest: float) -> None:
        """Until no event came for `step` seconds, or `longest` seconds passed: a burst of
        events (an editor's save, a kubelet's swap) becomes one change."""
        loop = self._loop
        deadline = loop.time() + longest
        while True:
            self._arrived.clear()
            left = deadline - loop.time()
            if left <= 0:
                return
            try:
                await asyncio.wait_for(self._arrived.wait(), min(step, left))
            except TimeoutError:
                return

    def close(self) -> None:
        if self._fd >= 0:
            self._loop.remove_reader(self._fd)
            os.close(self._fd)
            self._fd = -1
