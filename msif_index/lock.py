"""One writer per index folder: an advisory lock that ``build_index`` holds while it writes.

Two ``msif build-index`` runs into one folder would otherwise both write its shards, both clear
or swap it (``--overwrite``), and the second could delete the temporary files of the first. The
lock is ``fcntl.flock`` on a hidden file beside the folder, ``.NAME.lock`` (beside it, not in it:
an ``--overwrite`` build replaces the folder itself by a rename). The kernel releases it when its
process ends in any way, SIGKILL included, so an interrupted build never leaves a stale lock; the
file holds the writer's pid for the message another writer gets, and is removed on release.

Where ``fcntl`` is missing (Windows) builds are not locked.
"""
from __future__ import annotations

import contextlib
import errno
import os
import warnings
from pathlib import Path
from typing import Iterator

from .atomic import _pid_alive
from .errors import BusyError

try:
    import fcntl
except ImportError:                      # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = ["folder_lock", "lock_holder", "lock_path"]


def lock_path(folder: Path | str) -> Path:
    """The lock file of ``folder``: ``.NAME.lock`` in its parent."""
    folder = Path(folder).resolve()
    return folder.parent / f".{folder.name}.lock"


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        return int(text) if text.isdigit() else None
    except OSError:
        return None


def _busy(folder: Path, pid: int | None) -> BusyError:
    who = f"process {pid}" if pid else "another process"
    return BusyError(f"{folder} is being written by another msif build ({who}); wait for it to finish, "
                     f"or stop it and rerun this command (the build resumes)")


@contextlib.contextmanager
def folder_lock(folder: Path | str) -> Iterator[None]:
    """Hold the write lock of ``folder`` for the ``with`` block; BusyError at once if another
    process (or another ``folder_lock`` of this one) holds it. The parent folder is created."""
    if fcntl is None:                                    # pragma: no cover - Windows
        yield
        return
    folder = Path(folder)
    path = lock_path(folder)
    while True:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            if e.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
                raise
            # a folder whose parent this user cannot write: built, but unguarded, and said so
            warnings.warn(f"cannot create the lock file {path} ({e.strerror}): this build is not protected "
                          f"against another build into {folder} at the same time", RuntimeWarning, stacklevel=3)
            yield
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            pid = _read_pid(fd)
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise _busy(folder, pid) from None
            raise
        # the holder before us may have removed the file between our open and our flock: then we
        # hold a lock on a file nobody else can find; take the lock again on the file at the path
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        # removed while still held, so that a writer waiting to open it finds either this file
        # (and then, after its flock, that it is no longer at the path) or none
        with contextlib.suppress(OSError):
            os.unlink(path)
        os.close(fd)


def lock_holder(folder: Path | str) -> int | None:
    """The pid of the process holding ``folder``'s write lock (0 when it is held but the holder's
    pid is unknown), or None when no build is writing it. On Linux it asks the kernel which flock
    locks are held (/proc/locks), so a file a killed build left is not taken for a running build,
    even when its recorded pid now belongs to another process; elsewhere it checks that the recorded
    pid is alive. It never takes the lock itself (a probe would, for an instant, make a starting
    build fail as busy)."""
    path = lock_path(folder)
    try:
        ino = os.stat(path).st_ino
        text = path.read_text(encoding="ascii", errors="replace").strip()
    except OSError:
        return None
    pid = int(text) if text.isdigit() else 0
    held = _flock_held(ino)
    if held is None:
        return pid if pid and _pid_alive(pid) else None
    return pid if held else None


def _flock_held(ino: int) -> bool | None:
    """Whether /proc/locks lists a granted FLOCK on inode ``ino`` (None where it cannot be read).
    Lines look like ``1: FLOCK  ADVISORY  WRITE 27090 fe:00:2238623 0 EOF``; waiters carry ``->``.
    Inodes are compared without devices (overlay filesystems report other device numbers there)."""
    try:
        with open("/proc/locks", encoding="ascii", errors="replace") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for line in lines:
        parts = line.split()
        if len(parts) >= 6 and parts[1] == "FLOCK" and parts[5].rsplit(":", 1)[-1] == str(ino):
            return True
    return False
