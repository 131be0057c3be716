"""ADM-format npz files (reference batches, sample files, statistics): opened and checked from their
.npy headers, so a wrong file is refused, by name and key, before any image is featurized.

A file holds images (`arr_0`: uint8 NHWC, optional `arr_1`: labels), statistics (`mu`, `sigma` of
pool_3, `mu_s`, `sigma_s` of the spatial features), or both (ADM's reference batches).
"""

import json
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

STAT_PAIRS = (("mu", "sigma"), ("mu_s", "sigma_s"))
FEATURE_DIMS = {"mu": 2048, "mu_s": 2023}  # pool_3; mixed_6/conv's first 7 channels, 17x17 (ADM's sFID)
READ_ERRORS = (zipfile.BadZipFile, zlib.error, EOFError, OSError)  # a damaged archive, met while reading


def open_npz(path: str | Path) -> np.lib.npyio.NpzFile:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no such file")
    with open(p, "rb") as f:
        head = f.read(6)
    if head == b"\x93NUMPY":
        raise ValueError(f"{p}: a single .npy array, not an npz archive; expected an npz with arr_0 (images) "
                         "or mu and sigma (statistics), as np.savez writes")
    if not zipfile.is_zipfile(p):
        raise ValueError(f"{p}: not an npz file (not a zip archive)")
    try:
        return np.load(p)
    except (ValueError, *READ_ERRORS) as e:
        raise ValueError(f"{p}: not a readable npz file ({e})") from None


def read_npy_header(f) -> tuple[tuple[int, ...], bool, np.dtype]:
    """(shape, fortran order, dtype) of the .npy stream f, left at the array's first byte."""
    version = np.lib.format.read_magic(f)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran, dtype = read(f)
    return tuple(shape), fortran, dtype


def stored_header(data: np.lib.npyio.NpzFile, key: str) -> tuple[tuple[int, ...], np.dtype]:
    """An array's shape and dtype from its .npy header, without reading the array (a 10k-image 256x256
    reference's arr_0 is 2 GB, and np.load reads all of it to give its shape)."""
    with data.zip.open(f"{key}.npy") as f:
        shape, _, dtype = read_npy_header(f)
        return shape, dtype


def stored_shape(data: np.lib.npyio.NpzFile, key: str) -> tuple[int, ...]:
    return stored_header(data, key)[0]


class StreamedArray:
    """An array of an npz read front to back, a slice at a time, as ADM's evaluator reads its batches: the
    memory of one batch, not of 50,000 images (39 GB at 512x512). zipfile checks the member's CRC once
    it is read to its end, so damage is still found. Slices must come in order (extract's batches do)."""

    def __init__(self, data: np.lib.npyio.NpzFile, key: str):
        self.data, self.member = data, f"{key}.npy"  # the NpzFile itself: it closes its zip when collected
        self.shape, self.dtype = stored_header(data, key)
        self.ndim, self._file = len(self.shape), None
        self._row = self.dtype.itemsize * int(np.prod(self.shape[1:]))

    def __len__(self) -> int:
        return self.shape[0]

    def _seek(self, row: int) -> None:
        if self._file is not None and self._at == row:
            return
        if self._file is not None:
            self._file.close()
        self._file, self._at = self.data.zip.open(self.member), 0
        read_npy_header(self._file)
        left = row * self._row  # skipped a MiB at a time: a resumed run starting at row 49,000 holds no 49,000 rows
        while left:
            n = len(self._file.read(min(left, 1 << 20)))
            if not n:
                raise EOFError(f"{self.member} ends before row {row} of {len(self)}")
            left -= n
        self._at = row

    def _read(self, rows: int) -> np.ndarray:
        out = np.empty((rows, *self.shape[1:]), self.dtype)  # writable, filled in place (no bytes copy)
        view, got = memoryview(out.reshape(-1).view(np.uint8)), 0
        while got < len(view):
            n = self._file.readinto(view[got:])
            if not n:
                raise EOFError(f"{self.member} ends after {self._at + got // self._row} of {len(self)} rows")
            got += n
        self._at += rows
        if self._at == len(self):
            self._file.read()  # past the end: zipfile compares the CRC now
        return out

    def __getitem__(self, index: slice) -> np.ndarray:
        start, stop, step = index.indices(len(self))
        if step != 1:
            raise IndexError("StreamedArray reads contiguous slices only")
        self._seek(start)
        return self._read(max(0, stop - start))


def images_of(data: np.lib.npyio.NpzFile) -> np.ndarray | StreamedArray:
    """arr_0, streamed unless numpy stored it in Fortran order (then read whole). The member is read through
    once first, in constant memory, so that zipfile's CRC check finds damage before any image is featurized
    (a sequential read: seconds for 50,000 images, against the hours Inception takes on them)."""
    with data.zip.open("arr_0.npy") as f:
        fortran = read_npy_header(f)[1]
        while f.read(1 << 24):
            pass
    return data["arr_0"] if fortran else StreamedArray(data, "arr_0")


@dataclass
class NpzInfo:
    path: Path
    keys: list[str]
    images: tuple[int, ...] | None = None  # (N, H, W, 3) of arr_0
    dims: dict = field(default_factory=dict)  # "mu" / "mu_s": the feature dimension of the statistics given
    meta: dict = field(default_factory=dict)

    def feature_dim(self, key: str) -> int | None:
        """The dimension of the statistics this file yields for `key` (mu or mu_s): stored, or computed
        from its images."""
        return self.dims.get(key) or (FEATURE_DIMS[key] if self.images else None)


def describe(path: str | Path, data: np.lib.npyio.NpzFile | None = None) -> NpzInfo:
    """Every check that the headers allow: the keys, arr_0's dtype and shape, each mu/sigma pair's
    shapes, the meta entry; a clear error naming the file and key otherwise."""
    p = Path(path)
    data = open_npz(p) if data is None else data
    info = NpzInfo(p, sorted(data.files))
    try:
        headers = {k: stored_header(data, k) for k in data.files}
    except (ValueError, *READ_ERRORS) as e:
        raise ValueError(f"{p}: damaged npz ({e})") from None
    for k, (_, dtype) in headers.items():
        if dtype.hasobject:
            raise ValueError(f"{p}: {k} holds Python objects (saved with pickling); expected numeric arrays")
    if "meta" in data.files:
        try:
            info.meta = json.loads(str(data["meta"]))
        except json.JSONDecodeError as e:
            raise ValueError(f"{p}: meta is not JSON ({e})") from None
    if "arr_0" in headers:
        shape, dtype = headers["arr_0"]
        if dtype != np.uint8 or len(shape) != 4 or shape[-1] != 3:
            raise ValueError(f"{p}: arr_0 must be uint8 images (N, H, W, 3), got {dtype} {shape}")
        info.images = shape
    for mu, sigma in STAT_PAIRS:
        if (mu in headers) != (sigma in headers):
            raise ValueError(f"{p}: {mu} and {sigma} come together; it has only {mu if mu in headers else sigma}")
        if mu in headers:
            for k in (mu, sigma):
                if headers[k][1].kind not in "fiu":
                    raise ValueError(f"{p}: {k} holds {headers[k][1]}; expected real numbers (float64, as ADM's "
                                     "statistics)")
            m, s = headers[mu][0], headers[sigma][0]
            if len(m) != 1 or s != (m[0], m[0]):
                raise ValueError(f"{p}: {mu} is {m} and {sigma} is {s}; expected {mu} (d,) and {sigma} (d, d)")
            info.dims[mu] = m[0]
    if info.images is None and "mu" not in info.dims:
        raise ValueError(f"{p}: expected arr_0 (images) or mu and sigma (statistics); it has {info.keys}")
    if "mu" not in info.dims and info.images[0] < 2:
        raise ValueError(f"{p}: arr_0 holds {info.images[0]} image(s); a covariance needs at least 2")
    return info


def stored_statistics(path: Path, data: np.lib.npyio.NpzFile, info: NpzInfo) -> dict[str, np.ndarray]:
    """The statistics a file stores (mu, sigma and mu_s, sigma_s where given), read and checked: a few tens
    of MB, so a bad pair is refused before any of its (or the other file's) images is featurized."""
    out = {}
    for mu, sigma in STAT_PAIRS:
        if mu in info.dims:
            try:
                out[mu], out[sigma] = data[mu], data[sigma]
            except (ValueError, *READ_ERRORS) as e:
                raise ValueError(f"{path}: damaged npz ({type(e).__name__}: {e})") from None
            check_statistics(path, out[mu], out[sigma], (mu, sigma))
    return out


def check_statistics(path: Path, mu: np.ndarray, sigma: np.ndarray, names: tuple[str, str]) -> None:
    """Stored statistics must be finite, and sigma a covariance: symmetric, with no negative variance."""
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        bad = names[0] if not np.isfinite(mu).all() else names[1]
        raise ValueError(f"{path}: {bad} has non-finite values (NaN or inf)")
    scale = max(float(np.abs(sigma).max()), 1e-300)
    if float(np.abs(sigma - sigma.T).max()) > 1e-6 * scale or float(np.diag(sigma).min()) < -1e-9 * scale:
        raise ValueError(f"{path}: {names[1]} is not a covariance matrix (asymmetric, or negative variances)")
