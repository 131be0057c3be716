"""The results registry of a run: RUN/eval/<key>/ per (snapshot, setting).

    setting.json      what to evaluate (snapshot, setting, reference), written when first planned
    attempt-<n>.json  a claim, created exclusively (a hard link): whoever creates attempt n runs attempt n
    metrics.json      the result, published exactly once (hard link of a finished temporary file)
    failed.json       written when the last allowed attempt failed

Two schedulers racing both try to create the same attempt file and only one succeeds; a claim whose
owner is gone (a killed local process, a failed or cancelled Slurm job, a process on another host whose
heartbeat stopped) lets the next pass retry, up to a bounded number of attempts.
"""

import hashlib
import json
import os
import socket
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from .atomic import write_text_atomic, write_text_once

METRICS, FAILED, SETTING = "metrics.json", "failed.json", "setting.json"
# A claim without Slurm jobs (a scheduler between claiming and its backend's answer, a local-backend
# evaluation for hours) has its file touched every HEARTBEAT_S while held: another host cannot check its
# pid, so there it counts as alive only while the file's mtime is under STALE_S old (well above a beat,
# to bear a busy filesystem and some clock skew between hosts).
HEARTBEAT_S, STALE_S = 60.0, 600.0


def eval_root(run_dir: Path) -> Path:
    return Path(run_dir) / "eval"


def attempts(key_dir: Path) -> list[int]:
    return sorted(int(p.stem.split("-")[1]) for p in Path(key_dir).glob("attempt-*.json"))


def read_claim(key_dir: Path, n: int) -> dict:
    """Claim n's owner record plus its file's mtime (its heartbeat) as "_mtime", never written back; {}
    without a claim."""
    path = Path(key_dir) / f"attempt-{n}.json"
    try:
        text, mtime = path.read_text(), path.stat().st_mtime
    except FileNotFoundError:
        return {}
    try:
        owner = json.loads(text or "{}")
    except json.JSONDecodeError:  # being written: a claim all the same
        owner = {}
    return {**owner, "_mtime": mtime}


def local_owner() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "time": time.time()}


def local_alive(owner: dict) -> bool:
    """A claim without Slurm jobs is alive while its process is: on this host by its pid (and a process
    started before the claim: not one that reuses the pid), from another host while its heartbeat
    (read_claim's "_mtime", else the claim's time) is under STALE_S old."""
    if owner.get("host") != socket.gethostname():
        seen = owner.get("_mtime", owner.get("time"))
        return seen is None or time.time() - seen < STALE_S  # None: no claim read (withdrawn meanwhile)
    try:
        import psutil

        started = psutil.Process(int(owner["pid"])).create_time()
    except (psutil.Error, KeyError, ValueError, TypeError):
        return False
    # a process that started after the claim was made holds a reused pid: the claim's own is gone
    return started <= float(owner.get("time", started)) + 1.0


def try_claim(key_dir: Path, n: int) -> bool:
    """Create claim n, whole, unless another attempt did: the exclusive link makes one winner."""
    return write_text_once(Path(key_dir) / f"attempt-{n}.json", json.dumps(local_owner()))


@contextmanager
def heartbeat(key_dir: Path, n: int):
    """Touch claim n every HEARTBEAT_S while the block runs, so that other hosts see it alive; the thread
    is stopped on leaving, before the caller replaces the claim (update_claim)."""
    path, stop = Path(key_dir) / f"attempt-{n}.json", threading.Event()

    def beat():
        while not stop.wait(HEARTBEAT_S):
            try:
                os.utime(path)
            except OSError:  # a filesystem hiccup: the next beat tries again
                pass

    thread = threading.Thread(target=beat, name=f"heartbeat {path}", daemon=True)  # dies with the process
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def update_claim(key_dir: Path, n: int, owner: dict) -> None:
    write_text_atomic(Path(key_dir) / f"attempt-{n}.json", json.dumps(owner))


def publish(key_dir: Path, record: dict) -> bool:
    """Publish metrics.json exactly once; False if another attempt already did."""
    return write_text_once(Path(key_dir) / METRICS, json.dumps(record, indent=2) + "\n")


def posthoc_width(snapshot_name: str) -> str | None:
    """The sigma_rel of a snapshot `adm posthoc` synthesised (img…-posthoc-0.070), else None: evaluated like
    any snapshot, but at its training snapshot's image count, so curves keep it apart."""
    return snapshot_name.split("-posthoc-", 1)[1] if "-posthoc-" in snapshot_name else None


def results(run_dir: Path) -> list[dict]:
    """Every finished evaluation of this evaluator version (an older version's are evaluated again, not
    mixed with these), one per (snapshot, setting, reference): of two keys for the same evaluation (an
    older naming of the key) the newer counts. Each gets a `label`: the setting's name, plus the
    reference's file name where that name met several references, plus a short hash of the setting where
    one name stands for several (different steps, say)."""
    from .settings import EVALUATOR_VERSION, numbers_identity

    found = []
    for p in eval_root(run_dir).glob(f"*/{METRICS}"):
        r = _record(p, _finished_fields)
        if r is not None and r.get("evaluator") == EVALUATOR_VERSION:
            found.append((p.stat().st_mtime, r))
    latest = {}
    for _, r in sorted(found, key=lambda x: x[0]):
        latest[(r["snapshot_name"], numbers_identity(r["setting"]), r.get("ref"))] = r
    out = list(latest.values())
    refs: dict[str, set] = {}
    variants: dict[tuple, set] = {}
    for r in out:
        refs.setdefault(r["setting"]["name"], set()).add(r.get("ref"))
        variants.setdefault((r["setting"]["name"], r.get("ref")), set()).add(numbers_identity(r["setting"]))
    short = {name: short_names(paths) for name, paths in refs.items()}
    for r in out:
        setting = numbers_identity(r["setting"])
        r["label"] = (r["setting"]["name"]
                      + (f" vs {short[r['setting']['name']][r.get('ref')]}" if len(refs[r["setting"]["name"]]) > 1
                         else "")
                      + (f" [{hashlib.sha256(setting.encode()).hexdigest()[:6]}]"
                         if len(variants[(r["setting"]["name"], r.get("ref"))]) > 1 else ""))
    return sorted(out, key=lambda r: (r["label"], r.get("images") or 0))


def short_names(paths) -> dict:
    """Each path by its shortest trailing part that tells it from the others: the file name, or as many
    folders above it as it takes (ref.npz in imagenet64/ and in imagenet64-val/: imagenet64/ref.npz, ...)."""
    parts = {p: Path(p or "?").parts for p in paths}
    out = {}
    for p, mine in parts.items():
        for k in range(1, len(mine) + 1):
            if all(theirs[-k:] != mine[-k:] for q, theirs in parts.items() if q != p):
                break
        out[p] = "/".join(mine[-k:]) if mine else "?"
    return out


def failures(run_dir: Path) -> list[dict]:
    """The evaluations of this evaluator version that ran out of attempts (an older version's are evaluated
    again under a new key, so their failures are history, not news)."""
    from .settings import EVALUATOR_VERSION

    out = []
    for p in sorted(eval_root(run_dir).glob(f"*/{FAILED}")):
        r = _record(p, _failed_fields)
        if r is not None and (r.get("evaluator") or _spec_evaluator(p.parent)) == EVALUATOR_VERSION:
            out.append(r)
    return out


def _spec_evaluator(key_dir: Path) -> str | None:
    try:
        return json.loads((Path(key_dir) / SETTING).read_text()).get("evaluator")
    except (OSError, ValueError):
        return None


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _named_setting(r: dict) -> str | None:
    if not isinstance(r.get("snapshot_name"), str):
        return "snapshot_name: expected a string"
    if not isinstance(r.get("setting"), dict) or not isinstance(r["setting"].get("name"), str):
        return "setting: expected an object with a name"
    return None


def _finished_fields(r: dict) -> str | None:
    """What a metrics.json needs to be listed and reported (farm.metrics_task writes it so), or what is wrong."""
    if problem := _named_setting(r):
        return problem
    if not isinstance(r.get("key"), str):
        return "key: expected a string"
    if r.get("images") is not None and not (isinstance(r["images"], int) and not isinstance(r["images"], bool)):
        return f"images: expected a whole number of training images, got {r['images']!r}"
    metrics = r.get("metrics")
    if not isinstance(metrics, dict) or not _number(metrics.get("num_samples")):
        return "metrics: expected an object with num_samples"
    if bad := [k for k, v in metrics.items() if not _number(v)]:
        return f"metrics {', '.join(bad)}: expected numbers"
    return None


def _failed_fields(r: dict) -> str | None:
    """What a failed.json needs (schedule._give_up writes it so), or what is wrong."""
    if problem := _named_setting(r):
        return problem
    if not _number(r.get("attempts")):
        return "attempts: expected a number"
    return None


def _record(path: Path, problem) -> dict | None:
    """A registry record, or None (left out, and said, naming the file and the field) when it cannot be read
    or lacks what its readers need (`problem(record)` says what): one damaged file (a disk that filled, an
    edit) must not stop every report and result listing of the run."""
    try:
        record = json.loads(path.read_text())
        if not isinstance(record, dict):
            raise ValueError("expected a JSON object")
        if reason := problem(record):
            raise ValueError(reason)
        return record
    except (OSError, ValueError) as e:  # json's errors are ValueErrors
        print(f"{path}: unreadable ({e}); left out (delete it to evaluate that again)", file=sys.stderr)
        return None
