"""Child processes that end with their parent: a writer's worker or a training rank whose parent was killed
(a SIGKILL, a closed terminal's SIGHUP) must not go on alone, beside a rerun doing the same work."""

import ctypes
import os
import signal


def signal_on_parent_death(signum: int, parent: int) -> None:
    """Run in the child (a preexec_fn, a pool initializer): deliver `signum` to this process when `parent`
    dies, however it dies (Linux's PR_SET_PDEATHSIG); elsewhere a no-op."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signum), 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the child outlives a killed parent
        return
    if os.getppid() != parent:  # the parent died before the line above
        os.kill(os.getpid(), signum)


def stop_with_parent(parent: int, signum: int = signal.SIGTERM):
    """A preexec_fn for subprocess.Popen: the child gets `signum` when `parent` dies."""
    return lambda: signal_on_parent_death(signum, parent)
