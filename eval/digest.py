"""Content digests of reference files, each file hashed once per version (path, size, mtime, inode)."""

import hashlib
from pathlib import Path

from .atomic import write_text_atomic


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def remembered_digest(path: Path, cache_dir: Path) -> str:
    """The content digest of a reference, hashed once per version of the file: remembered in cache_dir
    under its path, size, mtime and inode (a 10k-image 256x256 reference is 2 GB, about 4 s of sha256,
    otherwise paid by every metrics job). Rewriting or replacing the file changes the key."""
    st = path.stat()
    ident = f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}:{st.st_ino}"
    memo = cache_dir / f"digest-{hashlib.sha256(ident.encode()).hexdigest()[:16]}.txt"
    if memo.is_file():
        return memo.read_text().strip()
    digest = file_digest(path)
    cache_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(memo, digest + "\n")
    return digest
