"""Advisory file locks that work on Linux, macOS and Windows.

POSIX: ``fcntl.flock`` (the kernel drops the lock when the process ends, also on
``kill -9``). Windows: ``msvcrt.locking`` on one byte far past the file's contents, so
the file itself (a run's ``LOCK`` holds its owner's PID) stays readable by others; the
system releases it when the process ends. Anywhere else (neither module importable): a
``<file>.held`` marker created exclusively and holding the owner's PID, treated as free
once that process is gone.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None
try:
    import msvcrt
except ImportError:  # POSIX
    msvcrt = None

WINDOWS_LOCK_OFFSET = 1 << 30  # the byte locked on Windows: past any PID text
POLL_S = 0.05  # blocking waits without a kernel wait (Windows, the marker fallback)


def backend() -> str:
    """'fcntl', 'msvcrt' or 'marker': how this platform locks files."""
    return "fcntl" if fcntl is not None else "msvcrt" if msvcrt is not None else "marker"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


class FileLock:
    """An exclusive (or shared, where the platform has them) lock on ``path``.

    ``acquire(blocking=False)`` raises BlockingIOError while another process holds it;
    ``fd`` is the open file (read/write) while the lock is held.
    """

    def __init__(self, path: str | Path, readonly: bool = False):
        self.path = Path(path)
        self.readonly = readonly
        self.fd: int | None = None
        self._marker: Path | None = None

    def acquire(self, blocking: bool = False, shared: bool = False) -> FileLock:
        flags = os.O_RDONLY if self.readonly else os.O_RDWR | os.O_CREAT
        fd = os.open(self.path, flags, 0o644)
        try:
            while True:
                try:
                    self._lock(fd, shared)
                    break
                except BlockingIOError:
                    if not blocking:
                        raise
                    time.sleep(POLL_S)
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd
        return self

    def _lock(self, fd: int, shared: bool) -> None:
        if fcntl is not None:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        elif msvcrt is not None:
            os.lseek(fd, WINDOWS_LOCK_OFFSET, os.SEEK_SET)
            try:
                msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
            except OSError:
                raise BlockingIOError(f"{self.path} is locked") from None
            finally:
                os.lseek(fd, 0, os.SEEK_SET)
        else:
            self._marker = _take_marker(self.path)

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            if fcntl is not None:
                fcntl.flock(self.fd, fcntl.LOCK_UN)
            elif msvcrt is not None:
                os.lseek(self.fd, WINDOWS_LOCK_OFFSET, os.SEEK_SET)
                msvcrt.locking(self.fd, msvcrt.LK_UNLCK, 1)
            elif self._marker is not None:
                self._marker.unlink(missing_ok=True)
                self._marker = None
        finally:
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> FileLock:
        return self.acquire(blocking=True)

    def __exit__(self, *exc) -> None:
        self.release()


def _take_marker(path: Path) -> Path:
    """Create ``<path>.held`` holding our PID (BlockingIOError while a live process has it)."""
    marker = path.with_name(path.name + ".held")
    for _ in range(2):
        try:
            fd = os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            try:
                text = marker.read_text().strip()
            except OSError:
                text = ""
            if text.isdigit() and not _pid_alive(int(text)):
                marker.unlink(missing_ok=True)  # its owner is gone: the lock is free
                continue
            raise BlockingIOError(f"{path} is locked") from None
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        return marker
    raise BlockingIOError(f"{path} is locked")


def is_locked(path: str | Path) -> bool:
    """True while another process (or another open file of this one) holds ``path``."""
    if not Path(path).exists():
        return False
    probe = FileLock(path, readonly=fcntl is not None)
    try:
        probe.acquire(shared=True)
    except BlockingIOError:
        return True
    probe.release()
    return False
