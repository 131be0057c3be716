"""One evaluation as a plan of tasks: a sampling array over seed ranges, a feature array over the
sample shards, and a metrics task that merges them. The tasks only read RUN/eval/<key>/setting.json
and files, so they run the same in this process (`--cluster local`) or as Slurm job arrays with
dependencies (slurm/eval_jobs.py)."""

import functools
import glob
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
import zipfile
from pathlib import Path

from . import registry
from .atomic import write_text_atomic
from .settings import CASCADE_REVISION, EVALUATOR_VERSION, EvalSetting, eval_key

IMAGES_OF = "images-of.json"  # in samples/: what the shards' images are a function of, besides their seeds


def run_dir_of(snapshot: Path) -> Path:
    """RUN/snapshots/<tag> -> RUN."""
    snapshot = Path(snapshot).resolve()
    if snapshot.parent.name != "snapshots":
        raise ValueError(f"{snapshot}: not inside a run's snapshots/ directory")
    return snapshot.parent.parent


def prepare(run_dir: Path, snapshot: Path, setting: EvalSetting, ref: Path, inception_weights: str | None = None,
            metric_workers: int = 1) -> Path:
    """Create RUN/eval/<key>/setting.json (idempotent) and return the key directory. An evaluation
    registered under the older key naming (the reference by name, size and mtime) keeps its directory."""
    from .digest import remembered_digest

    root = registry.eval_root(run_dir)
    key = eval_key(snapshot, setting, ref, remembered_digest(Path(ref), reference_cache(run_dir)))
    older = eval_key(snapshot, setting, ref)
    if not (root / key).is_dir() and (root / older / registry.SETTING).is_file():
        key = older
    if not (root / key).is_dir():  # the same setting under another name: evaluated once, under its first name
        same = sorted(((d / registry.SETTING).stat().st_mtime_ns, d.name)
                      for d in root.glob(f"{Path(snapshot).name}--*--{key.rsplit('--', 1)[1]}")
                      if (d / registry.SETTING).is_file())
        key = same[0][1] if same else key  # the earliest registered
    key_dir = root / key
    key_dir.mkdir(parents=True, exist_ok=True)
    path = key_dir / registry.SETTING
    spec = _readable_spec(path)
    if spec is None:  # new, or damaged (it is always written whole): made again from what defines it
        from models.snapshot import read_config, read_manifest

        read_manifest(snapshot)
        meta = read_config(snapshot)
        spec = {"key": key, "run_dir": str(Path(run_dir).resolve()), "snapshot": str(Path(snapshot).resolve()),
                "snapshot_name": Path(snapshot).name, "images": meta.get("images"),
                "setting": {**setting.identity(), **{k: str(Path(v).resolve()) for k in ("classifier", "upsampler")
                                                  if (v := getattr(setting, k))}},  # tasks run from anywhere
                "ref": str(Path(ref).resolve()), "inception_weights": inception_weights,
                "metric_workers": metric_workers, "evaluator": EVALUATOR_VERSION}
        write_text_atomic(path, json.dumps(spec, indent=2) + "\n")  # two schedulers may prepare at once
    else:
        # what cuts the work or is kept after it changes no number (the key leaves it out): a lower batch size
        # after an out-of-memory failure applies to the next attempt, keep_samples to the next pass
        changing = ("keep_samples",) if (key_dir / registry.METRICS).is_file() else ("batch_size", "keep_samples")
        changed = {k: getattr(setting, k) for k in changing
                   if spec["setting"].get(k, getattr(EvalSetting, k)) != getattr(setting, k)}
        if changed:
            spec["setting"].update(changed)
            write_text_atomic(path, json.dumps(spec, indent=2) + "\n")
    return key_dir


def _readable_spec(path: Path) -> dict | None:
    """setting.json's record; None where there is none, and where it cannot be read (emptied or garbled on disk:
    said, and made again by the caller from the same snapshot, setting and reference that name the key)."""
    try:
        spec = json.loads(path.read_text())
        if isinstance(spec, dict) and isinstance(spec.get("setting"), dict):
            return spec
        problem = "not an evaluation's record"
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        problem = f"{type(e).__name__}: {e}"
    print(f"[eval] {path}: unreadable ({problem}); written again from the evaluation's inputs", file=sys.stderr)
    return None


def load_spec(key_dir: Path) -> tuple[dict, EvalSetting]:
    spec = json.loads((Path(key_dir) / registry.SETTING).read_text())
    return spec, EvalSetting(**spec["setting"])


@functools.lru_cache(maxsize=1)
def _sampler(key_dir: str):
    """The evaluation's models, loaded once per process (run_local calls every task in one process)."""
    from .sample import Sampler

    spec, setting = load_spec(Path(key_dir))
    return Sampler(spec["snapshot"], setting)


def images_identity(spec: dict, setting: EvalSetting, base: bool = False, device: str | None = None) -> dict:
    """What an evaluation's sample images are a function of besides their seeds, the models by content;
    base=True: a cascade's base images, which a plain evaluation of the same snapshot, steps, guidance,
    weights and precision samples too (the upsampler's noise is a stream of its own). `device`: the kind
    that samples them (a GPU's generator draws other numbers than a CPU's from the same seed), recorded with
    the networks' memory layout there (it changes images by float rounding)."""
    from .sample import network_layout
    from .settings import _digest

    ident = {"snapshot": _digest(spec["snapshot"]), "steps": setting.steps, "scale": setting.scale,
             "classifier": _digest(setting.classifier) if setting.scale else None, "weights": setting.weights,
             "precision": setting.precision,
             **({"device": device, "layout": network_layout(device)} if device else {})}
    if setting.upsampler and not base:
        ident.update(upsampler=_digest(setting.upsampler), upsampler_steps=setting.upsampler_steps,
                     cascade=CASCADE_REVISION)
    return ident


def _others(key_dir: Path, spec: dict):
    """The snapshot's other evaluations in the run (their key directories)."""
    return [d for d in sorted(Path(key_dir).parent.glob(f"{glob.escape(spec['snapshot_name'])}--*"))
            if d != Path(key_dir)]


def reusable_base(key_dir: Path, spec: dict, setting: EvalSetting, seeds: list[int], sampler):
    """A cascade's base images of these seeds where another evaluation of the snapshot sampled them already
    (its samples/images-of.json says so, and its shard of these seeds is sound and labelled as this
    cascade draws its labels), as BaseSamples; None where none did. The cascade then runs only the upsampler
    and gives the same images as with the base model run again (models.sampling.upsampler_seed)."""
    from models.sampling import draw_labels

    from .base_samples import BaseSamples
    from .sample import shard_path

    want = images_identity(spec, setting, base=True, device=sampler.device.type)
    for other in _others(key_dir, spec):
        shard = shard_path(other / "samples", seeds)
        if not shard.is_file():
            continue
        try:
            if json.loads((other / "samples" / IMAGES_OF).read_text()) != want:
                continue
        except (OSError, ValueError):
            continue
        try:  # (its checks and its read-through against the CRCs find a damaged shard)
            rows = BaseSamples(shard, sampler.snap.config.image_size, sampler.num_classes, seeds[0], len(seeds),
                               row0_seed=seeds[0])
        except (ValueError, OSError, EOFError, zipfile.BadZipFile):
            continue
        if rows.count != len(seeds):
            continue
        labels = draw_labels(seeds, sampler.num_classes).numpy() if sampler.num_classes else None
        if (labels is None) != (rows.labels is None) or (labels is not None and (rows.labels != labels).any()):
            continue
        return rows
    return None


def base_evaluations(key_dir: Path) -> list[Path]:
    """The other evaluations of a cascade's snapshot that sample its base images, by their setting.json (no
    upsampler; the same steps, guidance, weights and precision): a Slurm farm starts the cascade's sampling
    after theirs, so that it finds their shards (reusable_base)."""
    key_dir = Path(key_dir)
    spec, setting = load_spec(key_dir)
    if not setting.upsampler:
        return []
    want, found = images_identity(spec, setting, base=True), []
    for other in _others(key_dir, spec):
        try:
            other_spec, other_setting = load_spec(other)
            if not other_setting.upsampler and images_identity(other_spec, other_setting) == want:
                found.append(other)
        except (OSError, ValueError, TypeError, KeyError):  # (a damaged record: prepare writes it again)
            continue
    return found


def check_sampling_device(ident: Path, kind: str) -> None:
    """The shards of one evaluation come from one kind of device: a GPU's generators draw other noise than a
    CPU's from the same seeds, so a task on the other kind would mix two sets of images under one record."""
    drawn = json.loads(ident.read_text()).get("device")
    if drawn and drawn != kind:
        raise RuntimeError(f"{ident}: this evaluation's samples were drawn on {drawn} and this task runs on {kind}, "
                           f"whose generators give other images for the same seeds: run its sampling on {drawn} "
                           f"(or delete {ident.parent} to sample them all again on {kind})")


def sample_task(key_dir: str, index: int) -> str:
    from .inception import default_device
    from .sample import finished_shard_problem, shard_path

    spec, setting = load_spec(Path(key_dir))
    seeds = setting.shard_seeds(index)
    path = shard_path(Path(key_dir) / "samples", seeds)
    progressive = index == 0 and not (Path(key_dir) / "progressive.npz").is_file()
    done = path.is_file() and finished_shard_problem(path, len(seeds)) is None
    if done and not progressive:  # done earlier (a retry or a requeue): load nothing
        return str(path)
    ident = Path(key_dir) / "samples" / IMAGES_OF
    if not done and ident.is_file():
        check_sampling_device(ident, default_device().type)
    sampler = _sampler(str(key_dir))
    watch = sampler.watcher(min(4, setting.batch_size, len(setting.shard_seeds(0)))) if progressive else None
    if not done:  # (a damaged one is said and sampled again) the progressive decoding of its first seeds is
        # recorded while sampling them
        if not ident.is_file():  # before any shard: another evaluation's cascade may reuse them
            ident.parent.mkdir(parents=True, exist_ok=True)
            record = images_identity(spec, setting, device=sampler.device.type)
            write_text_atomic(ident, json.dumps(record, indent=2) + "\n")
        base = reusable_base(Path(key_dir), spec, setting, seeds, sampler) if setting.upsampler else None
        if base is not None:
            print(f"[eval] {Path(key_dir).name}: the base images of seeds {seeds[0]}-{seeds[-1]} from "
                  f"{base.path.parent.parent.name}: only the upsampler runs", file=sys.stderr, flush=True)
        from adm.progress import progress

        # a line a minute in the task's log (a shard of ADM-256 at 250 steps takes hours); on a terminal, where
        # run_local counts the shards, nothing more
        with progress(total=len(seeds), desc=f"[eval] {Path(key_dir).name} shard {index}", unit="img",
                      enabled=not sys.stderr.isatty()) as bar:
            path = sampler.shard(seeds, Path(key_dir) / "samples", bar, watch=None if base else watch, base=base)
    if progressive:
        from .sample import save_npz_atomic

        if watch.seen == 0:  # the shard was there already (sampled before progressive decodings were kept), or
            sampler.watch_base(setting.shard_seeds(0)[:watch.n], watch)  # its base images were another's
        save_npz_atomic(Path(key_dir) / "progressive.npz", arr_0=watch.array())
    return str(path)


def feature_task(key_dir: str, index: int) -> str:
    from .features import MERGED, featurize
    from .sample import shard_path

    if (Path(key_dir) / "features" / MERGED).is_file():  # a late duplicate: the evaluation is done
        return str(Path(key_dir) / "features" / MERGED)
    spec, setting = load_spec(Path(key_dir))
    sample = shard_path(Path(key_dir) / "samples", setting.shard_seeds(index))
    if not sample.is_file():
        raise FileNotFoundError(f"{sample}: the sampling task {index} has not finished")
    done = str(featurize(sample, Path(key_dir) / "features"))
    if index == 0:
        # the reference's features (ADM's reference batches carry 10k images and no features) and covariance
        # roots into the run's cache, here on this task's GPU: the metrics job, on CPUs, would take minutes
        from .metrics import load_reference

        load_reference(spec["ref"], cache_dir=reference_cache(spec["run_dir"]))
    return done


def reference_cache(run_dir) -> Path:
    """Where a run's evaluations keep their references' features and covariance roots (by content digest)."""
    return registry.eval_root(run_dir) / "ref-cache"


def strided(task, key_dir: str, first: int, stride: int) -> list[str]:
    """`task` for shards first, first + stride, ...: one array task's share where an evaluation has more
    shards than Slurm lets one array hold (MaxArraySize)."""
    _, setting = load_spec(Path(key_dir))
    return [task(key_dir, i) for i in range(first, setting.num_shards, stride)]


def metrics_task(key_dir: str, backend: str = "auto") -> dict | None:
    """Merge, compute, publish metrics.json once (rank 0), and log the numbers to TensorBoard."""
    from .comm import discover
    from .features import load_features
    from .inception import logits_weight
    from .metrics import load_reference, reduce

    key_dir = Path(key_dir)
    comm = discover(backend)
    # a requeued or second metrics job: the numbers are out already, and only what may follow publishing is
    # left, not minutes of FID and precision/recall again (rank 0's look decides for all: none waits alone)
    if comm.allgather((key_dir / registry.METRICS).is_file())[0]:
        comm.close()
        if comm.rank != 0:
            return None
        finish(key_dir)
        return json.loads((key_dir / registry.METRICS).read_text())
    spec, setting = load_spec(key_dir)
    feats = load_features(key_dir / "features", expected=setting.num)
    ref = load_reference(spec["ref"], cache_dir=reference_cache(spec["run_dir"]))
    w = logits_weight(spec["inception_weights"]) if spec.get("inception_weights") else None
    metrics = reduce(feats, ref, spec["ref"], setting.pr_distance, comm, w)
    comm.close()
    if comm.rank != 0:
        return None
    record = {k: spec[k] for k in ("key", "snapshot", "snapshot_name", "images", "setting", "ref", "evaluator")}
    record.update(metrics=metrics, finished=time.strftime("%Y-%m-%d %H:%M:%S"))
    registry.publish(key_dir, record)  # once: a second attempt's numbers are the same, and not published
    finish(key_dir)
    return record


STALE_PARTIAL_S = 600  # a temporary file untouched this long after publishing belongs to a task that ended


def unfinished(key_dir: Path, logged: set[str]) -> bool:
    """Whether a published evaluation still lacks its TensorBoard point (`logged`: the keys whose events file
    the run's tensorboard/ holds) or still has per-shard feature files to compact."""
    from .features import shard_feature_files

    return (Path(key_dir).name not in logged or bool(shard_feature_files(Path(key_dir) / "features"))
            or bool(samples_to_drop(Path(key_dir))))


def finish(key_dir: Path) -> None:
    """What follows publishing metrics.json, repeatable: its TensorBoard point, once per key (the events file
    is named after the key), and the per-shard features compacted. A task killed or failed after publishing
    left these undone; the scheduler's next pass calls this again."""
    from .features import compact

    key_dir = Path(key_dir)
    record = json.loads((key_dir / registry.METRICS).read_text())
    run_dir = Path(load_spec(key_dir)[0]["run_dir"])
    if not any((run_dir / "tensorboard").glob(f"*.eval-{record['key']}")):
        log_tensorboard(run_dir, record)
    compact(key_dir / "features")  # the per-shard sums of outer products are not needed any more
    drop = samples_to_drop(key_dir)
    if drop and not cascades_waiting(key_dir):
        for shard in drop:
            shard.unlink(missing_ok=True)
    for partial in [*key_dir.glob("samples/*.partial-*"), *key_dir.glob("features/*.partial-*"),
                    *key_dir.glob("tensorboard.partial-*")]:
        try:  # a killed or cancelled task's temporary file (64 MB of feature sums, a sample shard, an events file)
            if time.time() - partial.stat().st_mtime > STALE_PARTIAL_S:  # not one a late duplicate still writes
                if partial.is_dir():
                    shutil.rmtree(partial)
                else:
                    partial.unlink()
        except FileNotFoundError:
            pass


def samples_to_drop(key_dir: Path) -> list[Path]:
    """A published evaluation's sample shards that its setting does not keep (keep_samples: first keeps the
    first shard, whose images the report shows)."""
    from .features import sample_shards

    try:
        if load_spec(key_dir)[1].keep_samples == "all":
            return []
        return sample_shards(key_dir / "samples")[1:]
    except (OSError, ValueError, TypeError, KeyError):  # (a damaged record or a stray file: nothing dropped)
        return []


def cascades_waiting(key_dir: Path) -> list[Path]:
    """The snapshot's cascade evaluations still to finish that may take this evaluation's samples as their base
    images (reusable_base): its shards stay until they are done."""
    spec, _ = load_spec(key_dir)
    waiting = []
    for other in _others(key_dir, spec):
        try:
            if not (other / registry.METRICS).is_file() and Path(key_dir) in base_evaluations(other):
                waiting.append(other)
        except (OSError, ValueError, TypeError, KeyError):  # (no record, or a damaged one: it samples them itself)
            continue
    return waiting


def series_name(run_dir: Path, record: dict) -> str:
    """The TensorBoard series of an evaluation: its setting's name, for the first family of evaluations
    logged under that name in this run (same numbers-changing fields, same reference); `name [hash]` for
    any other family that reuses the name (another --num, reference or sampler), so no series mixes two.
    The first family is recorded once per name (RUN/tensorboard/.series/<name>.json), so names never change."""
    from .atomic import write_text_once
    from .settings import numbers_identity

    name = record["setting"]["name"]
    family = hashlib.sha256((numbers_identity(record["setting"]) + "|" + str(record.get("ref"))).encode()
                            ).hexdigest()[:6]
    path = Path(run_dir) / "tensorboard" / ".series" / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_once(path, json.dumps({"family": family}) + "\n")
    try:
        first = json.loads(path.read_text())["family"]
    except (OSError, ValueError, KeyError):  # damaged: told apart all the same
        first = None
    return name if first == family else f"{name} [{family}]"


def log_tensorboard(run_dir: Path, record: dict) -> None:
    """The evaluation's TensorBoard point, in an events file that appears in RUN/tensorboard whole: its name
    says the point is logged (finish, schedule_pass), and SummaryWriter creates the file before any point is
    in it, so a task killed meanwhile left a file that kept the point from ever being written. Written in a
    folder of its own in the evaluation's directory, closed, then moved in."""
    from torch.utils.tensorboard import SummaryWriter

    series = series_name(run_dir, record)
    key_dir = registry.eval_root(run_dir) / record["key"]
    key_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="tensorboard.partial-", dir=key_dir))
    try:
        writer = SummaryWriter(str(tmp), filename_suffix=f".eval-{record['key']}")
        width = registry.posthoc_width(record["snapshot_name"])
        series += f"-posthoc-{width}" if width else ""
        for name, value in record["metrics"].items():
            if name != "num_samples":
                writer.add_scalar(f"eval/{series}/{name}", value, record.get("images") or 0)
        writer.close()
        for f in tmp.iterdir():  # (one events file)
            os.replace(f, Path(run_dir) / "tensorboard" / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run_local(key_dir: Path, progress: bool = False) -> dict:
    """The whole plan in this process, in order (every task skips what is already done)."""
    _, setting = load_spec(key_dir)
    from adm.progress import progress as progress_bar

    for i in progress_bar(range(setting.num_shards), desc=f"sample {key_dir.name}", unit="shard", enabled=progress):
        sample_task(str(key_dir), i)
    for i in progress_bar(range(setting.num_shards), desc="features", unit="shard", enabled=progress):
        feature_task(str(key_dir), i)
    metrics_task(str(key_dir), backend="single")
    return json.loads((key_dir / registry.METRICS).read_text())
