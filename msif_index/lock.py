"""One writer per index folder: an advisory lock that ``build_index`` holds while it writes.

Two ``msif build-index`` runs into one folder would otherwise both write its shards, both clear
or swap it (``--overwrite``), and the second could delete the temporary files of the first. The
lock is ``fcntl.flock`` on a hidden file beside the folder, ``.NAME.lock`` (beside it, not in it:
an ``--overwrite`` build replaces the folder itself by a rename). The kernel releases it when its
process ends in any way, SIGKILL included, so an interrupted build never leaves a stale lock; the
file holds the writer's pid for the messages others get, and is removed on release.

Where ``fcntl`` is missing (Windows) builds are not locked.
"""
from __future__ import annotations

import contextlib
import errno
import os
import stat
from pathlib import Path
from typing import Iterator

from .atomic import pid_alive
from .errors import BusyError
from .warn import warn_user

try:
    import fcntl
except ImportError:                      # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = ["folder_lock", "lock_holder", "lock_path", "writer_text"]

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


def lock_path(folder: Path | str) -> Path:
    """The lock file of ``folder``: ``.NAME.lock`` in its parent."""
    folder = Path(folder).resolve()
    return folder.parent / f".{folder.name}.lock"


def writer_text(pid: int) -> str:
    """``process 1234``, or ``another process`` when the holder's pid is not known (0)."""
    return f"process {pid}" if pid else "another process"


def _read_pid(fd: int) -> int:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return 0
    return int(text) if text.isdigit() else 0


def _open_lock_file(path: Path) -> int:
    """An fd on the lock file (created if missing; read-only when the file is another user's: flock
    works on it all the same). Never follows a symbolic link, and refuses anything but a file."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | _NOFOLLOW | os.O_NONBLOCK, 0o666)
    except PermissionError as e:
        try:
            fd = os.open(path, os.O_RDONLY | _NOFOLLOW | os.O_NONBLOCK)
        except OSError:
            raise e from None            # not there and not creatable, or not readable: the first error
    if not stat.S_ISREG(os.fstat(fd).st_mode):         # (O_NONBLOCK: a FIFO there cannot block the open)
        os.close(fd)
        raise OSError(errno.EINVAL, "not a regular file", str(path))
    return fd


#: errors that leave a build unguarded (with a warning) rather than stopped: the lock file cannot be
#: created, opened or locked (a parent folder this user cannot write, something else at its path,
#: a file system without flock)
_UNGUARDED = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ELOOP, errno.EINVAL, errno.EISDIR, errno.ENXIO,
              errno.ENOLCK, errno.ENOSYS, errno.EBADF, errno.EOPNOTSUPP}


@contextlib.contextmanager
def folder_lock(folder: Path | str) -> Iterator[None]:
    """Hold the write lock of ``folder`` for the ``with`` block; BusyError at once if another
    process (or another ``folder_lock`` of this one) holds it. The parent folder is created.

    Where the lock file cannot be created, opened or locked (a parent folder this user cannot
    write, a file system without flock), the block runs unguarded, with a RuntimeWarning saying so
    (at the first caller outside msif_index)."""
    if fcntl is None:                                    # pragma: no cover - Windows
        yield
        return
    folder = Path(folder)
    path = lock_path(folder)
    fd = None
    unguarded = None
    while fd is None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = _open_lock_file(path)
        except OSError as e:
            if e.errno not in _UNGUARDED:
                raise
            unguarded = e.strerror or str(e)
            break
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            pid = _read_pid(fd)
            os.close(fd)
            fd = None
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise BusyError(f"{folder} is being written by another msif build ({writer_text(pid)}); wait "
                                f"for it to finish, or stop it and rerun this command (the build resumes)") from None
            if e.errno not in _UNGUARDED:
                raise
            unguarded = f"flock: {e.strerror or e}"
            break
        # the holder before us may have removed the file between our open and our flock: then we
        # hold a lock on a file nobody else can find; take the lock again on the file at the path
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if not same:
            os.close(fd)
            fd = None
    if fd is None:
        # outside the except block: an error of the build must not be chained to this one
        warn_user(f"cannot use the lock file {path} ({unguarded}): this build is not protected against "
                  f"another build into {folder} at the same time")
        yield
        return
    try:
        with contextlib.suppress(OSError):               # best effort: a read-only fd records nothing
            pid = f"{os.getpid()}\n".encode()
            os.pwrite(fd, pid, 0)                        # the pid first, then the old tail goes: never empty
            os.ftruncate(fd, len(pid))
        yield
    finally:
        # removed while still held, so that a writer waiting to open it finds either this file
        # (and then, after its flock, that it is no longer at the path) or none
        with contextlib.suppress(OSError):
            os.unlink(path)
        os.close(fd)


def lock_holder(folder: Path | str) -> int | None:
    """The pid of the process holding ``folder``'s write lock (0 when it is held but the holder's
    pid is not known), or None when no build is writing it. It never takes the lock (a probe would,
    for an instant, make a starting build fail as busy).

    On Linux it asks the kernel's table of locks (/proc/locks) for an exclusive flock on the lock
    file's inode held by the pid the file records, so the file of a killed build is not taken for a
    running build, even when its pid now names another process. That table shows only the processes
    of this pid namespace: a build running in another container sharing the folder is not seen here
    (it still holds the lock: a second build gets BusyError). Elsewhere the recorded pid must be alive."""
    path = lock_path(folder)
    try:
        st = os.lstat(path)
        if not stat.S_ISREG(st.st_mode):             # no lock file (a FIFO there would block the read)
            return None
        ino = st.st_ino
        text = path.read_text(encoding="ascii", errors="replace").strip()
    except OSError:
        return None
    pid = int(text) if text.isdigit() else 0
    held = _flock_held(ino, pid)
    if held is None:
        return pid if pid and pid_alive(pid) else None
    return pid if held else None


def _flock_held(ino: int, pid: int) -> bool | None:
    """Whether /proc/locks lists a granted exclusive FLOCK on inode ``ino`` held by ``pid`` (any pid
    when 0: the holder has not written it yet); None where the table cannot be read. Lines look like
    ``1: FLOCK  ADVISORY  WRITE 27090 fe:00:2238623 0 EOF`` (waiters: ``1: -> FLOCK ...``, skipped).
    Inodes are compared without devices (overlay filesystems report other device numbers there); the
    pid makes a match on another filesystem's inode of the same number practically impossible."""
    try:
        with open("/proc/locks", encoding="ascii", errors="replace") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for line in lines:
        parts = line.split()
        if (len(parts) >= 6 and parts[1] == "FLOCK" and parts[3] == "WRITE"
                and parts[5].rsplit(":", 1)[-1] == str(ino) and (not pid or parts[4] == str(pid))):
            return True
    return False
