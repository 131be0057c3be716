"""`adm data write`: images -> WebDataset tar shards + manifest.json, in parallel, resumable.

The global order is a seeded shuffle of the source list (class-mixed), cut into shards of a fixed
number of samples; shard i is a pure function of (source list, seed, shard size, preprocessing).
Each worker writes `shard-XXXXXX.tar` into a `.partial` file, renames it, then writes its
`.done.json` sidecar (count, bytes, sha256, member offsets, skipped images). The manifest is
written last and atomically: a directory without manifest.json is an interrupted write, which
`--resume` completes by writing only the shards that have no valid sidecar.
"""

import fcntl
import gc
import hashlib
import io
import json
import logging
import os
import random
import re
import signal
import sys
import tarfile
import threading
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import numpy as np
from PIL import Image

from .imagenet_tars import close_tars, read_range
from .parent_death import signal_on_parent_death
from .patient_read import StillUnreadable, read_patiently
from .preprocess import center_crop_arr, check_scale, encode, limit_side, parse_preprocess, to_rgb
from .sources import Item, Source

FORMAT = "adm-webdataset"
VERSION = 1
log = logging.getLogger(__name__)
MANIFEST = "manifest.json"
LOCK = "write.lock"  # held (flock) by the write and its workers: a second write into OUT is refused
# A source image the filesystem refuses (EIO, ESTALE, a mount that blinks) is asked for again after these
# pauses, then the write stops (--resume goes on): skipping it would make the dataset depend on a passing fault.
# With --skip-unreadable (for a file that will never read again: a bad sector) it is skipped and listed instead.
READ_RETRY_DELAYS_S = (1, 2, 4, 8, 15)


def shard_name(i: int) -> str:
    return f"shard-{i:06d}.tar"


def atomic_write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


@dataclass
class ShardTask:
    out: str
    index: int
    entries: list[tuple[str, Item]]  # (key, item)
    preprocess: str
    root: str
    class_ids: list[str]
    image_format: str = "png"
    skip_unreadable: bool = False  # a file still unreadable after the tries: skipped and listed, not a stop


def _gone_for_good(item: Item, e: OSError) -> bool:
    """A broken or looping link, a file removed from a directory that is still there, one we may not read:
    skipped as a bad image. Anything else (the directory gone too, an I/O error) may pass: asked for again;
    so is a tar of ImageNet's, whose going would take every image after it."""
    path = item.path
    if item.offset >= 0:
        return False
    if os.path.lexists(path) and not os.path.exists(path):  # a link to nowhere, or to itself
        return True
    if isinstance(e, FileNotFoundError):
        return os.path.isdir(os.path.dirname(os.path.abspath(path)))
    return isinstance(e, (IsADirectoryError, NotADirectoryError, PermissionError))


# Formats stored byte for byte. MPO is a camera's JPEG with a preview picture appended (Canon, Nikon, Sony,
# phones): every JPEG reader decodes its first, full-size picture.
KEPT_AS_IS = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png"}


def _image_sample(item: Item, kind: str, size: int, image_format: str = "png",
                  if_unreadable: str = "the write stops") -> tuple[str, bytes, tuple[int, int]]:
    """(extension, encoded bytes, original (w, h)); raises on an unreadable image (StillUnreadable: on a
    file the filesystem keeps refusing)."""
    data = read_patiently(item.path, READ_RETRY_DELAYS_S, if_unreadable, lambda e: _gone_for_good(item, e),
                          (lambda: read_range(item.path, item.offset, item.size)) if item.offset >= 0 else None)
    if not data:
        raise ValueError("zero-byte file")
    with Image.open(io.BytesIO(data)) as im:
        original = im.size
        fmt = (im.format or "").upper()
        if kind == "none":
            ext = KEPT_AS_IS.get(fmt)
            if ext is None:  # (fully decoded: a re-encode must never start from a reduced-scale draft)
                return "png", encode(to_rgb(im), "png"), original
            # decode at reduced scale: catches truncated or corrupt data at a fraction of the cost
            im.draft("RGB", (max(1, im.size[0] // 8), max(1, im.size[1] // 8)))
            im.load()
            return ext, data, original
        if kind == "center-crop":
            check_scale(original, size)  # before decoding it
        rgb = to_rgb(im)
    if kind == "center-crop":  # lossless, so the loader gets exactly these pixels
        crop = center_crop_arr(rgb, size)
        if image_format == "npy":  # raw uint8: larger than PNG, but read with no decoding at all
            buf = io.BytesIO()
            np.save(buf, np.ascontiguousarray(crop))
            return "npy", buf.getvalue(), original
        return "png", encode(crop, "png"), original
    small = limit_side(rgb, size)
    if small is rgb and KEPT_AS_IS.get(fmt) == "jpg":
        return "jpg", data, original  # already small enough: keep the original bytes
    return "jpg", encode(small, "jpg", quality=95), original


class _Hashed:
    """A file written through once, into a sha256 as the bytes pass (no second read of the shard to hash it:
    ImageNet's originals are 140 GB)."""

    def __init__(self, f):
        self.f, self.sha = f, hashlib.sha256()

    def write(self, data) -> int:
        self.sha.update(data)
        return self.f.write(data)

    def tell(self) -> int:
        return self.f.tell()


def _add(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    info.mode = 0o444
    tar.addfile(info, io.BytesIO(payload))


def write_shard(task: ShardTask) -> dict:
    out = Path(task.out)
    kind, size = parse_preprocess(task.preprocess)
    final = out / shard_name(task.index)
    partial = final.with_name(final.name + ".partial")
    offsets, keys, skipped = [], [], []
    with open(partial, "wb") as f, tarfile.open(fileobj=(hashed := _Hashed(f)), mode="w",
                                                format=tarfile.USTAR_FORMAT) as tar:
        for key, item in task.entries:
            rel = item.name or (os.path.relpath(item.path, task.root) if task.root else item.path)
            if item.label < 0:
                skipped.append({"path": rel, "reason": "missing label"})
                continue
            try:
                ext, payload, original = _image_sample(item, kind, size, task.image_format,
                                                       "skipped (--skip-unreadable)" if task.skip_unreadable
                                                       else "the write stops")
            except StillUnreadable as e:
                if not task.skip_unreadable:
                    raise  # the shard stays .partial, and --resume writes it once the file reads
                log.warning("%s", e.strerror)
                cause = e.__cause__
                skipped.append({"path": rel, "reason": f"I/O error on every try over {sum(READ_RETRY_DELAYS_S):g} s "
                                                        f"({getattr(cause, 'strerror', None) or cause})"})
                continue
            except Exception as e:  # any decoder failure: skip and report, never stop the write
                reason = re.sub(r"<[^<>]* at 0x[0-9a-f]+>", "it", f"{type(e).__name__}: {e}")  # no addresses:
                skipped.append({"path": rel, "reason": reason})  # the same write gives the same manifest
                continue
            offsets.append(tar.offset)
            keys.append(key)
            meta = {"source": rel, "original_size": list(original), "class": item.label,
                    "class_id": task.class_ids[item.label]}
            _add(tar, f"{key}.{ext}", payload)
            _add(tar, f"{key}.cls", str(item.label).encode())
            _add(tar, f"{key}.json", json.dumps(meta).encode())
        tar.close()  # (its end blocks, into the digest too)
        f.flush()
        os.fsync(f.fileno())  # on disk before its name says complete (a crash after the rename keeps it whole)
    close_tars()
    os.replace(partial, final)
    stats = {"name": final.name, "count": len(keys), "bytes": final.stat().st_size, "sha256": hashed.sha.hexdigest(),
             "first_key": keys[0] if keys else None, "offsets": offsets, "skipped": skipped}
    atomic_write_json(final.with_name(final.name + ".done.json"), stats)
    return stats


def _writer_init(parent: int) -> None:
    """Writer processes leave Ctrl-C to the parent, which stops them all and says how to resume, and die with
    it however it dies: orphans would finish their shards beside the --resume it asks for."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal_on_parent_death(signal.SIGKILL, parent)


def _interrupt(signum, frame):
    raise KeyboardInterrupt  # SIGTERM (kill, a job's end) stops the write like Ctrl-C: workers stopped, resumable


def lock_out(out: Path) -> int | None:
    """Take OUT's write lock for this process and the workers it forks (they inherit it, so it lasts as long
    as the last of them); None where the filesystem has no flock. Refuses while another write holds it."""
    fd = os.open(out / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise ValueError(f"{out}: another `adm data write` is writing here (or its worker processes still run); "
                         "wait for it to end, or stop it, then rerun with --resume") from None
    except OSError:  # no flock on this filesystem: unlocked
        os.close(fd)
        return None
    return fd


def plan_shards(source: Source, shard_size: int, seed: int) -> list[list[tuple[str, Item]]]:
    """Seeded global shuffle (class-mixed), keyed by position, cut into shards."""
    order = list(range(len(source.items)))
    random.Random(seed).shuffle(order)
    keyed = [(f"{pos:09d}", source.items[i]) for pos, i in enumerate(order)]
    return [keyed[i:i + shard_size] for i in range(0, len(keyed), shard_size)]


def _valid_done(out: Path, i: int) -> dict | None:
    done = out / (shard_name(i) + ".done.json")
    tar = out / shard_name(i)
    if not (done.is_file() and tar.is_file()):
        return None
    try:
        stats = json.loads(done.read_text())
    except json.JSONDecodeError:
        return None
    return stats if stats.get("bytes") == tar.stat().st_size else None


def check_write_options(out: str | Path, shard_size: int, workers: int, preprocess: str, image_format: str,
                        resume: bool, seed: int | None = None) -> None:
    """Everything about a write that can be refused before the source tree is read (minutes on ImageNet)."""
    if image_format not in ("png", "npy"):
        raise ValueError(f"--image-format must be png or npy, got {image_format!r}")
    out = Path(out)
    kind, _ = parse_preprocess(preprocess)
    if shard_size <= 0 or workers <= 0:
        raise ValueError("--shard-size and --workers must be positive")
    if image_format == "npy" and kind != "center-crop":
        raise ValueError(f"--image-format npy stores center-cropped pixels: it needs --preprocess center-crop:R, "
                         f"got --preprocess {preprocess}")
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out}: OUT is a file, expected a new or empty directory")
    above = next(p for p in [out, *out.absolute().parents] if p.exists())  # the folder OUT would be made in
    if not above.is_dir() or not os.access(above, os.W_OK | os.X_OK):
        why = "not a directory" if not above.is_dir() else "not writable"
        raise ValueError(f"{out}: cannot be created in {above} ({why})")
    if (out / MANIFEST).exists():
        raise ValueError(f"{out} already holds a complete dataset ({MANIFEST}); choose another OUT")
    interrupted = (out / "write-settings.json").exists()
    if out.exists() and any(p.name != LOCK for p in out.iterdir()) and not (resume and interrupted):
        raise ValueError(f"{out} holds an interrupted write (shards without {MANIFEST}): rerun with --resume to "
                         "complete it, or choose an empty OUT" if interrupted else
                         f"{out} is not empty and holds no write of ours; choose a new or empty OUT")
    if resume and interrupted:  # the settings the source does not decide, compared before it is listed
        now = {"seed": seed, "shard_size": shard_size, "preprocess": preprocess, "image_format": image_format}
        _same_settings(out, json.loads((out / "write-settings.json").read_text()), now)


def _same_settings(out: Path, previous: dict, now: dict) -> None:
    changed = {k: (previous.get(k), v) for k, v in now.items() if v is not None and previous.get(k) != v}
    if changed:
        raise ValueError(f"{out}: --resume with different settings than the interrupted write ("
                         + ", ".join(f"{k}: {a!r} then, {b!r} now" for k, (a, b) in changed.items()) + ")")


def _size(path: str) -> int:
    try:
        return os.stat(path).st_size
    except OSError:  # a broken link: skipped when written
        return -1


def _sizes(paths: list[str]) -> list[int]:
    """A stat each, 16 at a time: on NFS or Lustre a stat is a round trip (ImageNet's 1.28M: minutes one by
    one, seconds this way; on a local disk it costs about a second more)."""
    chunks = [paths[i:i + 4096] for i in range(0, len(paths), 4096)]
    with ThreadPoolExecutor(16) as pool:
        return [n for sizes in pool.map(lambda chunk: [_size(p) for p in chunk], chunks) for n in sizes]


def source_digest(source: Source) -> str:
    """The sample list (names, labels, file sizes) and class table: a --resume must read the same images
    with the same labels (a copy with other pixels at the same names differs in size, nearly always)."""
    root = Path(source.root).resolve()
    base = str(root if root.is_dir() else root.parent)
    prefix = base.rstrip(os.sep) + os.sep
    in_tar = source.items and source.items[0].name  # names and sizes from the tar's headers: no stat at all
    sizes = [i.size for i in source.items] if in_tar else _sizes([i.path for i in source.items])
    rel = [(i.name or (i.path[len(prefix):] if i.path.startswith(prefix) else os.path.relpath(i.path, base)), i.label,
            n) for i, n in zip(source.items, sizes)]
    return hashlib.sha256(json.dumps([rel, [c["id"] for c in source.classes]]).encode()).hexdigest()


def write_dataset(source: Source, out: str | Path, shard_size: int = 1000, workers: int = 1, preprocess: str = "none",
                  resume: bool = False, seed: int = 0, progress: bool = True, tool_version: str = "",
                  image_format: str = "png", skip_unreadable: bool = False) -> dict:
    """image_format applies to center-crop: png (lossless, compact) or npy (raw uint8, fastest to load).
    skip_unreadable: a source file the filesystem still refuses after READ_RETRY_DELAYS_S (a bad sector) is
    skipped and listed instead of stopping the write; a fault policy, not a setting, so a --resume may add it."""
    check_write_options(out, shard_size, workers, preprocess, image_format, resume, seed)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    lock = lock_out(out)
    try:
        return _write_locked(source, out, shard_size, workers, preprocess, seed, progress, tool_version, image_format,
                             skip_unreadable)
    finally:
        if lock is not None:
            os.close(lock)


def _write_locked(source: Source, out: Path, shard_size: int, workers: int, preprocess: str, seed: int,
                  progress: bool, tool_version: str, image_format: str, skip_unreadable: bool) -> dict:
    kind, _ = parse_preprocess(preprocess)
    if progress and len(source.items) >= 100_000:  # seconds from a local disk, minutes over NFS: said
        print(f"planning {len(source.items)} images into shards and reading their sizes (so that a --resume "
              "reads the same source) ...", file=sys.stderr, flush=True)
    plan = plan_shards(source, shard_size, seed)
    settings = {"seed": seed, "shard_size": shard_size, "preprocess": preprocess, "num_source_items": len(source.items),
                "image_format": image_format, "source_sha256": source_digest(source)}
    settings_path = out / "write-settings.json"
    if settings_path.exists():
        previous = json.loads(settings_path.read_text())
        if previous.get("source_sha256", settings["source_sha256"]) != settings["source_sha256"]:
            raise ValueError(f"{out}: --resume with another source than the interrupted write (other images, labels "
                             "or classes); give the same source, or write to a new OUT")
        previous.setdefault("source_sha256", settings["source_sha256"])  # written before the digest was kept
        _same_settings(out, previous, settings)
    else:
        atomic_write_json(settings_path, settings)
    class_ids = [c["id"] for c in source.classes]
    done = {i: s for i in range(len(plan)) if (s := _valid_done(out, i))}
    root = Path(source.root).resolve()  # as the items' paths are: a symlinked root names images alike
    tasks = [ShardTask(str(out), i, entries, preprocess, str(root if root.is_dir() else root.parent), class_ids,
                       image_format, skip_unreadable)
             for i, entries in enumerate(plan) if i not in done]
    results = dict(done)
    bar = None
    if progress:
        from adm.progress import progress as progress_bar
        bar = progress_bar(total=len(source.items), initial=sum(len(plan[i]) for i in done), unit="img",
                   desc=f"writing {len(plan)} shards")
    pool = None if workers == 1 else ProcessPoolExecutor(workers, get_context("fork"), initializer=_writer_init,
                                                         initargs=(os.getpid(),))
    main_thread = threading.current_thread() is threading.main_thread()
    on_term = signal.signal(signal.SIGTERM, _interrupt) if main_thread else None
    if pool is not None:
        # the writers are forked with this process's image list (ImageNet's: about 0.5 GB of Python objects); a
        # garbage collection in a child would touch them all and copy every page (measured: 0.33 GB a child):
        # frozen, the collector leaves them alone
        gc.freeze()
    try:
        if pool is None:
            iterator = map(write_shard, tasks)
        else:
            iterator = (f.result() for f in as_completed([pool.submit(write_shard, t) for t in tasks]))
        for stats in iterator:
            results[int(stats["name"][6:12])] = stats
            if bar:
                bar.update(stats["count"] + len(stats["skipped"]))
    except BrokenProcessPool:
        raise RuntimeError(f"{out}: a writer process died (killed: out of memory?) with {len(plan) - len(results)} of "
                           f"{len(plan)} shards unwritten; rerun the same command with --resume") from None
    except KeyboardInterrupt:
        raise KeyboardInterrupt(f"{len(results)} of {len(plan)} shards written to {out}; rerun the same command "
                                "with --resume to complete it") from None
    except StillUnreadable as e:  # a RuntimeError: the command's one-line error
        raise RuntimeError(f"{e.strerror}: {len(results)} of {len(plan)} shards written to {out}; rerun the same "
                           "command with --resume once the source reads again (add --skip-unreadable to leave out "
                           "files that never will)") from None
    except OSError as e:  # writing failed (a full disk, a quota): what is done stays, --resume completes it
        raise RuntimeError(f"{e.filename or out}: {e.strerror or e}; {len(results)} of {len(plan)} shards written to "
                           f"{out}; once that is fixed (free space?), rerun the same command with --resume") from None
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, on_term)
        close_tars()  # one left open by a shard written in this process that stopped on an error
        if pool:  # on an error, stop the shards in flight (they stay .partial; --resume rewrites them)
            if len(results) < len(plan):
                for proc in list((pool._processes or {}).values()):  # no public kill before Python 3.14
                    proc.kill()
            pool.shutdown(wait=True, cancel_futures=True)
            gc.unfreeze()
        if bar:
            bar.close()
    shards = [results[i] for i in range(len(plan))]
    skipped = [s for st in shards for s in st["skipped"]]
    if not any(st["count"] for st in shards):  # no manifest: an empty dataset would stall every reader
        for i in range(len(plan)):  # nor anything a rerun would take for work done, once the cause is fixed
            for name in (shard_name(i), shard_name(i) + ".done.json"):
                (out / name).unlink(missing_ok=True)
        settings_path.unlink(missing_ok=True)
        (out / LOCK).unlink(missing_ok=True)
        raise ValueError(f"{source.root}: none of its {len(source.items)} images could be read (first: "
                         f"{skipped[0]['path']}: {skipped[0]['reason']}); no dataset written to {out}")
    manifest = {
        "format": FORMAT, "version": VERSION, "tool_version": tool_version,
        "source": {"layout": source.layout, "root": source.root, "items": len(source.items)},
        "preprocess": preprocess, "image_format": {"none": "original (jpg/png)", "center-crop": image_format,
                                                    "max-side": "jpg"}[kind],
        "seed": seed, "shard_size": shard_size,
        "num_samples": sum(s["count"] for s in shards), "num_classes": len(source.classes),
        "classes": source.classes,
        "shards": [{k: s[k] for k in ("name", "count", "bytes", "sha256", "first_key", "offsets")} for s in shards],
        "skipped_count": len(skipped), "skipped": skipped,
    }
    atomic_write_json(out / MANIFEST, manifest)
    for i in range(len(plan)):  # the manifest now holds everything the sidecars did
        (out / (shard_name(i) + ".done.json")).unlink(missing_ok=True)
    settings_path.unlink(missing_ok=True)
    (out / LOCK).unlink(missing_ok=True)  # a finished dataset holds its shards and manifest only
    return manifest
