"""`adm data verify` and `adm data info`: check shards against the manifest; summarise a dataset."""

import hashlib
import io
import json
import tarfile
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from multiprocessing import get_context
from pathlib import Path

import numpy as np
from PIL import Image

from .writer import FORMAT, MANIFEST


REQUIRED = ("num_samples", "num_classes", "classes", "shards", "preprocess", "image_format", "skipped_count", "source",
            "tool_version")


def read_manifest(directory: str | Path) -> dict:
    directory = Path(directory)
    path = directory / MANIFEST
    if not path.is_file():
        extra = " (an interrupted write: `adm data write ... --resume` completes it)" if directory.is_dir() and any(
            directory.glob("shard-*.tar")) else ""
        raise FileNotFoundError(f"{directory}: no {MANIFEST}; not a complete dataset{extra}")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e}); an incomplete copy? `adm data verify` checks the shards "
                         "once it is restored") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        got = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise ValueError(f"{path}: format {got!r}, expected {FORMAT!r}")
    missing = [k for k in REQUIRED if k not in manifest]
    if missing:
        raise ValueError(f"{path}: lacks {', '.join(missing)}; an edited or foreign manifest? rewrite the dataset")
    _check_fields(path, manifest)
    if not manifest["num_samples"]:
        raise ValueError(f"{path}: a dataset of 0 samples; nothing to read")
    return manifest


def _check_fields(path: Path, manifest: dict) -> None:
    """The fields every reader relies on have the types the writer gives them (an edited manifest otherwise
    fails later with a bare KeyError or TypeError)."""
    def bad(field, expected):
        raise ValueError(f"{path}: {field} is {json.dumps(_get(manifest, field))[:80]}, expected {expected}; an "
                         "edited manifest? rewrite the dataset")

    def count(value) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value >= 0

    for field in ("num_samples", "num_classes"):
        if not count(manifest[field]):
            bad(field, "a count (a non-negative integer)")
    if not isinstance(manifest["classes"], list) or len(manifest["classes"]) != manifest["num_classes"]:
        bad("classes", f"a list of num_classes = {manifest['num_classes']} entries")
    shards = manifest["shards"]
    if not isinstance(shards, list) or not shards:
        bad("shards", "a non-empty list")
    for i, shard in enumerate(shards):
        if not isinstance(shard, dict):
            bad(f"shards[{i}]", "an object with name, count, bytes")
        name = shard.get("name")
        if not isinstance(name, str) or not name or "/" in name or name in (".", ".."):
            bad(f"shards[{i}].name", "a file name in the dataset's directory")
        for field in ("count", "bytes"):
            if not count(shard.get(field)):
                bad(f"shards[{i}].{field}", "a non-negative integer")


def _get(manifest: dict, field: str):
    value = manifest
    for part in field.replace("[", ".").replace("]", "").split("."):
        value = value[int(part)] if isinstance(value, list) else value.get(part)
    return value


def check_resolution(directory: str | Path, manifest: dict, resolution: int, field: str) -> None:
    """Shards preprocessed at write time to a size below `resolution` would have every image upscaled:
    refused, naming `field` (the model's image size, the reference's --resolution)."""
    from .preprocess import parse_preprocess

    kind, size = parse_preprocess(manifest.get("preprocess", "none"))
    if kind != "none" and size < resolution:
        what = f"center-cropped to {size}x{size}" if kind == "center-crop" else f"with short sides of at most {size}"
        raise ValueError(f"{directory} holds images {what} ({manifest['preprocess']}), smaller than {field}="
                         f"{resolution}; write the shards at that size or larger")


class _Hashing(io.RawIOBase):
    """A file read through once, into a sha256 as the bytes pass."""

    def __init__(self, f):
        self.f, self.sha = f, hashlib.sha256()

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        n = self.f.readinto(buffer)
        if n:
            self.sha.update(memoryview(buffer)[:n])
        return n


def _samples(tar: tarfile.TarFile):
    """(key, {extension: bytes}) of a tar read as a stream: a sample's members lie together, as written."""
    key, parts = None, {}
    for m in tar:
        name, _, ext = m.name.partition(".")
        if name != key and parts:
            yield key, parts
            parts = {}
        key = name
        parts[ext] = tar.extractfile(m).read()
    if parts:
        yield key, parts


def _check_shard(directory: Path, shard: dict, k: int, decode: bool) -> tuple[list[str], int]:
    """One shard against its manifest entry: (problems, samples checked). Read once, as a stream, a sample at a
    time (a 1 GB shard was held twice: 16 GB at --workers 8); a sha256 that differs voids what was read."""
    problems, checked, count, broken = [], 0, 0, None
    path = directory / shard["name"]
    if not path.is_file():
        return [f"{shard['name']}: missing"], 0
    size = path.stat().st_size
    if size != shard["bytes"]:
        return [f"{shard['name']}: {size} bytes, manifest says {shard['bytes']} (truncated?)"], 0
    with open(path, "rb", buffering=0) as f:
        reader = _Hashing(f)
        try:
            with tarfile.open(fileobj=reader, mode="r|") as tar:
                for key, parts in _samples(tar):
                    count += 1
                    found, whole = _check_sample(parts, k, decode)
                    problems += [f"{shard['name']}/{key}: {p}" for p in found]
                    checked += whole
        except tarfile.TarError as e:
            broken = e
        while reader.read(1 << 20):  # what the tar reader left (its end blocks), into the digest
            pass
    if reader.sha.hexdigest() != shard["sha256"]:
        return [f"{shard['name']}: sha256 differs from the manifest (corrupt)"], 0
    if broken is not None:
        return [f"{shard['name']}: unreadable tar ({broken})"], 0
    if count != shard["count"]:
        problems.insert(0, f"{shard['name']}: {count} samples, manifest says {shard['count']}")
    return problems, checked


def _check_sample(parts: dict[str, bytes], k: int, decode: bool) -> tuple[list[str], bool]:
    """A sample's problems, and whether it was whole enough to check."""
    image = parts.get("jpg", parts.get("png", parts.get("npy")))
    if image is None or "cls" not in parts:
        return ["missing image or .cls"], False
    problems = []
    label = int(parts["cls"])
    if not 0 <= label < k:
        problems.append(f"label {label} outside 0..{k - 1}")
    if decode:
        try:
            if "npy" in parts:
                np.load(io.BytesIO(image))
            else:
                with Image.open(io.BytesIO(image)) as im:
                    im.load()
        except Exception as e:
            problems.append(f"image does not decode ({e})")
    return problems, True


def verify(directory: str | Path, decode: bool = True, workers: int = 1, progress: bool = False) -> dict:
    """Every shard: present, size, sha256, member count, and (decode=True) every image decodes and
    every label is in range, `workers` shards at a time. Returns a report with `ok` and the problems found
    (in shard order, whatever the worker count)."""
    directory = Path(directory)
    if workers < 1:
        raise ValueError(f"--workers must be at least 1, got {workers}")
    try:
        manifest = read_manifest(directory)
    except (FileNotFoundError, ValueError, json.JSONDecodeError) as e:
        return {"ok": False, "shards": 0, "samples_checked": 0, "num_samples": 0, "problems": [str(e)]}
    problems, checked = [], 0
    k = manifest["num_classes"]
    if sum(s["count"] for s in manifest["shards"]) != manifest["num_samples"]:
        problems.append(f"manifest: num_samples {manifest['num_samples']}, its shards count "
                        f"{sum(s['count'] for s in manifest['shards'])}")
    if len(manifest["classes"]) != k:
        problems.append(f"manifest: num_classes {k}, its class table has {len(manifest['classes'])}")
    check = partial(_check_shard, directory, k=k, decode=decode)
    pool = None if workers == 1 else ProcessPoolExecutor(workers, get_context("fork"))
    try:
        results = (pool.map(check, manifest["shards"]) if pool else map(check, manifest["shards"]))
        if progress:
            from adm.progress import progress as bar
            results = bar(results, total=len(manifest["shards"]), unit="shard", desc="verifying")
        for found, n in results:
            problems += found
            checked += n
    finally:
        if pool:
            pool.shutdown(cancel_futures=True)
    return {"ok": not problems, "shards": len(manifest["shards"]), "samples_checked": checked,
            "num_samples": manifest["num_samples"], "problems": problems}


def info(directory: str | Path) -> dict:
    manifest = read_manifest(directory)
    return {
        "samples": manifest["num_samples"], "shards": len(manifest["shards"]), "classes": manifest["num_classes"],
        "preprocess": manifest["preprocess"], "image_format": manifest["image_format"],
        "bytes": sum(s["bytes"] for s in manifest["shards"]), "skipped": manifest["skipped_count"],
        "source": manifest["source"], "tool_version": manifest["tool_version"],
        "first_classes": [f"{c['index']}: {c['id']} ({c['name']})" for c in manifest["classes"][:5]],
        "path": str(directory),
    }
