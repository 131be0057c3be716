"""Files that appear whole or not at all, written by any number of processes on any number of hosts
sharing the run directory: each writer fills a temporary name of its own (host, pid and a random part:
two hosts may run the same pid), flushes it to disk, then renames it into place (or links it, where
only the first writer may win). Readers skip names holding ".partial"."""

import os
import socket
import uuid
import zipfile
from pathlib import Path

import numpy as np


def temporary(path: Path, suffix: str = "") -> Path:
    """A name beside path that no other writer uses; suffix keeps an extension some readers need (.npz)."""
    return path.with_name(f"{path.name}.partial-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}{suffix}")


def _written(path: Path, fill) -> Path:
    path = Path(path)
    tmp = temporary(path, ".npz" if path.suffix == ".npz" else "")
    try:
        with open(tmp, "wb") as f:
            fill(f)
            f.flush()
            os.fsync(f.fileno())  # on disk before its name says complete (a node crash keeps it whole)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def _into_place(tmp: Path, path: Path) -> None:
    """Rename a finished temporary file to its name; when that fails (the name is a directory, say), the
    temporary file goes too rather than lie beside it."""
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path: Path, text: str) -> None:
    write_bytes_atomic(path, text.encode())


def write_bytes_atomic(path: Path, data: bytes) -> None:
    _into_place(_written(path, lambda f: f.write(data)), path)


def standard_json(data, **dumps) -> str:
    """JSON every reader parses (jq, browsers, JavaScript): a NaN or infinite number, which Python's json
    writes as a bare NaN/Infinity outside the standard, becomes null."""
    import json
    import math

    def clean(x):
        if isinstance(x, float) and not math.isfinite(x):
            return None
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [clean(v) for v in x]
        return x

    return json.dumps(clean(data), allow_nan=False, **dumps)


def write_text_once(path: Path, text: str) -> bool:
    """Create path with text unless it exists (then False): the first of racing writers wins, whole."""
    tmp = _written(path, lambda f: f.write(text.encode()))
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    finally:
        tmp.unlink()


def save_npz_atomic(path: Path, **arrays) -> None:
    """np.savez (stored, not compressed) under a temporary name, flushed, then renamed."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    _into_place(_written(path, lambda f: np.savez(f, **arrays)), path)


def merge_npz_atomic(path: Path, sources: list[Path], keys: tuple[str, ...]) -> None:
    """The sources' arrays of each key concatenated along axis 0 into one npz (stored, as np.savez writes),
    streamed a source at a time: the memory of one shard, where np.concatenate of 50,000 images held them
    twice. Shapes past axis 0 and dtypes must agree."""
    from .npzfile import stored_header

    def fill(f):
        with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
            for key in keys:
                headers = []
                for src in sources:
                    with np.load(src) as data:
                        headers.append(stored_header(data, key))
                (shape, dtype), rest = headers[0], {(h[0][1:], h[1]) for h in headers}
                if len(rest) != 1:
                    raise ValueError(f"{path}: {key} differs in shape or dtype between its parts "
                                     f"({sorted(map(str, rest))})")
                header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False,
                          "shape": (sum(h[0][0] for h in headers), *shape[1:])}
                with zf.open(f"{key}.npy", "w", force_zip64=True) as out:
                    np.lib.format.write_array_header_1_0(out, header)
                    for src in sources:
                        with np.load(src) as data:
                            out.write(np.ascontiguousarray(data[key]).tobytes())

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    os.replace(_written(path, fill), path)
