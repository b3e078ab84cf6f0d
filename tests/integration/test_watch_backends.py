"""The file watcher on real directories, with either way of watching: inotify on the event loop
(Linux, the default) and watchfiles (elsewhere, or when inotify cannot be set up).  Each change
is judged once per burst; only our file names and Kubernetes' `..` entries reload."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from gateway import inotify
from gateway.watch import FileWatcher
from tests.support.process import async_wait_until

BACKENDS = [pytest.param(True, id="inotify"), pytest.param(False, id="watchfiles")]


class Reloads:
    """Counts the reloads the watcher asks for; `files` is what the config references."""

    def __init__(self, files: list[Path]) -> None:
        self.files = files
        self.count = 0

    def watched(self) -> list[str]:
        return [str(f) for f in self.files]

    async def reload(self) -> None:
        self.count += 1


@contextlib.asynccontextmanager
async def watching(reloads: Reloads, use_inotify: bool) -> AsyncIterator[FileWatcher]:
    watcher = FileWatcher(reloads.watched, reloads.reload, use_inotify=use_inotify)
    task = asyncio.create_task(watcher.run())
    try:
        await asyncio.wait_for(watcher.ready.wait(), 5)
        yield watcher
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


@pytest.mark.parametrize("use_inotify", BACKENDS)
async def test_an_unrelated_file_is_seen_and_ignored_a_saved_one_reloads(
    tmp_path: Path, use_inotify: bool
) -> None:
    config = tmp_path / "gateway.yaml"
    config.write_text("a")
    reloads = Reloads([config])
    async with watching(reloads, use_inotify) as watcher:
        (tmp_path / "notes.txt").write_text("unrelated")
        await async_wait_until(lambda: watcher.bursts == 1, within=5, what="the first burst")
        assert reloads.count == 0
        # an editor's save: a temporary file written, then renamed over ours — one burst
        temporary = tmp_path / ".gateway.yaml.swp"
        temporary.write_text("b")
        os.replace(temporary, config)
        await async_wait_until(lambda: reloads.count == 1, within=5, what="the reload")
        assert watcher.bursts == 2


@pytest.mark.parametrize("use_inotify", BACKENDS)
async def test_a_kubernetes_data_swap_reloads(tmp_path: Path, use_inotify: bool) -> None:
    """The kubelet writes a new timestamped directory and renames a new `..data` symlink over
    the old; the config is a symlink through `..data`, so its own name never changes."""
    mount = tmp_path / "mount"
    mount.mkdir()
    first = mount / "..2026_12_01"
    first.mkdir()
    (first / "gateway.yaml").write_text("a")
    (mount / "..data").symlink_to(first.name)
    (mount / "gateway.yaml").symlink_to("..data/gateway.yaml")
    reloads = Reloads([mount / "gateway.yaml"])
    async with watching(reloads, use_inotify):
        second = mount / "..2026_12_02"
        second.mkdir()
        (second / "gateway.yaml").write_text("b")
        (mount / "..data_tmp").symlink_to(second.name)
        os.replace(mount / "..data_tmp", mount / "..data")
        await async_wait_until(lambda: reloads.count == 1, within=5, what="the reload")
        assert (mount / "gateway.yaml").read_text() == "b"


async def test_inotify_watches_afresh_when_a_watched_directory_is_replaced(
    tmp_path: Path,
) -> None:
    """A watched directory removed, then made again: its watch went with it, so the watcher
    reloads (anything may have changed), watches the parent for the directory's return,
    reloads when it is back (its files may be there) and watches the new directory."""
    directory = tmp_path / "certs"
    directory.mkdir()
    (directory / "server.crt").write_text("a")
    reloads = Reloads([directory / "server.crt"])
    async with watching(reloads, use_inotify=True) as watcher:
        assert watcher.watches == 1
        shutil.rmtree(directory)
        await async_wait_until(lambda: watcher.watches == 2, within=5, what="the parent watched")
        assert reloads.count == 1
        directory.mkdir()
        await async_wait_until(lambda: watcher.watches == 3, within=5, what="the new watch")
        assert reloads.count == 2
        (directory / "server.crt").write_text("b")
        await async_wait_until(lambda: reloads.count == 3, within=5, what="the change seen")


async def test_inotify_reports_names_and_lost_watches(tmp_path: Path) -> None:
    events = inotify.DirectoryEvents([str(tmp_path)])
    try:
        (tmp_path / "a.yaml").write_text("a")
        os.replace(tmp_path / "a.yaml", tmp_path / "b.yaml")
        await asyncio.wait_for(events.wait(), 5)
        await events.quiet(0.05, 1)
        names, lost = events.take()
        assert names == {"a.yaml", "b.yaml"}
        assert not lost
        os.rename(tmp_path, tmp_path.with_name(tmp_path.name + "-moved"))
        await asyncio.wait_for(events.wait(), 5)
        names, lost = events.take()
        assert lost
        assert names == set()
    finally:
        events.close()


async def test_inotify_refuses_a_directory_it_cannot_watch(tmp_path: Path) -> None:
    with pytest.raises(OSError, match="inotify_add_watch"):
        inotify.DirectoryEvents([str(tmp_path / "missing")])
    file = tmp_path / "file"
    file.write_text("")
    with pytest.raises(OSError, match="inotify_add_watch"):
        inotify.DirectoryEvents([str(file)])  # a file, not a directory (IN_ONLYDIR)
