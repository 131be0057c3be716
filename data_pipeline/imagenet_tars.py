"""ImageNet as ILSVRC distributes it, read in place: `ILSVRC2012_img_train.tar` (one uncompressed tar per
class inside, `n01440764.tar`, ...) and `ILSVRC2012_img_val.tar` (the 50,000 validation JPEGs, flat).

Nothing is extracted (1.28M small files are what a shared filesystem handles worst): an image is a byte
range of the big file, found from the tar headers (an inner tar's member lies at its own offset inside
the outer one), and the shard writer reads that range directly. Images are named as extracting the flat
tars names them (`n01440764/n01440764_10026.JPEG`, `ILSVRC2012_val_00000001.JPEG`), so a write from the
tars gives the same shards as one from the extracted folders. A tar cut short (an interrupted download)
or damaged is refused at listing, before any image is written.
"""

import os
import re
import tarfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

WNID_TAR = re.compile(r"^(n\d{8})\.tar$")
END = bytes(512)  # a tar ends with zero blocks


def _damaged(where: str, what: str) -> ValueError:
    return ValueError(f"{where}: {what}; an interrupted download or a damaged copy? compare its size and checksum "
                      "with ImageNet's (an uncompressed tar is expected: a .tar.gz must be unpacked first)")


def _files(f, where: str, start: int, end: int) -> dict[str, tarfile.TarInfo]:
    """The regular members of the tar that occupies bytes [start, end) of the open file f, by base name,
    checked whole: every member's data inside it, and the end-of-archive marker where the headers stop."""
    f.seek(start)
    members: dict[str, tarfile.TarInfo] = {}
    try:
        with tarfile.open(fileobj=f, mode="r:") as tar:
            for m in tar:
                name = os.path.basename(os.path.normpath(m.name))
                if m.isdir() or name.startswith("."):
                    continue
                if not m.isfile() or m.issparse():  # links and sparse files are not a byte range of their own
                    raise ValueError(f"{where}: member {m.name} is a {'sparse file' if m.isfile() else 'link'}; "
                                     "ImageNet's tars hold plain files only")
                if name in members:
                    raise ValueError(f"{where}: {name} appears twice ({members[name].name}, {m.name})")
                if m.offset_data + m.size > end:
                    raise _damaged(where, f"member {m.name} runs past the end of the tar")
                members[name] = m
            stop = tar.offset
    except tarfile.TarError as e:
        raise _damaged(where, f"unreadable tar ({e})") from None
    if stop + len(END) > end or os.pread(f.fileno(), len(END), stop) != END:
        raise _damaged(where, f"no end-of-archive marker after its {len(members)} member(s) (at byte {stop - start})")
    return members


def class_tars(path: Path) -> dict[str, tarfile.TarInfo]:
    """WNID -> the outer member holding that class's tar; anything else in the outer tar is an error."""
    with open(path, "rb") as f:
        members = _files(f, str(path), 0, os.fstat(f.fileno()).st_size)
    found = {m.group(1): member for name, member in members.items() if (m := WNID_TAR.match(name))}
    other = sorted(name for name in members if not WNID_TAR.match(name))
    if other or not found:
        raise ValueError(f"{path}: expected ILSVRC2012_img_train.tar's layout, one <wnid>.tar per class, found "
                         + (f"{', '.join(other[:3])}" if other else "no <wnid>.tar member"))
    return found


def _class_images(path: Path, wnid: str, member: tarfile.TarInfo, is_image) -> list[tuple[str, int, int]]:
    """(name as extracted, offset in the outer file, size) of one class tar's images."""
    with open(path, "rb") as f:
        files = _files(f, f"{path}: {member.name}", member.offset_data, member.offset_data + member.size)
    return sorted((f"{wnid}/{name}", m.offset_data, m.size) for name, m in files.items() if is_image(name))


def train_images(path: Path, is_image) -> tuple[list[str], list[tuple[str, int, int, str]]]:
    """The class WNIDs (sorted) and every image as (name, offset, size, wnid), by class then name."""
    classes = class_tars(path)
    ids = sorted(classes)
    with ThreadPoolExecutor(8) as pool:  # a header read each: latency-bound where the file is remote
        per_class = list(pool.map(lambda c: _class_images(path, c, classes[c], is_image), ids))
    return ids, [(name, off, size, wnid) for wnid, images in zip(ids, per_class) for name, off, size in images]


def val_images(path: Path, is_image) -> list[tuple[str, int, int]]:
    """Every image of a flat tar (ILSVRC2012_img_val.tar) as (name, offset, size), by name."""
    with open(path, "rb") as f:
        members = _files(f, str(path), 0, os.fstat(f.fileno()).st_size)
    if any(WNID_TAR.match(n) for n in members):
        raise ValueError(f"{path}: holds per-class tars (<wnid>.tar): it is a train tar; use --split train")
    return sorted((name, m.offset_data, m.size) for name, m in members.items() if is_image(name))


_open_tar: dict = {}  # (pid, path) -> descriptor: one tar open per writer process at a time


def read_range(path: str, offset: int, size: int) -> bytes:
    """One image's bytes from inside a tar. A read error closes the descriptor (a retry opens it afresh:
    an NFS handle may have gone stale); a file shorter than the listing said raises."""
    key = (os.getpid(), path)
    if key not in _open_tar:
        close_tars()
        _open_tar[key] = os.open(path, os.O_RDONLY)
    fd, parts, got = _open_tar[key], [], 0
    try:
        while got < size:  # a network filesystem may return less than asked
            part = os.pread(fd, size - got, offset + got)
            if not part:
                raise ValueError(f"the tar ends inside this image ({got} of {size} bytes): {path} is truncated")
            parts.append(part)
            got += len(part)
    except OSError:
        close_tars()
        raise
    return b"".join(parts)


def close_tars() -> None:
    for (pid, _), fd in list(_open_tar.items()):
        if pid == os.getpid():  # a forked child leaves its parent's descriptors alone
            os.close(fd)
    _open_tar.clear()
