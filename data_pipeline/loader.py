"""A streaming loader over WebDataset shards whose position is exact, resumable and independent of
world size (DESIGN invariant 4).

S canonical slots are infinite streams (see order.py). Consumer c = rank * W + worker of C = world
size x workers owns the slots s with s mod C == c, and serves them a shard at a time in turn (so
one shard is in memory per consumer). Every sample carries its position; the loader's state is,
per slot, the position after the last sample the *training step* received (not what workers
prefetched) and how many shards the slot has started. Resuming at the same world size and worker count continues
sample for sample; at another (S divisible by the new C) no sample of an epoch repeats or goes
missing. Corrupt samples and truncated shards are skipped and counted, never fatal.
"""

import atexit
import io
import json
import logging
import os
import signal
import tarfile
import weakref
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.tariterators import tar_file_iterator

from .order import Order, Position
from .patient_read import PatientFile, StillUnreadable
from .transforms import SampleRandom, Transform
from .verify import read_manifest

log = logging.getLogger(__name__)


# A shard the filesystem will not read (EIO or ESTALE on NFS, a mount gone for a moment) is tried again
# after these pauses (a minute in all), then training stops: skipping it would lose its samples for the
# epoch (the loader's state moves past them), and a node without the data would loop over every shard.
READ_RETRY_DELAYS_S = (1, 2, 4, 8, 15, 30)
SHARD_READ_BYTES = 1 << 20  # each read of a shard: few, large and sequential, as network filesystems like


def read_shard(path: Path) -> tuple[dict[str, dict], str | None]:
    """All samples of a shard, key -> {ext: bytes}, streamed front to back in large sequential reads
    through webdataset's tar reader (the samples are held, not the file's bytes as well: half the memory
    of reading it whole first). A truncated or corrupt tar yields what precedes the damage, plus the
    error; a file that cannot be read, however long we wait, raises."""
    samples: dict[str, dict] = {}
    raw = PatientFile(path, READ_RETRY_DELAYS_S, "training stops here rather than lose its samples (its last "
                      "checkpoint resumes it)")
    with io.BufferedReader(raw, buffer_size=SHARD_READ_BYTES) as stream:
        try:
            for item in tar_file_iterator(stream):
                key, _, ext = item["fname"].partition(".")
                samples.setdefault(key, {})[ext] = item["data"]
        except StillUnreadable:
            raise
        except (tarfile.TarError, OSError, EOFError) as e:
            return samples, f"{type(e).__name__}: {e}"
    return samples, None


def _lean(manifest: dict) -> dict:
    """A manifest without what no reader uses: each sample's tar offset and the skipped images' list (ImageNet's
    1.28M offsets are 48 MB of Python objects, in every rank and every worker it forks)."""
    manifest = {k: v for k, v in manifest.items() if k != "skipped"}
    manifest["shards"] = [{k: v for k, v in s.items() if k != "offsets"} for s in manifest["shards"]]
    return manifest


class ShardStream(IterableDataset):
    """Yields ready batches (collated in the worker) from this consumer's slots, forever."""

    def __init__(self, directory, transform: Transform, batch_size: int, seed: int = 0, num_slots: int = 64,
                 rank: int = 0, world_size: int = 1, state: dict | None = None, worker_rotation: int = 0,
                 manifest: dict | None = None, decode_threads: int = 0):
        self.dir = Path(directory)
        if batch_size < 1:
            raise ValueError(f"batch size must be at least 1, got {batch_size}")
        self.manifest = manifest or _lean(read_manifest(self.dir))  # a clear error for a missing or broken one
        missing = [s["name"] for s in self.manifest["shards"] if not (self.dir / s["name"]).is_file()]
        if missing:
            raise FileNotFoundError(f"{self.dir}: shards named in the manifest are missing: {', '.join(missing[:5])}"
                                    + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
        self.order = Order([s["count"] for s in self.manifest["shards"]], num_slots, seed)
        self.transform, self.batch_size, self.seed = transform, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.state = state or {}
        self.worker_rotation = worker_rotation
        self.decode_threads = decode_threads
        self.num_classes = self.manifest["num_classes"]
        self.nonempty_shards = sum(1 for c in self.order.counts if c)

    def consumer(self) -> tuple[int, int]:
        info = get_worker_info()
        workers = info.num_workers if info else 1
        worker = info.id if info else 0
        total = self.world_size * workers
        if self.order.num_slots % total:
            raise ValueError(f"canonical slot count {self.order.num_slots} is not divisible by world size x workers "
                             f"= {self.world_size} x {workers}")
        return self.rank * workers + (worker + self.worker_rotation) % workers, total

    def shard_samples(self, slot: int, pos: Position) -> Iterator[tuple[dict | None, Position]]:
        """The rest of the slot's current shard from `pos`: (sample, or None if it had to be skipped)."""
        shard = self.order.shards_of(slot, pos.epoch)[pos.shard]
        info = self.manifest["shards"][shard]
        samples, error = read_shard(self.dir / info["name"])
        if error or len(samples) < info["count"]:  # (a damaged header mid-tar reads as its end, with no error)
            log.warning("shard %s is damaged (%s): %d of %d samples readable", info["name"],
                        error or "the tar ends early", len(samples), info["count"])
        # member i is the i-th sample in the tar: keys are the source positions, with gaps where the writer
        # skipped an unreadable image; a damaged tar reads as a prefix, so the order still holds
        keys = list(samples)
        order = self.order.sample_order(shard, pos.epoch)

        def sample(offset: int) -> tuple[dict | None, Position]:
            member = int(order[offset])
            here = Position(pos.epoch, pos.shard, offset)
            key = keys[member] if member < len(keys) else None  # (those lost with a damaged tail: warned above)
            return (None if key is None else self.decode(samples[key], key, shard, member, slot, here)), here

        offsets = range(pos.offset, len(order))
        if self.decode_threads <= 1:
            yield from map(sample, offsets)
            return
        # decoded by threads (PIL lets go of the GIL while it decodes and resizes), a window at a time, in order:
        # the same samples as one thread gives
        window = 4 * self.decode_threads
        with ThreadPoolExecutor(self.decode_threads) as pool:
            for start in range(0, len(offsets), window):
                yield from pool.map(sample, offsets[start:start + window])

    def decode(self, parts, key, shard, member, slot, pos):
        """The sample, or None (skipped, counted and logged with its reason)."""
        image = parts.get("jpg", parts.get("png", parts.get("npy")))
        try:
            label = int(parts["cls"])
            if not 0 <= label < self.num_classes:  # a damaged .cls: an embedding lookup would fail on it
                raise ValueError(f"label {label} outside the {self.num_classes} classes of the manifest")
            if image is None:
                raise KeyError(f"no image (its parts: {', '.join(sorted(parts))})")
            rng = SampleRandom(self.seed, pos.epoch, shard, member)
            out = self.transform(image, rng)
        except Exception as e:  # missing part, undecodable image, bad label: skip and count
            log.warning("skipping sample %s of %s: %s", key, self.manifest["shards"][shard]["name"],
                        f"{type(e).__name__}: {e}")
            return None
        out["label"] = label
        out["pos"] = np.array([slot, pos.epoch, pos.shard, pos.offset], dtype=np.int64)
        out["id"] = int(key)
        return out

    def __iter__(self):
        consumer, total = self.consumer()
        slots = list(range(consumer, self.order.num_slots, total))
        pos = {s: Position(**self.state.get(str(s), {}).get("pos", {})) for s in slots}
        # shards started so far per slot: slots take turns a shard at a time (one shard in memory)
        done = {s: self.state.get(str(s), {}).get("shards", 0) for s in slots}
        # skipped: (slot, epoch, shard, offset, shards started) of each bad sample since the last batch, counted
        # in the next one, whose consumption moves the state past them too (else a resume counted them again)
        batch, skipped, barren = [], [], []  # barren: the shards read in a row without one good sample
        while True:
            slot = min(slots, key=lambda s: (done[s], s))  # derivable from the state: exact resume
            shard = self.order.shards_of(slot, pos[slot].epoch)[pos[slot].shard]
            if self.order.counts[shard]:  # (a shard written empty, every image of it unreadable, is no damage)
                barren.append(shard)
            for sample, here in self.shard_samples(slot, pos[slot]):
                if sample is None:
                    skipped.append((slot, here.epoch, here.shard, here.offset, done[slot]))
                    continue
                sample["shards"] = done[slot]
                barren = []
                batch.append(sample)
                if len(batch) == self.batch_size:
                    yield collate(batch, skipped)
                    batch, skipped = [], []
            self._check_not_barren(barren)
            pos[slot] = self.order.advance(slot, Position(pos[slot].epoch, pos[slot].shard,
                                                          self.order.counts[self.order.shards_of(
                                                              slot, pos[slot].epoch)[pos[slot].shard]] - 1))
            done[slot] += 1

    def _check_not_barren(self, barren: list[int]) -> None:
        """A reader whose every shard is damaged would loop over them forever: once every shard of the dataset
        that holds samples gave it nothing, shard after shard, it stops and says so (or after ten times as many
        reads: drawn at random an epoch at a time, the last one could take long to come round; a good shard
        missed that long has odds below e^-10). Not after an epoch of its own slots' shards: a reader with one
        shard an epoch would stop at the first damaged one."""
        n = self.nonempty_shards
        if len(barren) >= n and (len(barren) >= 10 * n or len(set(barren)) >= n):
            info = get_worker_info()
            names = sorted({self.manifest["shards"][i]["name"] for i in barren})
            raise RuntimeError(
                f"{self.dir}: rank {self.rank}" + (f", loader worker {info.id}," if info else "")
                + f" read {len(barren)} shards in a row without one usable sample ({', '.join(names[:4])}"
                + (f" and {len(names) - 4} more" if len(names) > 4 else "") + "): every shard of the dataset is "
                "damaged or holds only bad samples; `adm data verify` names the damage")


def collate(samples: list[dict], skipped: list[tuple]) -> dict:
    # one vectorised uint8 -> [-1, 1] conversion per batch instead of one per image
    out = {"image": torch.from_numpy(np.stack([s["image"] for s in samples])).float().div_(127.5).sub_(1.0),
           "pos": torch.from_numpy(np.stack([s["pos"] for s in samples]))}
    if "low_res" in samples[0]:
        out["low_res"] = torch.from_numpy(np.stack([s["low_res"] for s in samples])).div_(127.5).sub_(1.0)
    out["label"] = torch.tensor([s["label"] for s in samples], dtype=torch.long)
    out["id"] = torch.tensor([s["id"] for s in samples], dtype=torch.long)
    out["shards"] = torch.tensor([s["shards"] for s in samples], dtype=torch.long)
    out["skipped"] = torch.tensor(len(skipped))
    out["skipped_pos"] = torch.tensor(skipped, dtype=torch.long).reshape(-1, 5)
    return out


def _ignore_job_signals(_worker_id: int) -> None:
    """Slurm signals every process of a step (SIGTERM on requeue/preemption/cancel, the --signal before a
    time limit). A worker must not die of it while the training process saves: the worker outlives the
    signal and exits with its parent (see _kill_workers_at_exit)."""
    for sig in (signal.SIGTERM, signal.SIGUSR2, signal.SIGUSR1, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)


_LIVE_ITERATORS: "weakref.WeakSet" = weakref.WeakSet()  # the DataLoader iterators with workers, while they live
_WORKER_PIDS: set[int] = set()  # every worker started: pids, not Process objects, whose pipes would stay open
_AT_EXIT: list = []  # the hook, once registered


def _watch_workers(batches) -> None:
    """Have the workers of a DataLoader iterator killed at interpreter exit (see _kill_workers_at_exit),
    keeping nothing of it alive meanwhile (a Process object per worker held its pipes open: two file
    descriptors per worker per iter() until exit)."""
    _LIVE_ITERATORS.add(batches)
    _WORKER_PIDS.update(w.pid for w in batches._workers)
    if not _AT_EXIT:  # registered after multiprocessing's own hook (workers import it first), so it runs first
        _AT_EXIT.append(atexit.register(_kill_workers_at_exit))


def _kill_workers_at_exit() -> None:
    """At interpreter exit: SIGKILL the workers still alive. multiprocessing would SIGTERM them, which they
    ignore, and then wait forever, e.g. when the training process exits on an exception that keeps the
    iterator alive, or after a worker's exception, when the collected iterator's own shutdown left its
    workers waiting for work."""
    for iterator in list(_LIVE_ITERATORS):
        iterator._shutdown_workers()  # the DataLoader's orderly stop; it also stops watching them die
    for pid in _WORKER_PIDS:
        if _running_child(pid):
            os.kill(pid, signal.SIGKILL)


def _running_child(pid: int) -> bool:
    """pid is a running child of this process: a worker, not one that exited (a zombie, or reaped and its
    pid since taken by a process of someone else's). Reads /proc; reaping nothing, it leaves
    multiprocessing's own bookkeeping of its children as it was."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    state, ppid = stat.rsplit(")", 1)[1].split()[:2]
    return int(ppid) == os.getpid() and state not in ("Z", "X")


class StreamLoader:
    """The training-side object: iterate for batches; state_dict() / load_state_dict() for resume.

    Each batch dict holds image (B, 3, R, R) in [-1, 1], label, id (the sample's key), pos (slot,
    epoch, shard, offset), and low_res for the upsampler (with `patch`, both are random patch-sized crops, R = patch).
    `skipped` counts bad samples so far.
    """

    def __init__(self, directory, resolution: int, batch_size: int, *, crop: str = "center", flip: bool = True,
                 small_size: int = 0, seed: int = 0, num_slots: int = 64, rank: int = 0, world_size: int = 1,
                 num_workers: int = 0, jpeg_draft: bool = False, prefetch_factor: int = 2,
                 persistent_workers: bool = False, pin_memory: bool = False, patch: int = 0, decode_threads: int = 0):
        if world_size < 1 or not 0 <= rank < world_size or num_workers < 0:
            raise ValueError(f"loader: rank {rank} of world size {world_size} with {num_workers} workers; expected "
                             "world_size >= 1, 0 <= rank < world_size, num_workers >= 0")
        if num_slots % (world_size * max(1, num_workers)):
            raise ValueError(f"loader: {num_slots} canonical slots do not divide over world size x workers = "
                             f"{world_size} x {max(1, num_workers)}: every reader needs the same number of slots")
        self.args = dict(directory=str(directory), batch_size=batch_size, seed=seed, num_slots=num_slots,
                         rank=rank, world_size=world_size, decode_threads=decode_threads)
        self.transform = Transform(resolution, crop, flip, small_size, jpeg_draft, patch)
        self.num_workers, self.prefetch_factor = num_workers, prefetch_factor
        self.pin_memory = pin_memory  # page-locked batches: asynchronous copies to a GPU
        # the stream is infinite, so one iterator (and its workers) lives for the whole run either way;
        # persistent workers only keep them across a second iter() over the same DataLoader
        self.persistent_workers = persistent_workers and num_workers > 0
        self.slots: dict[str, dict] = {}  # slot -> {"pos": after the last consumed sample, "shards": started}
        self.batches = 0
        self.skipped = 0
        # worker w of a new iterator serves the batches numbered (w + batches - rotation_origin) mod workers
        # of the layout (world size, workers) in use since the batch count rotation_origin
        self.rotation_origin = 0
        # fail now on a missing manifest or shard; the manifest read once, for every iterator
        self.manifest = ShardStream(transform=self.transform, **self.args).manifest

    def __iter__(self):
        rotation = (self.batches - self.rotation_origin) % max(1, self.num_workers)
        dataset = ShardStream(transform=self.transform, state=self.slots, worker_rotation=rotation,
                              manifest=self.manifest, **self.args)
        kwargs = dict(num_workers=self.num_workers, batch_size=None, pin_memory=self.pin_memory)
        if self.num_workers:
            kwargs.update(prefetch_factor=self.prefetch_factor, persistent_workers=self.persistent_workers,
                          worker_init_fn=_ignore_job_signals)
        order = Order([s["count"] for s in dataset.manifest["shards"]], self.args["num_slots"], self.args["seed"])
        # create the DataLoader iterator now (it draws its base seed from torch's global RNG), not at
        # the first next(): callers that restore RNG state after iter() rely on this
        batches = iter(DataLoader(dataset, **kwargs))
        if self.num_workers:
            _watch_workers(batches)
        return self._consume(batches, order)

    def _consume(self, batches, order):
        for batch in batches:
            # the training step receives this batch: only now does the state move, past its samples and the bad
            # ones counted in it (within a slot, positions grow with (epoch, shard, offset): the last one wins)
            read = [(*p, started) for p, started in zip(batch["pos"].tolist(), batch["shards"].tolist())]
            last = {}
            for slot, epoch, shard, offset, started in read + batch["skipped_pos"].tolist():
                if slot not in last or (epoch, shard, offset) > last[slot][:3]:
                    last[slot] = (epoch, shard, offset, started)
            for slot, (epoch, shard, offset, started) in last.items():
                nxt = order.advance(slot, Position(epoch, shard, offset))
                moved_on = (nxt.epoch, nxt.shard) != (epoch, shard)
                self.slots[str(slot)] = {"pos": asdict(nxt), "shards": started + moved_on}
            self.batches += 1
            self.skipped += int(batch["skipped"])
            yield batch

    def owns(self, slot: int) -> bool:
        """Whether this rank reads `slot` (ShardStream.consumer: slot s goes to consumer s mod ranks x workers)."""
        workers = max(1, self.num_workers)
        return (slot % (self.args["world_size"] * workers)) // workers == self.args["rank"]

    def state_dict(self) -> dict:
        """This rank's slots only: after a resume it also holds the other ranks' loaded (now old) positions,
        which must not overwrite theirs when the trainer merges every rank's state."""
        slots = {k: v for k, v in self.slots.items() if self.owns(int(k))}
        return {"slots": json.loads(json.dumps(slots)), "batches": self.batches, "skipped": self.skipped,
                "num_workers": self.num_workers, "world_size": self.args["world_size"],
                "rotation_origin": self.rotation_origin,
                "num_slots": self.args["num_slots"], "seed": self.args["seed"]}

    def load_state_dict(self, state: dict) -> None:
        for key in ("num_slots", "seed"):
            if state[key] != self.args[key]:
                raise ValueError(f"loader state has {key}={state[key]} but this loader uses {self.args[key]}: "
                                 "the sample order would change")
        self.slots = json.loads(json.dumps(state["slots"]))
        # the merged count is every rank's: rank 0 carries it on, so that the next merge sums to it again
        self.batches, self.skipped = state["batches"], state["skipped"] if self.args["rank"] == 0 else 0
        same = state["num_workers"] == self.num_workers and state["world_size"] == self.args["world_size"]
        # another layout starts its rotation afresh, here (states from before rotation_origin: 0)
        self.rotation_origin = state.get("rotation_origin", 0) if same else self.batches


def merge_states(states: list[dict]) -> dict:
    """One loader state from every rank's (each rank holds only its own slots): the trainer gathers
    them before saving, so a resume at another world size finds every slot's position."""
    merged = dict(states[0])
    merged["slots"] = {}
    for st in states:
        for key in ("num_slots", "seed"):
            if st[key] != merged[key]:
                raise ValueError(f"loader states disagree on {key}")
        merged["slots"].update(st["slots"])
    merged["skipped"] = sum(st["skipped"] for st in states)
    return merged
