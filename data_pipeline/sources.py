"""Readers for the image layouts people have: ImageNet train/val, any folder-per-class tree, a list file.

Each returns a Source: the sample list (path, class index) and the class table. Class indices follow
the sorted class-directory names (sorted WNIDs for ImageNet: the order ADM and torchvision use).
"""

import csv
import io
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".jfif", ".png", ".bmp", ".ppm", ".pgm", ".webp", ".gif", ".tif", ".tiff"}  # torchvision's, .jfif, .gif
WNID = re.compile(r"^n\d{8}$")


@dataclass
class Item:
    path: str  # absolute path of the image file (or of the tar holding it)
    label: int  # class index, or -1 when the label is missing (skipped and counted by the writer)
    offset: int = -1  # inside a tar (imagenet_tars.py): where the image's bytes start, and how many
    size: int = -1
    name: str = ""  # inside a tar: its name as extracted (relative to the split's folder)


@dataclass
class Source:
    items: list[Item]
    classes: list[dict]  # [{"index", "id" (WNID or folder name), "name"}]
    layout: str
    root: str
    notes: list[str] = field(default_factory=list)


def _hidden(name: str) -> bool:
    """Dot-entries (.ipynb_checkpoints, macOS's ._x.JPEG) and __MACOSX: not classes, not images."""
    return name.startswith(".") or name == "__MACOSX"


def _images(folder: Path, prefix: str = "") -> list[tuple[str, str]]:
    """(name, absolute path) of the images in folder and its sub-folders (as torchvision's ImageFolder
    finds them; name relative to folder), by name: one directory read and no stat per regular file
    (scandir's entry types), so listing ImageNet's 1.28M files takes seconds even where a stat is a network
    round trip. A symlinked image is followed to its target; a broken one keeps its name (the writer skips
    it with its reason, so that no file goes uncounted). Symlinked folders are not entered (a loop)."""
    base, found = folder.resolve(), []
    with os.scandir(folder) as entries:
        for e in entries:
            if e.is_dir(follow_symlinks=False) and not _hidden(e.name):
                found += _images(Path(e.path), f"{prefix}{e.name}/")
                continue
            if not _is_image(e.name):
                continue
            if e.is_symlink():
                link = Path(e.path)
                found.append((prefix + e.name, str(link.resolve() if link.exists() else base / e.name)))
            elif e.is_file():
                found.append((prefix + e.name, str(base / e.name)))
    return sorted(found)


def _class_dirs(root: Path) -> list[Path]:
    entries = [d for d in root.iterdir() if not _hidden(d.name)]
    dangling = sorted(d for d in entries if d.is_symlink() and not d.exists() and d.suffix.lower() not in IMAGE_SUFFIXES)
    if dangling:  # a class on a disk not mounted: left out, it would shift every later class's number
        raise ValueError(f"{dangling[0]}: a link to {os.readlink(dangling[0])}, which does not exist"
                         + (f" ({len(dangling)} such links)" if len(dangling) > 1 else "")
                         + "; mount what it points to, or remove the link")
    return sorted(d for d in entries if d.is_dir())


def _find_upwards(start: Path, name: str, levels: int = 4) -> Path | None:
    for d in [start, *start.parents][:levels + 1]:
        if (d / name).is_file():
            return d / name
    return None


def _synset_names(root: Path) -> dict[str, str]:
    """WNID -> readable name from ImageNet's LOC_synset_mapping.txt ("n01440764 tench, Tinca tinca")."""
    f = _find_upwards(root, "LOC_synset_mapping.txt")
    if f is None:
        return {}
    names = {}
    for line in f.read_text(encoding="utf-8-sig").splitlines():  # (a byte-order mark from a Windows editor)
        if line.strip():
            wnid, _, name = line.strip().partition(" ")
            names[wnid] = name or wnid
    return names


def _class_table(ids: list[str], names: dict[str, str]) -> list[dict]:
    return [{"index": i, "id": c, "name": names.get(c, c)} for i, c in enumerate(ids)]


def folder_per_class(root: Path, layout: str = "folder", train_ids: list[str] | None = None) -> Source:
    """train_ids: for ImageNet's val split without LOC_synset_mapping.txt, the train split's classes, so
    that both splits number them alike."""
    class_dirs = _class_dirs(root)
    if not class_dirs:
        raise ValueError(f"{root}: expected one sub-folder per class, found none")
    names = _synset_names(root)
    ids = [d.name for d in class_dirs]
    if names:  # the canonical 1000-class table, so train and val agree even if a folder is absent
        _only_mapped_classes(root, ids, names)
        ids = sorted(names)
    elif train_ids:
        _only_train_classes(root, ids, train_ids)
        ids = train_ids
    index = {c: i for i, c in enumerate(ids)}
    items = [Item(path, index[d.name]) for d in class_dirs for _, path in _images(d)]
    if not items:
        raise ValueError(f"{root}: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in its class folders")
    return Source(items, _class_table(ids, names), layout, str(root))


def _only_known_classes(where, ids, known, table: str, then: str) -> None:
    """Refuses classes outside `known` (table: what holds them): such a class, a misspelt WNID or one the other
    split lacks, would become a class of its own and shift the number of every class after it."""
    extra = sorted(set(ids) - set(known))
    if extra:
        raise ValueError(f"{where}: classes {table}: {', '.join(extra[:5])}"
                         + (f" and {len(extra) - 5} more" if len(extra) > 5 else "") + f" ({then})")


def _only_mapped_classes(where, ids, names: dict[str, str]) -> None:
    _only_known_classes(where, ids, names, f"not in LOC_synset_mapping.txt ({len(names)} classes)",
                        "a misspelt WNID? it would become a class of its own and shift the number of every class "
                        "after it")


def _only_train_classes(where, ids, train_ids: list[str]) -> None:
    _only_known_classes(where, ids, train_ids, "the train split does not have",
                        "their class numbers would shift every other; add LOC_synset_mapping.txt, the table both "
                        "splits then use")


def _train_ids(root: Path) -> list[str] | None:
    """The class folders of the train split beside a val split (ImageNet's layouts), if there is one."""
    for candidate in (root / "train", root / "Data" / "CLS-LOC" / "train", root.parent / "train"):
        if candidate.is_dir():
            ids = [d.name for d in _class_dirs(candidate)]
            if ids and all(WNID.match(c) for c in ids):
                return ids
    return None


def imagenet_val_flat(root: Path, labels_csv: Path | None, train_ids: list[str] | None = None) -> Source:
    """ILSVRC val as one folder of images with LOC_val_solution.csv (ImageId, PredictionString)."""
    labels_csv = labels_csv or _find_upwards(root, "LOC_val_solution.csv")
    if labels_csv is None:
        raise ValueError(f"{root}: a flat ImageNet validation folder needs LOC_val_solution.csv (pass --labels PATH)")
    wnid_of = _val_labels(labels_csv)
    names = _synset_names(root)
    images = [(os.path.splitext(name)[0], path) for name, path in _images(root)]
    used = {wnid_of[stem] for stem, _ in images if stem in wnid_of}
    ids = _val_class_ids(names, used, train_ids, labels_csv, wnid_of)
    index = {c: i for i, c in enumerate(ids)}
    items = [Item(path, index[wnid_of[stem]] if stem in wnid_of else -1) for stem, path in images]
    if not items:
        raise ValueError(f"{root}: no images found")
    return Source(items, _class_table(ids, names), "imagenet-val", str(root))


def _val_class_ids(names: dict, used: set, train_ids: list[str] | None, labels_csv: Path, wnid_of: dict) -> list[str]:
    """The val split's class table: the synset mapping's (1000 classes), else the train split's beside it,
    else the label file's own WNIDs."""
    if names:
        _only_mapped_classes(labels_csv, used, names)
        return sorted(names)
    if train_ids:
        _only_train_classes(labels_csv, used, train_ids)
        return train_ids
    return sorted(set(wnid_of.values()))


def _is_image(name: str) -> bool:
    return not _hidden(name) and os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES


def _val_labels(labels_csv: Path) -> dict[str, str]:
    """ImageId -> WNID from LOC_val_solution.csv (ImageId, PredictionString: the first token)."""
    try:
        text = Path(labels_csv).read_text(encoding="utf-8-sig")  # -sig: a spreadsheet's byte-order mark
    except UnicodeDecodeError as e:
        raise ValueError(f"{labels_csv}: not UTF-8 text ({e.reason} at byte {e.start}); expected ImageNet's "
                         "LOC_val_solution.csv") from None
    reader = csv.DictReader(io.StringIO(text, newline=""))
    if not reader.fieldnames or not {"ImageId", "PredictionString"} <= set(reader.fieldnames):
        raise ValueError(f"{labels_csv}: expected columns ImageId,PredictionString, got {reader.fieldnames}")
    wnid_of = {}
    for n, row in enumerate(reader, 2):
        tokens = (row["PredictionString"] or "").split()
        if tokens:
            if wnid_of.get(row["ImageId"], tokens[0]) != tokens[0]:
                raise ValueError(f"{labels_csv}:{n}: {row['ImageId']} labelled again, as {tokens[0]} "
                                 f"(before: {wnid_of[row['ImageId']]})")
            wnid_of[row["ImageId"]] = tokens[0]
    return wnid_of


def imagenet_tar(path: Path, split: str, labels_csv: Path | None) -> Source:
    """ILSVRC2012_img_train.tar or ILSVRC2012_img_val.tar read in place (imagenet_tars.py)."""
    from . import imagenet_tars

    given, path = path.absolute(), path.resolve()  # label files are looked for beside the name given (a link's)
    names = _synset_names(given.parent)
    if split == "train":
        ids, images = imagenet_tars.train_images(path, _is_image)
        if names:
            _only_mapped_classes(path, ids, names)
            ids = sorted(names)
        index = {c: i for i, c in enumerate(ids)}
        items = [Item(str(path), index[wnid], off, size, name) for name, off, size, wnid in images]
        layout = "imagenet-train-tar"
    else:
        labels_csv = labels_csv or _find_upwards(given.parent, "LOC_val_solution.csv")
        if labels_csv is None:
            raise ValueError(f"{path}: ImageNet's validation tar needs LOC_val_solution.csv (pass --labels PATH)")
        wnid_of = _val_labels(labels_csv)
        images = [(os.path.splitext(os.path.basename(n))[0], n, off, size)
                  for n, off, size in imagenet_tars.val_images(path, _is_image)]
        used = {wnid_of[stem] for stem, *_ in images if stem in wnid_of}
        beside = given.parent / given.name.replace("_val", "_train")
        train_ids = (sorted(imagenet_tars.class_tars(beside)) if beside != given and beside.is_file()
                     else _train_ids(given.parent))
        ids = _val_class_ids(names, used, train_ids, labels_csv, wnid_of)
        index = {c: i for i, c in enumerate(ids)}
        items = [Item(str(path), index[wnid_of[stem]] if stem in wnid_of else -1, off, size, name)
                 for stem, name, off, size in images]
        layout = "imagenet-val-tar"
    if not items:
        raise ValueError(f"{path}: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in it")
    return Source(items, _class_table(ids, names), layout, str(path))


def imagenet(root: Path, split: str, labels_csv: Path | None = None) -> Source:
    """train/<wnid>/<wnid>_<n>.JPEG, or val flat (+ LOC_val_solution.csv) or val/<wnid>/...; or the
    ILSVRC2012_img_{train,val}.tar files themselves."""
    if split not in ("train", "val"):
        raise ValueError(f"--split must be train or val, got {split!r}")
    if root.is_file():
        return imagenet_tar(root, split, labels_csv)
    train_ids = _train_ids(root) if split == "val" else None
    odd = ""  # class folders that are not all WNIDs, named in the error
    for candidate in (root / split, root / "Data" / "CLS-LOC" / split, root):
        if candidate.is_dir():
            sub = _class_dirs(candidate)
            if sub and all(WNID.match(d.name) for d in sub):
                _no_loose_images(candidate, len(sub))
                return folder_per_class(candidate, f"imagenet-{split}", train_ids)
            others = [d.name for d in sub if not WNID.match(d.name)]
            if sub and len(others) < len(sub) and not odd:
                odd = (f"; {candidate} has folders that are not WNIDs (n + 8 digits): {', '.join(others[:3])}"
                       + (f" and {len(others) - 3} more" if len(others) > 3 else "")
                       + " (move them out, or write it with --layout folder)")
            if split == "val" and any(p.suffix.lower() in IMAGE_SUFFIXES for p in candidate.iterdir()):
                return imagenet_val_flat(candidate, labels_csv, train_ids)
    kaggle = " (Kaggle's download: give its ILSVRC/ folder)" if (root / "ILSVRC").is_dir() else ""
    raise ValueError(f"{root}: no ImageNet {split} split found (expected {split}/<wnid>/ folders"
                     + (" or a flat val folder with LOC_val_solution.csv)" if split == "val" else ")") + kaggle + odd)


def _no_loose_images(folder: Path, classes: int) -> None:
    """Images directly in a split's folder beside its class folders (a val split half sorted into <wnid>/
    folders, its sorting script interrupted) would be left out of the write: refused, counted."""
    with os.scandir(folder) as entries:
        loose = sorted(e.name for e in entries if _is_image(e.name) and not e.is_dir())
    if loose:
        raise ValueError(f"{folder}: {len(loose)} images lie directly in it ({', '.join(loose[:3])}"
                         + (", ..." if len(loose) > 3 else "") + f") beside its {classes} class folders, whose "
                         "images alone would be written: finish sorting them into <wnid>/ folders, or move the "
                         "sorted ones back to the flat layout (read with LOC_val_solution.csv)")


def list_file(path: Path) -> Source:
    """Lines `path<TAB>label`; label an integer or a class name; relative paths are relative to the file."""
    rows = []
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8") from None
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        parts = line.split("\t")
        if len(parts) != 2:
            raise ValueError(f"{path}:{n}: expected 'path<TAB>label', got {line!r}")
        rows.append((parts[0].strip(), parts[1].strip()))
    if not rows:
        raise ValueError(f"{path}: no entries")
    # resolved once (about 6 lstat calls each: ImageNet's 1.28M lines take a minute on a local disk, more on NFS)
    resolved = [str((path.parent / p).resolve()) for p, _ in rows]
    seen: dict[str, tuple[int, str]] = {}
    for n, ((p, _), key) in enumerate(zip(rows, resolved), 1):  # `a/x.jpg` and `./a/x.jpg` are one image
        if key in seen:  # it would be trained on twice an epoch, silently
            first, spelt = seen[key]
            raise ValueError(f"{path}: entry {n} lists {p} again (entry {first}"
                             + (f", as {spelt}" if spelt != p else "") + "); each image once, please")
        seen[key] = n, p
    labels = [lab for _, lab in rows]
    numeric = [bool(re.fullmatch(r"-?\d+", lab)) for lab in labels if lab]
    if any(numeric) and not all(numeric):
        n, lab = next((n, lab) for n, lab in enumerate(labels, 1) if lab and not re.fullmatch(r"-?\d+", lab))
        raise ValueError(f"{path}: labels mix integers and names (entry {n}: {lab!r}); use one kind")
    if numeric and all(numeric):
        negative = next(((n, lab) for n, lab in enumerate(labels, 1) if lab and int(lab) < 0), None)
        if negative:
            raise ValueError(f"{path}: entry {negative[0]} has label {negative[1]}; integer labels count from 0 "
                             "(leave the label out for an image to be skipped as unlabelled)")
        k = max(int(lab) for lab in labels if lab) + 1
        ids = [str(i) for i in range(k)]
        to_index = {str(i): i for i in range(k)}
    else:
        ids = sorted({lab for lab in labels if lab})
        to_index = {c: i for i, c in enumerate(ids)}
    items = [Item(key, to_index.get(lab, -1)) for key, (_, lab) in zip(resolved, rows)]
    return Source(items, _class_table(ids, {}), "list", str(path))


def read_source(source: str | Path, layout: str, split: str = "train", labels_csv: str | None = None) -> Source:
    source = Path(source)
    if not source.exists():
        raise FileNotFoundError(f"{source}: no such file or directory")
    if layout == "folder" and not source.is_dir() or layout == "imagenet" and not (source.is_dir() or
                                                                                 source.suffix == ".tar"):
        raise ValueError(f"{source}: --layout {layout} reads a directory" + (" or ImageNet's ILSVRC2012_img_*.tar"
                         if layout == "imagenet" else "") + ", this is a file (--layout list reads a file of "
                         "'path<TAB>label' lines)")
    if labels_csv and not Path(labels_csv).is_file():
        raise FileNotFoundError(f"--labels {labels_csv}: no such file (ImageNet's LOC_val_solution.csv)")
    if layout == "imagenet":
        return imagenet(source, split, Path(labels_csv) if labels_csv else None)
    if layout == "folder":
        return folder_per_class(source)
    if layout == "list":
        if not source.is_file():
            raise ValueError(f"--layout list needs a file of 'path<TAB>label' lines, {source} is a directory")
        return list_file(source)
    raise ValueError(f"unknown --layout {layout!r}; use imagenet, folder or list")
