"""Training state on disk, committed atomically (DESIGN invariant 6).

Every rank writes into run/checkpoints/.tmp-<tag>/ (DeepSpeed's shards under <tag>/, our per-rank
file, rank 0's client state); after a barrier rank 0 writes a manifest of every file with its size,
renames the directory to run/checkpoints/<tag>, and atomically replaces LATEST. Discovery trusts only
directories whose manifest checks out, newest first, so a crash at any instant leaves the previous
checkpoint usable.
"""

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import time
from pathlib import Path

CKPT = "checkpoints"
LATEST = "LATEST"
MANIFEST = "manifest.json"


def tag_for(images: int) -> str:
    return f"img{images:012d}"


def images_of(tag: str) -> int:
    return int(tag[3:])


def tmp_dir(run_dir: Path, tag: str) -> Path:
    return run_dir / CKPT / f".tmp-{tag}"


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """path holds data whole or keeps what it held (rank 0 writes it alone): a temporary name, flushed,
    then renamed; a failed write takes its temporary file with it."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, data: dict) -> None:
    write_bytes_atomic(path, json.dumps(data, indent=1).encode())


def commit(run_dir: Path, tag: str, world_size: int, written: dict[str, int] | None = None,
           wait_s: float = 120.0) -> Path:
    """Rank 0, after every rank has written into tmp_dir: manifest, rename, LATEST. `written`: the files every
    rank wrote and flushed, with their sizes (fsync_files' answers, gathered), which the manifest must list
    even where rank 0's view of a shared filesystem lags behind other nodes' writes (NFS's attribute and
    directory caches): each is waited for, up to wait_s, until rank 0 sees it whole."""
    tmp = tmp_dir(run_dir, tag)
    files = {str(p.relative_to(tmp)): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
    deadline = time.monotonic() + wait_s
    for name, size in sorted((written or {}).items()):
        while (seen := _size(tmp / name)) != size:
            if time.monotonic() > deadline:
                raise RuntimeError(f"checkpoint {tag}: {tmp / name} was written ({size} bytes) and flushed by its "
                                   f"rank, but rank 0 sees {'no such file' if seen is None else f'{seen} bytes'} "
                                   f"after {wait_s:g} s: the run directory's filesystem does not show one node's "
                                   "writes to another (mount it with close-to-open consistency); nothing was "
                                   "committed, the checkpoint before it is intact")
            time.sleep(0.5)
        files[name] = size
    files = dict(sorted(files.items()))
    # saved: which save this is (a tag saved again after a rollback has the same files and sizes), so that
    # a universal conversion of the older one is never taken for this one's
    write_json_atomic(tmp / MANIFEST, {"tag": tag, "images": images_of(tag), "world_size": world_size,
                                       "saved": f"{time.time_ns()}-{os.getpid()}", "files": files})
    final = run_dir / CKPT / tag
    old = None
    if final.exists():  # the same count again (a run rolled back to an older LATEST): moved aside, not
        old = run_dir / CKPT / f".tmp-old-{tag}"  # deleted first, so the tag is missing for two renames only
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    _fsync_dir(final.parent)
    write_bytes_atomic(run_dir / CKPT / LATEST, (tag + "\n").encode())  # (flushed: the commit survives a crash)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    shutil.rmtree(run_dir / CKPT / f"universal-{tag}", ignore_errors=True)  # the older save's, if any
    return final


@contextlib.contextmanager
def without_zip_crc():
    """torch.save (ours and DeepSpeed's) without the zip CRC32: torch.load never checks it, and computing it
    takes a third of a save's time. The manifest's sizes and the fsync guard the files instead."""
    try:
        from torch.utils.serialization import config
    except ImportError:  # an older torch: always computes it
        yield
        return
    before = config.save.compute_crc32
    config.save.compute_crc32 = False
    try:
        yield
    finally:
        config.save.compute_crc32 = before


# the files one rank writes: our rank{r}.pt, DeepSpeed's zero_pp_rank_{r}_* (optimizer, and ZeRO-3's model
# states; bf16_zero_pp_rank_{r}_* under bf16 at ZeRO 1/2); everything else (DeepSpeed's mp_rank_00_*, latest,
# its scripts, client.json) is rank 0's
_RANK_FILE = re.compile(r"^rank(\d+)\.pt$|^(?:bf16_)?zero_pp_rank_(\d+)_")


def writer_rank(name: str) -> int:
    found = _RANK_FILE.search(name)
    return int(found.group(1) or found.group(2)) if found else 0


def _size(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return None


def fsync_files(directory: Path, rank: int) -> dict[str, int]:
    """Flush the files this rank wrote under `directory` to the disk (collective use: call it on every rank
    after all files are written, then barrier): a node crash right after the commit must not leave a
    checkpoint whose listed files hold unwritten pages. Each rank flushes its own files, since on Lustre,
    GPFS or BeeGFS an fsync reaches only the calling node's cached pages. Returns {relative name: size} of
    what it flushed, for the manifest (commit's `written`)."""
    flushed = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file() and writer_rank(p.name) == rank):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            flushed[str(path.relative_to(directory))] = os.fstat(fd).st_size
        finally:
            os.close(fd)
    return flushed


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class CheckpointError(ValueError):
    """The run directory has checkpoints, but none can be resumed from."""


def problem(run_dir: Path, tag: str) -> str | None:
    """Why run/checkpoints/<tag> is not a complete checkpoint, or None when it is."""
    return problem_at(run_dir / CKPT / tag)


def problem_at(d: Path) -> str | None:
    """Why the checkpoint directory d (committed or not yet renamed into place) is not complete, or None."""
    if not d.is_dir():
        return "missing"
    try:
        manifest = json.loads((d / MANIFEST).read_text())
        files = manifest["files"]
    except OSError:
        return f"no {MANIFEST} (an interrupted save)"
    except (json.JSONDecodeError, KeyError, TypeError):
        return f"{MANIFEST} unreadable"
    for name, size in files.items():
        f = d / name
        if not f.is_file():
            return f"{name} missing"
        if f.stat().st_size != size:
            return f"{name} is {f.stat().st_size} bytes, {MANIFEST} says {size}"
    if "client.json" in files:  # what the resume reads first: unreadable, it is not a checkpoint to resume
        try:
            client = json.loads((d / "client.json").read_text())
            missing = [k for k in ("images", "step", "fixed_hash", "loader") if k not in client]
        except (OSError, ValueError, TypeError) as e:
            return f"client.json unreadable ({e})"
        if missing:
            return f"client.json lacks {', '.join(missing)}"
    return None


def read_options(run_dir: Path) -> dict:
    """The last launch's training_options.json, or {} (said) when it is missing or unreadable: it only fills
    in what checkpoints from before client.json kept the fields did not record, and is rewritten each launch."""
    path = run_dir / "training_options.json"
    if not path.is_file():
        return {}
    try:
        options = json.loads(path.read_text())
        if not isinstance(options, dict):
            raise ValueError("not an object")
        return options
    except (OSError, ValueError) as e:
        logging.getLogger(__name__).warning("%s: unreadable (%s); ignored (it is written again now)", path, e)
        return {}


def valid(run_dir: Path, tag: str) -> dict | None:
    """The manifest of a complete checkpoint, or None."""
    if problem(run_dir, tag) is not None:
        return None
    return json.loads((run_dir / CKPT / tag / MANIFEST).read_text())


def _tags(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.is_dir() and p.name.startswith("img"))


def valid_tags(run_dir: Path) -> list[str]:
    """The complete checkpoints, oldest first."""
    root = run_dir / CKPT
    return [t for t in _tags(root) if problem(run_dir, t) is None] if root.is_dir() else []


def find_latest(run_dir: Path, skipped: list[str] | None = None) -> tuple[str, dict] | None:
    """LATEST if valid, else the newest valid checkpoint (a partial or corrupt one is skipped, and said
    why in `skipped`)."""
    root = run_dir / CKPT
    if not root.is_dir():
        return None
    candidates = []
    latest = root / LATEST
    if latest.is_file():
        candidates.append(latest.read_text().strip())
    candidates += [t for t in reversed(_tags(root)) if t not in candidates]
    for i, tag in enumerate(candidates):
        why = problem(run_dir, tag)
        if why is None:
            return tag, valid(run_dir, tag)
        if skipped is not None:
            skipped.append(f"{tag}: {why}" + (f" ({LATEST} named it)" if i == 0 and latest.is_file() else ""))
    return None


def finish_interrupted_commits(run_dir: Path) -> list[str]:
    """A commit that replaced a checkpoint of the same image count (a run rolled back to an older LATEST) and
    died between its two renames leaves the tag missing: the old one aside at .tmp-old-<tag>, the new one
    at .tmp-<tag>. Put the new one in place if it is complete (its manifest is written before the renames),
    else the old one back, as the commit would have; prune would otherwise delete both. Rank 0, under the
    run lock, before discovery. Returns what it did, one line per tag."""
    root, done = run_dir / CKPT, []
    for old in sorted(root.glob(".tmp-old-img*")) if root.is_dir() else []:
        tag = old.name[len(".tmp-old-"):]
        if (root / tag).exists():  # the commit got past its renames: only its clean-up is left (prune's)
            continue
        new = tmp_dir(run_dir, tag)
        keep = new if problem_at(new) is None else old
        os.replace(keep, root / tag)
        _fsync_dir(root)
        done.append(f"{tag}: a commit interrupted between its renames; put {'the new' if keep is new else 'the old'}"
                    " checkpoint in place")
    return done


def resume_point(run_dir: Path, skipped: list[str] | None = None) -> tuple[str, dict] | None:
    """find_latest, or a clear error when the run has checkpoints and none is complete: starting again
    from image 0 in their directory would mix two runs (and the old ones would be pruned as newest)."""
    skipped = [] if skipped is None else skipped
    found = find_latest(run_dir, skipped)
    if found is None and skipped:
        raise CheckpointError(f"{run_dir / CKPT}: no complete checkpoint to resume from ({'; '.join(skipped)}); "
                              "restore one, or start again in a new run_dir")
    return found


def prune(run_dir: Path, keep_last: int, keep_every_images: int, keep: str | None = None) -> None:
    """Delete old complete checkpoints, keeping the newest `keep_last`, one every `keep_every_images` images
    (the first at or past each multiple: checkpoints fall where a step crosses checkpoint_kimg, seldom on a
    multiple itself) and `keep` (the one just written). Incomplete ones are left for the user to look at."""
    root = run_dir / CKPT
    tags = valid_tags(run_dir)
    every = keep_every_images
    milestones = {t for prev, t in zip([None, *tags], tags) if every and images_of(t) // every > (
        images_of(prev) // every if prev else 0)}
    for tag in tags[:-keep_last] if keep_last > 0 else []:
        if tag == keep or tag in milestones:
            continue
        shutil.rmtree(root / tag, ignore_errors=True)
        shutil.rmtree(root / f"universal-{tag}", ignore_errors=True)
    for p in root.iterdir():  # leftovers of interrupted saves
        if p.name.startswith(".tmp-") and p.is_dir():
            shutil.rmtree(p, ignore_errors=True)


def saved_layout(run_dir: Path, tag: str) -> dict:
    """The world size, ZeRO stage and precision checkpoint `tag` was saved at (DeepSpeed's files differ by
    each; a resume that changes one loads through the universal checkpoint). Checkpoints from before
    client.json kept the last two take them from the last launch's training_options.json."""
    client = json.loads((run_dir / CKPT / tag / "client.json").read_text())
    if "zero_stage" not in client:
        client = {**read_options(run_dir), **client}
    manifest = json.loads((run_dir / CKPT / tag / MANIFEST).read_text())
    return {"world size": manifest["world_size"], **{k: client[key] for k, key in
                                                     (("ZeRO stage", "zero_stage"), ("precision", "precision"))
                                                     if key in client}}


def refusal(run_dir: Path, tag: str, cfg) -> str | None:
    """Why checkpoint `tag` cannot be resumed with TrainConfig `cfg` (what TrainConfig.fixed names differs,
    field by field), or None."""
    from .config import describe, fixed_changes

    client = json.loads((run_dir / CKPT / tag / "client.json").read_text())
    options = run_dir / "training_options.json"
    stage = saved_layout(run_dir, tag).get("ZeRO stage")
    if stage and (stage == 3) != (cfg.zero_stage == 3):
        return (f"{run_dir}: {tag} was saved at ZeRO stage {stage}: DeepSpeed's universal checkpoint converts "
                f"between stages 1 and 2 but not to or from stage 3 (zero_stage={cfg.zero_stage} now); keep "
                f"zero_stage={stage}, or start a new run_dir")
    if client["fixed_hash"] == cfg.fixed_hash():
        return None
    was = client.get("fixed")
    o = read_options(run_dir) if was is None else {}  # checkpoints written before client.json kept the fields
    if o:
        was = {"task": o.get("task"), "model": o.get("model", {}), "diffusion": o.get("diffusion")}
    changes = {}
    if was:  # recorded by an older version (fewer fixed fields, dropout among them): compare what it has
        changes = fixed_changes(was, cfg)
        if not changes:
            return None
    what = describe(changes) if changes else f"task/model/diffusion differ from {options}"
    return (f"{run_dir}: {tag} was trained with settings a resume cannot change ({what}): the task, the "
            "architecture, the diffusion, the data order (seed, num_slots) and the EMA rates stay; use a new run_dir")


def universal_dir(run_dir: Path, tag: str) -> Path:
    """DeepSpeed's universal checkpoint of `tag` (converted once, atomically; rank 0 only), for a resume
    at another world size: `python -m deepspeed.checkpoint.ds_to_universal`, with a worker per core (up to 8).
    A failure leaves its message in `.failed-universal-TAG` for the ranks waiting in wait_universal()."""
    import subprocess
    import sys

    final = run_dir / CKPT / f"universal-{tag}"
    failed = run_dir / CKPT / f".failed-universal-{tag}"  # an earlier attempt's: cleared by clear_failed_conversions
    if _converted(run_dir, tag):
        return final
    shutil.rmtree(final, ignore_errors=True)  # a conversion of another save of this tag (before a rollback)
    tmp = run_dir / CKPT / f".tmp-universal-{tag}"
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "ds").parent.mkdir(parents=True, exist_ok=True)
    workers = str(max(1, min(8, len(os.sched_getaffinity(0)))))
    proc = subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal",
                           "--input_folder", str(run_dir / CKPT / tag / "ds"), "--output_folder", str(tmp / "ds"),
                           "--num_extract_workers", workers, "--num_merge_workers", workers],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        message = f"converting {run_dir / CKPT / tag} to a universal checkpoint failed:\n{proc.stderr[-2000:]}"
        write_bytes_atomic(failed, message.encode())  # whole: the waiting ranks raise what it says
        raise RuntimeError(message)
    (tmp / "latest").write_text("ds")
    (tmp / SOURCE).write_text(_manifest_digest(run_dir, tag))
    os.replace(tmp, final)
    return final


SOURCE = "source-manifest.sha256"  # in a universal conversion: the manifest of the save it was converted from


def _manifest_digest(run_dir: Path, tag: str) -> str:
    return hashlib.sha256((run_dir / CKPT / tag / MANIFEST).read_bytes()).hexdigest()


def _converted(run_dir: Path, tag: str) -> bool:
    """Whether universal-<tag> holds a finished conversion of the checkpoint now at <tag> (not of an older
    save of the same tag, moved aside in a rollback and trained again)."""
    final = run_dir / CKPT / f"universal-{tag}"
    try:
        return (final / "ds").is_dir() and (final / SOURCE).read_text() == _manifest_digest(run_dir, tag)
    except OSError:
        return False


def clear_failed_conversions(run_dir: Path) -> None:
    """Rank 0, before the ranks learn the resume point: an earlier attempt's failure must not stop this one."""
    for marker in (run_dir / CKPT).glob(".failed-universal-*"):
        marker.unlink(missing_ok=True)


def wait_universal(run_dir: Path, tag: str, poll_s: float = 1.0, limit_s: float = 6 * 3600) -> Path:
    """The other ranks' side of universal_dir(): wait on the shared disk, not in a collective, so that a long
    conversion (minutes for a published model) does not run into the process group's timeout (DeepSpeed's
    default is 10 minutes)."""
    final = run_dir / CKPT / f"universal-{tag}"
    failed = run_dir / CKPT / f".failed-universal-{tag}"
    deadline = time.monotonic() + limit_s
    while not _converted(run_dir, tag):
        if failed.is_file():
            raise RuntimeError(failed.read_text())
        if time.monotonic() > deadline:
            raise RuntimeError(f"{final}: rank 0's universal conversion has not appeared after {limit_s:.0f} s")
        time.sleep(poll_s)
    return final


def saved_device(rank_state: dict) -> str:
    """The kind of device ("cpu" or "cuda") a rank file was saved on: recorded since 2026-12-04; before,
    told by its generator's state (a CUDA generator's is 16 bytes, a CPU one's 5056)."""
    return rank_state.get("device") or ("cuda" if rank_state["gen"].numel() == 16 else "cpu")


def missed_snapshot(run_dir: Path, images: int, total_images: int, snapshot_kimg: float) -> bool:
    """Whether the snapshot due at the checkpoint of `images` is missing: the checkpoint is committed before
    the snapshot of the same step is written, so a snapshot write that failed (a full disk) or was cut short
    (a SIGKILL) would otherwise never be written; for the final one, the weights the evaluation reads. Due:
    the final count's, else one at or past the last multiple of snapshot_kimg (if any) up to `images`."""
    from models.snapshot import SnapshotError, verify_snapshot

    every = max(1, int(snapshot_kimg * 1000))
    due_from = images if images >= total_images else images // every * every
    if due_from <= 0:
        return False
    for d in sorted((run_dir / "snapshots").glob("img*")):
        if d.name[3:].isdigit() and due_from <= int(d.name[3:]) <= images:
            try:
                verify_snapshot(d)
                return False
            except (SnapshotError, OSError, ValueError):
                continue
    return True
