"""ImageNet as ILSVRC distributes it, read in place: `ILSVRC2012_img_train.tar` (one uncompressed tar per
class inside, `n01440764.tar`, ...) and `ILSVRC2012_img_val.tar` (the 50,000 validation JPEGs, flat).

Nothing is extracted (1.28M small files are what a shared filesystem handles worst): an image is a byte
range of the big file, found from the tar headers (an inner tar's member lies at its own offset inside
the outer one), and the shard writer reads that range directly. Images are named as extracting would
name them (`n01440764/n01440764_10026.JPEG`, `ILSVRC2012_val_00000001.JPEG`), so a write from the tars
gives the same shards as one from the extracted folders.
"""

import os
import re
import tarfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

WNID_TAR = re.compile(r"^(n\d{8})\.tar$")


def _open(path: Path, fileobj=None) -> tarfile.TarFile:
    try:
        return tarfile.open(path if fileobj is None else None, mode="r:", fileobj=fileobj)
    except tarfile.ReadError as e:
        raise ValueError(f"{path}: not an uncompressed tar ({e}); ImageNet's ILSVRC2012_img_*.tar files are "
                         "plain tars (a .tar.gz would have to be unpacked to a .tar or a folder first)") from None


def _files(tar: tarfile.TarFile) -> dict[str, tarfile.TarInfo]:
    """Regular members by name (a name appended twice: the later one, as extraction would leave)."""
    return {m.name: m for m in tar if m.isfile()}


def class_tars(path: Path) -> dict[str, tarfile.TarInfo]:
    """WNID -> the outer member holding that class's tar; anything else in the outer tar is an error."""
    with _open(path) as tar:
        members = _files(tar)
    found, other = {}, []
    for name, member in members.items():
        match = WNID_TAR.match(os.path.basename(name))
        if match:
            found[match.group(1)] = member
        elif not os.path.basename(name).startswith("."):
            other.append(name)
    if other or not found:
        raise ValueError(f"{path}: expected ILSVRC2012_img_train.tar's layout, one <wnid>.tar per class, found "
                         + (f"{', '.join(sorted(other)[:3])}" if other else "no <wnid>.tar member"))
    return found


def _class_images(path: Path, wnid: str, member: tarfile.TarInfo, is_image) -> list[tuple[str, int, int]]:
    """(name as extracted, offset in the outer file, size) of one class tar's images."""
    with open(path, "rb") as f:
        f.seek(member.offset_data)
        with _open(Path(f"{path}:{member.name}"), fileobj=f) as inner:
            files = _files(inner)
    end = member.offset_data + member.size
    out = []
    for name, m in files.items():
        if m.offset_data + m.size > end:  # an inner tar without its end blocks: the next class is not its own
            break
        if is_image(os.path.basename(name)):
            out.append((f"{wnid}/{name}", m.offset_data, m.size))
    return sorted(out)


def train_images(path: Path, is_image) -> tuple[list[str], list[tuple[str, int, int, str]]]:
    """The class WNIDs (sorted) and every image as (name, offset, size, wnid), by class then name."""
    classes = class_tars(path)
    ids = sorted(classes)
    with ThreadPoolExecutor(8) as pool:  # a header read each: latency-bound where the file is remote
        per_class = list(pool.map(lambda c: _class_images(path, c, classes[c], is_image), ids))
    return ids, [(name, off, size, wnid) for wnid, images in zip(ids, per_class) for name, off, size in images]


def val_images(path: Path, is_image) -> list[tuple[str, int, int]]:
    """Every image of a flat tar (ILSVRC2012_img_val.tar) as (name, offset, size), by name."""
    with _open(path) as tar:
        members = _files(tar)
    if any(WNID_TAR.match(os.path.basename(n)) for n in members):
        raise ValueError(f"{path}: holds per-class tars (<wnid>.tar): it is a train tar; use --split train")
    return sorted((name, m.offset_data, m.size) for name, m in members.items() if is_image(os.path.basename(name)))


def read_range(path: str, offset: int, size: int) -> bytes:
    """One image's bytes from inside a tar; a file cut short raises (the writer skips and names it)."""
    with open(path, "rb") as f:
        data = os.pread(f.fileno(), size, offset)
    if len(data) != size:
        raise ValueError(f"the tar ends inside this image ({len(data)} of {size} bytes): {path} is truncated")
    return data
