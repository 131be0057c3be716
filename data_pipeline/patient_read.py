"""Reading a file the filesystem refuses for a moment (EIO or ESTALE on NFS, a mount that blinks):
asked again after growing pauses before the caller gives up on it."""

import io
import logging
import time
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)


class StillUnreadable(OSError):
    """A read that failed on every try; its message names the file, the tries and what happens now."""


def read_patiently(path: str | Path, delays: tuple[float, ...], consequence: str,
                   gone_for_good: Callable[[OSError], bool] = lambda e: False,
                   read: Callable[[], bytes | int] | None = None) -> bytes | int:
    """path's bytes (or what read() returns: a part of it, or how much it read). An OSError is tried again
    after each pause in `delays` unless gone_for_good(error) says asking again cannot help (it is raised as
    it is); the last failure raises StillUnreadable."""
    path = Path(path)
    for delay in (*delays, None):
        try:
            return read() if read else path.read_bytes()
        except OSError as e:
            if gone_for_good(e):
                raise
            if delay is None:
                raise StillUnreadable(e.errno, f"{path}: still unreadable after {len(delays) + 1} tries over "
                                      f"{sum(delays):g} s ({e.strerror or e}); {consequence}") from e
            log.warning("%s: unreadable (%s); trying again in %g s", path, e.strerror or e, delay)
            time.sleep(delay)


class PatientFile(io.RawIOBase):
    """A file read front to back with every read as patient as read_patiently: a read that fails reopens the
    file (a stale NFS handle is not asked again) at the same offset after each pause, and the last failure
    raises StillUnreadable. A shard streams through it, so only its samples are held, not its bytes too."""

    def __init__(self, path: str | Path, delays: tuple[float, ...], consequence: str):
        self.path, self.delays, self.consequence = Path(path), delays, consequence
        self._file, self._offset = None, 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        def once() -> int:
            if self._file is None:
                self._file = open(self.path, "rb", buffering=0)
            try:
                if self._file.tell() != self._offset:  # reopened after a failure: where the last good read ended
                    self._file.seek(self._offset)
                return self._file.readinto(buffer)
            except OSError:
                self._file.close()
                self._file = None
                raise

        got = read_patiently(self.path, self.delays, self.consequence, read=once)
        self._offset += got
        return got

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        super().close()
