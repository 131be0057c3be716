"""The training-loss curves of a run, read from its TensorBoard event files incrementally.

A long run writes millions of scalar events (ADM-256's two million steps at one status line per kimg, about
30 tags each); reading them all again at every scheduled report took minutes and gigabytes. Event files are
TFRecord streams (length, CRC, record, CRC), so each file is read from where the last report stopped, its
points thinned to a bounded number per tag and kept in a cache beside the event files. A launch that resumed
from an earlier checkpoint writes steps again: its points replace the rolled-back ones, so a curve never
doubles back.
"""

import json
import struct
from pathlib import Path

from .atomic import write_text_atomic

TAGS = ("train/loss", "train/mse", "train/vb")
CACHE_VERSION = 1


def _read_records(path: Path, offset: int):
    """(offset after, serialized event) of every complete record from `offset`; a record still being
    written (cut short) ends the stream there, to be read next time."""
    with open(path, "rb") as f:
        f.seek(offset)
        while True:
            head = f.read(12)
            if len(head) < 12:
                return
            (length,) = struct.unpack("<Q", head[:8])
            body = f.read(length + 4)
            if len(body) < length + 4:
                return
            offset += 12 + length + 4
            yield offset, body[:length]


def _thin(points: list, limit: int) -> list:
    """Every other point, the first and the newest kept, while there are more than `limit` (at least 3)."""
    while len(points) > max(limit, 3):
        points = points[::2] + (points[-1:] if len(points) % 2 == 0 else [])
    return points


def _scan(path: Path, entry: dict, tags: tuple, limit: int) -> dict:
    """Read `path` on from entry's offset (a file shorter than that offset was rewritten: from 0)."""
    from tensorboard.compat.proto import event_pb2

    if path.stat().st_size < entry.get("offset", 0):
        entry = {}
    entry = {"offset": entry.get("offset", 0), "first_wall": entry.get("first_wall"),
             "points": {t: list(entry.get("points", {}).get(t, [])) for t in tags}}
    for offset, record in _read_records(path, entry["offset"]):
        entry["offset"] = offset
        try:
            event = event_pb2.Event.FromString(record)
        except Exception:  # a damaged record: its points are lost, the rest of the file is not
            continue
        if entry["first_wall"] is None:
            entry["first_wall"] = event.wall_time
        for value in event.summary.value:
            if value.tag in entry["points"] and value.WhichOneof("value") == "simple_value":
                entry["points"][value.tag].append([event.step, value.simple_value])
    entry["points"] = {t: _thin(p, 2 * limit) for t, p in entry["points"].items()}
    return entry


def loss_history(tb_dir: Path, cache_file: Path | None = None, tags: tuple = TAGS,
                 limit: int = 2000) -> dict[str, list[tuple[int, float]]]:
    """tag -> [(step, value)] in step order, at most about `limit` points each, over every event file of the
    run in the order they were started; each file's points from its first step on replace the earlier
    files' (a resume from an earlier checkpoint trains those steps again)."""
    tb_dir = Path(tb_dir)
    cache = {}
    if cache_file is not None and Path(cache_file).is_file():
        try:
            cache = json.loads(Path(cache_file).read_text())
            if cache.get("version") != CACHE_VERSION or cache.get("tags") != list(tags):
                cache = {}
        except (OSError, ValueError):  # a damaged cache is only slower: read everything again
            cache = {}
    files = cache.get("files", {})
    entries = {}
    for path in sorted(tb_dir.glob("events.out.tfevents.*")):
        if ".eval-" in path.name:  # the farm's metric points: no training loss in them
            continue
        entries[path.name] = _scan(path, files.get(path.name, {}), tags, limit)
    if cache_file is not None:
        try:
            Path(cache_file).parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(Path(cache_file), json.dumps({"version": CACHE_VERSION, "tags": list(tags),
                                                            "files": entries}))
        except OSError:  # a run directory this user may read but not write: no cache, same curves
            pass
    curves = {t: [] for t in tags}
    for _, entry in sorted(entries.items(), key=lambda kv: (kv[1]["first_wall"] or 0, kv[0])):
        for tag, points in entry["points"].items():
            if points:
                first = min(step for step, _ in points)
                curves[tag] = [p for p in curves[tag] if p[0] < first] + [tuple(p) for p in points]
    return {t: _thin(sorted(p, key=lambda x: x[0]), limit) for t, p in curves.items() if p}
