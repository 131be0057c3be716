"""Scheduled evaluation: find a run's snapshots not yet evaluated for each setting and evaluate them,
each (snapshot, setting) exactly once (eval.registry's exclusive claims), retrying a failed attempt a
bounded number of times. The backend runs a claimed evaluation: LocalBackend in this process, or the
Slurm backend (slurm/eval_jobs.py) as job arrays with dependencies."""

import json
import sys
import traceback
from pathlib import Path

from . import registry
from .farm import finish, prepare, run_local, unfinished
from .settings import EvalSetting


class NotSubmitted(ValueError):
    """A backend's submission was refused before anything ran (sbatch's error): not an attempt."""


class LocalBackend:
    """Runs the claimed evaluation here and now; the claim (this process, its heartbeat on other hosts) is
    alive while it runs. A claim held by Slurm jobs (an earlier `--cluster slurm` pass) is asked of Slurm
    through `jobs_alive` where one answers here; where none does, it is left to its jobs, and said so."""

    name = "local"

    def __init__(self, progress: bool = False, jobs_alive=None, log=print):
        self.progress = progress
        self.jobs_alive = jobs_alive
        self.log = log
        self._told = set()

    def start(self, key_dir: Path, attempt: int) -> dict:
        run_local(key_dir, progress=self.progress)
        return {**registry.local_owner(), "state": "done"}

    def alive(self, owner: dict) -> bool:
        if "jobs" not in owner:
            return registry.local_alive(owner)
        if self.jobs_alive is not None:
            return self.jobs_alive(owner)
        jobs = ",".join(map(str, owner["jobs"]))
        if jobs not in self._told:
            self._told.add(jobs)
            self.log(f"[eval] Slurm job(s) {jobs} hold an evaluation and no Slurm answers here to say whether they "
                     "still run: it is left to them (run this where sinfo works to retry it if they are gone)")
        return True


def _complete_snapshots(run_dir: Path, say: bool = True):
    """(directory, config) of each complete snapshot of a run, oldest first (incomplete ones are not
    snapshots yet; a complete one whose config cannot be read is passed over, and said unless `say` is off)."""
    from models.snapshot import SnapshotError, read_config, read_manifest

    for d in sorted((Path(run_dir) / "snapshots").glob("*")):
        try:
            read_manifest(d)
        except SnapshotError:  # being written (no manifest yet), or not a snapshot
            continue
        try:
            yield d, read_config(d)
        except SnapshotError as e:  # complete, but its config cannot be read: said, not silently passed over
            if say:
                print(f"[eval] {e}; snapshot skipped", file=sys.stderr)


def _is_diffusion(meta: dict) -> bool:
    return meta.get("task", "diffusion") == "diffusion" and meta.get("model", {}).get("arch", "unet") == "unet"


def find_snapshots(run_dir: Path) -> list[Path]:
    """Complete diffusion-model snapshots of a run, oldest first."""
    return [d for d, meta in _complete_snapshots(run_dir) if _is_diffusion(meta)]


def not_evaluated_here(run_dir: Path) -> str | None:
    """Why a run whose complete snapshots are all of another kind (a noisy classifier's, an upsampler's) has
    nothing to schedule, with what to do instead; None when it has a diffusion snapshot or none at all yet."""
    kinds = set()
    for _, meta in _complete_snapshots(run_dir, say=False):  # (find_snapshots says it)
        if _is_diffusion(meta):
            return None
        kinds.add(meta.get("task", "diffusion"))
    if not kinds:
        return None
    use = {"classifier": "classifier=SNAPSHOT (--classifier) with a guidance scale",
           "upsampler": "upsampler=SNAPSHOT (--upsampler)"}
    how = "; ".join(f"a {k}'s snapshots are evaluated through a diffusion run's setting: {use[k]}"
                    for k in sorted(kinds) if k in use)
    return (f"{run_dir}: its snapshots are {' and '.join(sorted(kinds))} snapshots, which are not sampled on their "
            f"own" + (f" ({how})" if how else "") + "; schedule the diffusion run")


def has_weights(snap: Path, weights: str) -> bool:
    """Whether the snapshot holds these weights: a post-hoc EMA snapshot holds only its one reconstruction
    (ema), and one written before `power_ema` was set holds no phema_*."""
    from models.snapshot import SnapshotError, resolve_weights

    try:
        resolve_weights(snap, weights)
        return True
    except SnapshotError:
        return False


def newest_trained(snaps: list[Path]) -> Path | None:
    """The snapshot settings are checked against up front: the most trained one written by the training
    (post-hoc ones hold only ema), else the most trained of any."""
    from models.snapshot import read_config

    trained = [s for s in snaps if "posthoc" not in read_config(s)]
    return max(trained or snaps, key=snapshot_images, default=None)


def snapshot_images(snap: Path) -> int:
    """Training images seen when the snapshot was written (its config.json; else the name's imgNNN...)."""
    from models.snapshot import read_config

    meta = read_config(snap)
    if isinstance(meta.get("images"), int):
        return meta["images"]
    digits = Path(snap).name.removeprefix("img").split("-")[0]
    return int(digits) if digits.isdigit() else 0


def schedule_pass(run_dir: Path, settings: list[EvalSetting], ref: Path | None, backend, max_attempts: int = 3,
                  inception_weights: str | None = None, metric_workers: int = 1, log=print,
                  only: list[Path] | None = None, retry_failed: bool = False) -> dict:
    """One pass over snapshots (or `only` these) x settings. Returns counts: done (of which `now` were
    evaluated in this pass, by a backend that runs them at once), started, running, retrying (an
    attempt failed; the next pass tries again), failed (no attempts left). retry_failed: evaluations that
    ran out of attempts get max_attempts more. A snapshot without a setting's weights (a post-hoc one and
    `weights: raw`) is not that setting's to evaluate."""
    counts = {"done": 0, "started": 0, "running": 0, "retrying": 0, "failed": 0, "refused": 0, "now": 0}
    snaps = only or find_snapshots(run_dir)
    images = {snap: snapshot_images(snap) for snap in snaps}
    tb = Path(run_dir) / "tensorboard"
    logged = {p.name.rsplit(".eval-", 1)[1] for p in tb.glob("*.eval-*")} if tb.is_dir() else set()
    without_is = []
    picked = [set(images.values()) if only else s.picks(list(images.values())) for s in settings]  # every_kimg
    # cascades last: one may take its base images from a plain evaluation of the snapshot (eval.farm.reusable_base)
    order = sorted(zip(settings, picked), key=lambda pair: bool(pair[0].upsampler))
    for snap in snaps:
        for setting, chosen in order:
            if images[snap] not in chosen or not has_weights(snap, setting.weights):
                continue
            key_dir = prepare(run_dir, snap, setting, Path(setting.ref) if setting.ref else ref, inception_weights,
                              metric_workers)
            try:
                state = _advance(key_dir, backend, max_attempts, log, retry_failed)
            except NotSubmitted as e:  # (a submit limit, a flag): the next pass submits it again
                log(f"[eval] {key_dir.name}: {e}; not counted as an attempt")
                state = "refused"
            if state == "done" and unfinished(key_dir, logged) and not _attempt_alive(key_dir, backend):
                # a task that died after publishing (one still running is about to do this itself)
                try:
                    finish(key_dir)
                except Exception as e:  # (its numbers are safe in metrics.json; the next pass tries again)
                    log(f"[eval] {key_dir.name}: its TensorBoard point or feature compaction failed "
                        f"({type(e).__name__}: {e}); the next pass tries again")
            if state == "done" and inception_weights and "inception_score" not in _metrics_of(key_dir):
                without_is.append(key_dir.name)
            counts["now"] += state == "evaluated"
            counts["done" if state == "evaluated" else state] += 1
    if without_is:  # said, not silently left: IS is an extra of the evaluation, not part of its key
        log(f"[eval] {len(without_is)} evaluation(s) finished before --inception-weights was given have no "
            f"Inception Score (e.g. {without_is[0]}); delete their {Path(run_dir) / 'eval'}/<key>/ directories to "
            "evaluate them again with it")
    return counts


def _attempt_alive(key_dir: Path, backend) -> bool:
    tried = registry.attempts(key_dir)
    owner = registry.read_claim(key_dir, tried[-1]) if tried else {}
    return bool(owner) and owner.get("state") not in ("failed", "done") and backend.alive(owner)


def _metrics_of(key_dir: Path) -> dict:
    try:
        return json.loads((Path(key_dir) / registry.METRICS).read_text()).get("metrics", {})
    except (OSError, ValueError):
        return {}


def attempts_spent(key_dir: Path) -> int:
    """Attempts that count against max_attempts: those since the last --retry-failed."""
    tried = registry.attempts(key_dir)
    retried = max((int(p.stem.rsplit("-", 1)[1]) for p in Path(key_dir).glob("failed-after-*.json")), default=0)
    return (tried[-1] if tried else 0) - retried


def _advance(key_dir: Path, backend, max_attempts: int, log, retry_failed: bool = False) -> str:
    if (key_dir / registry.METRICS).is_file():
        return "done"
    tried = registry.attempts(key_dir)
    n = tried[-1] if tried else 0
    if (key_dir / registry.FAILED).is_file():
        if not retry_failed:
            return "failed"
        try:  # kept as failed-after-<n>.json: the attempts before it no longer count
            (key_dir / registry.FAILED).rename(key_dir / f"failed-after-{n}.json")
        except FileNotFoundError:
            pass  # another scheduler retries it too
    spent = attempts_spent(key_dir)
    if n:
        owner = registry.read_claim(key_dir, n)
        if owner.get("state") not in ("failed", "done") and backend.alive(owner):
            return "running"
        if (key_dir / registry.METRICS).is_file():
            return "done"
        why = owner.get("error") or getattr(backend, "ended_how", lambda *_: None)(owner, key_dir)
        if spent >= max_attempts:
            _give_up(key_dir, n, {**owner, "error": why})
            log(f"[eval] {key_dir.name}: failed {n} time(s); giving up (see {key_dir / registry.FAILED})")
            return "failed"
        log(f"[eval] {key_dir.name}: attempt {n} did not finish ({why or 'owner gone'}); retrying")
    if not registry.try_claim(key_dir, n + 1):
        return "running"  # another scheduler claimed it first
    log(f"[eval] {key_dir.name}: attempt {n + 1} ({backend.name})")
    try:
        with registry.heartbeat(key_dir, n + 1):  # the claim's proof of life until the backend's record replaces it
            owner = backend.start(key_dir, n + 1)
    except NotSubmitted:  # nothing runs (a bad flag, a submit limit): the claim is withdrawn, the caller told
        (key_dir / f"attempt-{n + 1}.json").unlink(missing_ok=True)
        raise
    except Exception as e:  # recorded on the claim: the next pass retries or gives up
        registry.update_claim(key_dir, n + 1, {**registry.local_owner(), "state": "failed",
                                               "error": f"{type(e).__name__}: {e}",
                                               "traceback": traceback.format_exc()[-4000:]})
        log(f"[eval] {key_dir.name}: attempt {n + 1} failed: {type(e).__name__}: {e}")
        return "failed" if spent + 1 >= max_attempts and _give_up(key_dir, n + 1, {"error": str(e)}) else "retrying"
    registry.update_claim(key_dir, n + 1, owner)
    return "evaluated" if (key_dir / registry.METRICS).is_file() else "started"


def _give_up(key_dir: Path, attempts: int, owner: dict) -> bool:
    """failed.json, whole or not at all, once (of two schedulers giving up together, one writes it)."""
    from .atomic import write_text_once

    if (key_dir / registry.FAILED).is_file():
        return True
    spec = json.loads((key_dir / registry.SETTING).read_text())
    write_text_once(key_dir / registry.FAILED, json.dumps(
        {**{k: spec.get(k) for k in ("key", "snapshot", "snapshot_name", "images", "setting", "evaluator")},
         "attempts": attempts, "last_error": owner.get("error")}, indent=2) + "\n")
    return True
