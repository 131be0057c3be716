"""Training state on disk, committed atomically (DESIGN invariant 6).

Every rank writes into run/checkpoints/.tmp-<tag>/ (DeepSpeed's shards under <tag>/, our per-rank
file, rank 0's client state); after a barrier rank 0 writes a manifest of every file with its size,
renames the directory to run/checkpoints/<tag>, and atomically replaces LATEST. Discovery trusts only
directories whose manifest checks out, newest first, so a crash at any instant leaves the previous
checkpoint usable.
"""

import contextlib
import json
import os
import shutil
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


def write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def commit(run_dir: Path, tag: str, world_size: int) -> Path:
    """Rank 0, after every rank has written into tmp_dir: manifest, rename, LATEST."""
    tmp = tmp_dir(run_dir, tag)
    files = {str(p.relative_to(tmp)): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
    write_json_atomic(tmp / MANIFEST, {"tag": tag, "images": images_of(tag), "world_size": world_size,
                                       "files": files})
    final = run_dir / CKPT / tag
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(final.parent)
    tmp_latest = run_dir / CKPT / (LATEST + ".tmp")
    tmp_latest.write_text(tag + "\n")
    os.replace(tmp_latest, run_dir / CKPT / LATEST)
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


def fsync_files(directory: Path, rank: int, world_size: int) -> None:
    """Flush every file under `directory` to the disk, the ranks sharing the work (collective use: call it
    on every rank after all files are written, then barrier): a node crash right after the commit must not
    leave a checkpoint whose listed files hold unwritten pages."""
    files = sorted(p for p in directory.rglob("*") if p.is_file())
    for path in files[rank::world_size]:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def valid(run_dir: Path, tag: str) -> dict | None:
    """The manifest of a complete checkpoint, or None."""
    d = run_dir / CKPT / tag
    try:
        manifest = json.loads((d / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    for name, size in manifest["files"].items():
        f = d / name
        if not f.is_file() or f.stat().st_size != size:
            return None
    return manifest


def find_latest(run_dir: Path) -> tuple[str, dict] | None:
    """LATEST if valid, else the newest valid checkpoint (a partial or corrupt one is skipped)."""
    root = run_dir / CKPT
    if not root.is_dir():
        return None
    candidates = []
    latest = root / LATEST
    if latest.is_file():
        candidates.append(latest.read_text().strip())
    candidates += sorted((p.name for p in root.iterdir() if p.is_dir() and p.name.startswith("img")), reverse=True)
    for tag in candidates:
        manifest = valid(run_dir, tag)
        if manifest is not None:
            return tag, manifest
    return None


def prune(run_dir: Path, keep_last: int, keep_every_images: int) -> None:
    """Delete old checkpoints, keeping the newest `keep_last` and every `keep_every_images` images."""
    root = run_dir / CKPT
    tags = sorted(p.name for p in root.iterdir() if p.is_dir() and p.name.startswith("img"))
    for tag in tags[:-keep_last] if keep_last > 0 else []:
        if keep_every_images and images_of(tag) % keep_every_images == 0:
            continue
        shutil.rmtree(root / tag, ignore_errors=True)
        shutil.rmtree(root / f"universal-{tag}", ignore_errors=True)
    for p in root.iterdir():  # leftovers of interrupted saves
        if p.name.startswith(".tmp-") and p.is_dir():
            shutil.rmtree(p, ignore_errors=True)


def universal_dir(run_dir: Path, tag: str) -> Path:
    """DeepSpeed's universal checkpoint of `tag` (converted once, atomically; rank 0 only), for a resume
    at another world size: `python -m deepspeed.checkpoint.ds_to_universal`."""
    import subprocess
    import sys

    final = run_dir / CKPT / f"universal-{tag}"
    if (final / "ds").is_dir():
        return final
    tmp = run_dir / CKPT / f".tmp-universal-{tag}"
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "ds").parent.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal",
                           "--input_folder", str(run_dir / CKPT / tag / "ds"), "--output_folder", str(tmp / "ds"),
                           "--num_extract_workers", "1", "--num_merge_workers", "1"],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"converting {run_dir / CKPT / tag} to a universal checkpoint failed:\n{proc.stderr[-2000:]}")
    (tmp / "latest").write_text("ds")
    os.replace(tmp, final)
    return final
