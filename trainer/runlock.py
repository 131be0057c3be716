"""One training per run directory: RUN/train.lock, held (flock) by the process that trains there.

Re-running the command of a training that still runs (in another terminal, or a job submitted twice)
would otherwise interleave two trainings' checkpoints in one directory. The lock is an advisory
`flock` on the file, so it ends with its process however that ends (a SIGKILL included); the file
also names the holder for the message. On a shared filesystem the lock of a node that died can outlive
it until the server's lease expires (about 90 s on NFSv4): a holder on another host is waited for a
while before the run is refused, unless it names this same Slurm job: Slurm starts a requeued job only
after its earlier run ended, so that holder is dead (a lock left by a failed node can last until the
client is evicted or rebooted) and the run goes on, unlocked. Filesystems without flock (some Lustre
mounts) run unlocked.
"""

import fcntl
import json
import logging
import os
import socket
import time
from pathlib import Path

LOCK = "train.lock"
_held: dict[str, int] = {}  # run directory -> the open file descriptor that holds its lock


class RunDirBusy(ValueError):
    pass


def acquire(run_dir: Path, wait_other_host_s: float = 180.0) -> bool:
    """Take run_dir's lock for the rest of this process's life; False where the filesystem has no
    locks. Raises RunDirBusy, naming the holder, while another process holds it."""
    run_dir = Path(run_dir)
    if str(run_dir.resolve()) in _held:
        return True
    run_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(run_dir / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    deadline = time.monotonic() + wait_other_host_s
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            holder = _read(run_dir / LOCK)
            job = os.environ.get("SLURM_JOB_ID")
            if job and holder.get("slurm_job_id") == job and holder.get("host") != socket.gethostname():
                os.close(fd)
                logging.getLogger(__name__).warning(
                    "%s: its lock is still held for %s, an earlier run of this job (%s), which Slurm ended before "
                    "requeueing it: going on without the lock", run_dir, holder.get("host"), job)
                return False
            if holder.get("host") == socket.gethostname() or time.monotonic() > deadline:
                os.close(fd)
                raise RunDirBusy(f"run_dir: {run_dir} is in use by another training (pid {holder.get('pid', '?')} "
                                 f"on {holder.get('host', '?')}, since {holder.get('since', '?')}); two trainings "
                                 "in one run directory would mix their checkpoints: wait for it, or stop it") from None
            time.sleep(5)
        except OSError as e:  # no flock on this filesystem
            os.close(fd)
            logging.getLogger(__name__).warning(
                "%s: this filesystem refuses flock (%s): the run directory is not locked, so a second training "
                "started in it would not be refused; make sure only one runs", run_dir, e.strerror or e)
            return False
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                              "since": time.strftime("%Y-%m-%d %H:%M:%S"),
                              "slurm_job_id": os.environ.get("SLURM_JOB_ID")}).encode(), 0)
    _held[str(run_dir.resolve())] = fd
    return True


def held_fd(run_dir: Path) -> int | None:
    """The descriptor holding run_dir's lock in this process, if it holds it. A child given it (pass_fds)
    shares the lock: it is let go only when every process holding it has ended."""
    return _held.get(str(Path(run_dir).resolve()))


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text() or "{}")
    except (OSError, json.JSONDecodeError):
        return {}


def holder(run_dir: Path) -> dict | None:
    """Who holds run_dir's lock now ({host, pid, since}), or None; takes nothing (for checks before a
    job is queued)."""
    path = Path(run_dir) / LOCK
    if not path.is_file() or str(Path(run_dir).resolve()) in _held:
        return None
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return None
    except BlockingIOError:
        return _read(path) or {"pid": "?", "host": "?"}
    except OSError:
        return None
    finally:
        os.close(fd)
