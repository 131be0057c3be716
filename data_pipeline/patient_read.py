"""Reading a file the filesystem refuses for a moment (EIO or ESTALE on NFS, a mount that blinks):
asked again after growing pauses before the caller gives up on it."""

import logging
import time
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)


class StillUnreadable(OSError):
    """A read that failed on every try; its message names the file, the tries and what happens now."""


def read_patiently(path: str | Path, delays: tuple[float, ...], consequence: str,
                   gone_for_good: Callable[[OSError], bool] = lambda e: False,
                   read: Callable[[], bytes] | None = None) -> bytes:
    """path's bytes (or read()'s, a part of it). An OSError is tried again after each pause in `delays` unless
    gone_for_good(error) says asking again cannot help (it is raised as it is); the last failure raises
    StillUnreadable."""
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
