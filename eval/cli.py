"""`adm eval ...`: compare (ADM's evaluator), ref, run, schedule, results, and the farm's stages."""

import argparse
import json
import os
import sys
import time
from dataclasses import fields
from pathlib import Path

from adm.config import at_least, check_device, slurm_mem

from .settings import EvalSetting, load_settings


def add_setting_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("evaluation setting (or --settings YAML with a list of them)")
    g.add_argument("--settings", help="YAML list of settings (keys: the options below)")
    defaults = EvalSetting()
    for f in fields(EvalSetting):
        if f.name == "ref":  # (the command's own --ref; a settings file's entries may name one each)
            continue
        flag = "--" + f.name.replace("_", "-")
        kind = {"int": int, "float": float}.get(type(getattr(defaults, f.name)).__name__, str)
        g.add_argument(flag, dest=f"setting_{f.name}", type=kind, default=None,
                       help="default: from the steps, scale and upsampler (250, ddim25-s4, ddim25-cascade)" if f.name == "name"
                       else f"default {getattr(defaults, f.name)!r}")


def settings_from(args) -> list[EvalSetting]:
    given = {f.name: getattr(args, f"setting_{f.name}", None) for f in fields(EvalSetting)}
    given = {k: v for k, v in given.items() if v is not None}
    if args.settings:
        if given:
            raise ValueError(f"--settings {args.settings} and setting options ({', '.join(given)}) both given: "
                             "put everything in the YAML")
        return load_settings(args.settings)
    return [EvalSetting(**given)]


def json_target(path: str | None) -> Path | None:
    """A --json destination, checked (and its folder made) before any work, so the metrics are not lost."""
    if path is None:
        return None
    target = Path(path)
    if target.is_dir():
        raise ValueError(f"--json {target}: a directory; give a file name, e.g. {target / 'metrics.json'}")
    folder = next((p for p in target.parents if p.exists()), None)
    if folder is not None and not folder.is_dir():
        raise ValueError(f"--json {target}: {folder} is a file, not a directory")
    target.parent.mkdir(parents=True, exist_ok=True)
    return target


def write_json(target: Path | None, data) -> None:
    if target is not None:
        from .atomic import standard_json, write_text_atomic
        write_text_atomic(target, standard_json(data, indent=2) + "\n")


def add_cache_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cache-dir", help="where the reference's Inception features are kept between calls, by its "
                                       "content (default: $ADM_CACHE, else ~/.cache/adm)")
    p.add_argument("--no-cache", action="store_true", help="featurize the reference anew and keep nothing")


def cache_of(a) -> Path | None:
    from .metrics import user_cache

    return None if a.no_cache else Path(a.cache_dir) if a.cache_dir else user_cache()


def add_feature_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch-size", type=at_least(1), default=None, help="Inception batch (default: automatic)")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")


def add_cluster_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("where the evaluation jobs run")
    g.add_argument("--cluster", choices=["auto", "slurm", "local"], default="auto",
                   help="auto: Slurm if found (job arrays with dependencies), else this machine")
    g.add_argument("--partition", help="Slurm partition (default: the site file's, else the cluster's default)")
    g.add_argument("--account", help="Slurm account to charge")
    g.add_argument("--qos", help="Slurm quality of service")
    g.add_argument("--constraint", help="node features, Slurm's --constraint")
    g.add_argument("--mem", type=slurm_mem, help="memory per node, Slurm's form: 64G, 500M, 0 (all)")
    g.add_argument("--time", default="04:00:00", help="per task, HH:MM:SS")
    g.add_argument("--gpus-per-task", type=int, default=None, help="default: 1 if the cluster has GPUs, else 0")
    g.add_argument("--cpus-per-task", type=int, default=None, help="CPUs per task (default: the site file's, "
                   "else Slurm's); each task's torch threads follow it")
    g.add_argument("--array-parallelism", type=at_least(1), default=64, help="at most this many array tasks at once")
    g.add_argument("--metric-workers", type=at_least(1), default=1, help="tasks of the metrics job (precision/recall rows)")
    g.add_argument("--max-attempts", type=at_least(1), default=3, help="attempts per (snapshot, setting) before giving up")
    g.add_argument("--retry-failed", action="store_true", help="evaluations that gave up get --max-attempts more")
    g.add_argument("--inception-weights", help="torch-fidelity's full Inception weights file: adds Inception Score")


def _slurm_answers(patient: bool = True) -> bool:
    """sbatch is here and sinfo answers. Inside a Slurm job (a scheduled pass) Slurm is there for sure: a
    failing sinfo is a controller restarting, asked again for 2.5 minutes before the answer counts
    (unless not `patient`)."""
    import os
    import shutil
    import subprocess

    if not shutil.which("sbatch"):
        return False
    waits = (10, 20, 30, 40, 50) if patient and "SLURM_JOB_ID" in os.environ else ()
    for wait in (*waits, None):
        if subprocess.run(["sinfo", "-h"], capture_output=True).returncode == 0:
            return True
        if wait is not None:
            time.sleep(wait)
    return False


def backend_for(args):
    from .schedule import LocalBackend

    cluster = args.cluster
    if cluster == "auto":
        cluster = "slurm" if _slurm_answers() else "local"
    if cluster == "local":  # claims of an earlier Slurm pass are asked of Slurm where it answers
        answers = args.cluster == "local" and _slurm_answers(patient=False)
        if answers:
            from slurm.eval_jobs import jobs_alive
        return LocalBackend(progress=True, jobs_alive=jobs_alive if answers else None)
    if args.cluster == "slurm" and not _slurm_answers():
        raise ValueError("--cluster slurm: no Slurm answers here (sbatch missing or sinfo failing); "
                         "use --cluster local to run on this machine")
    from slurm.eval_jobs import SlurmBackend  # the submitter lives with the other Slurm code

    return SlurmBackend.from_args(args)


def cmd_compare(a) -> int:
    from .compare import compare

    target = json_target(a.json_out)
    result = compare(a.ref, a.sample, a.batch_size, a.device, a.pr_distance, a.inception_weights, cache_of(a))
    for k, v in result.items():
        print(f"{k}: {v:.6f}")
    needs = {"sfid": "spatial statistics (mu_s, sigma_s) or images in both files",
             "precision": "images (arr_0) in both files", "recall": "images (arr_0) in both files",
             "inception_score": "the sample's images and --inception-weights"}
    for k, need in needs.items():
        if k not in result and (k != "inception_score" or a.inception_weights):  # IS only when asked for
            print(f"{k}: not computed (needs {need})")
    write_json(target, result)
    return 0


def cmd_ref(a) -> int:
    from .reference import build_reference

    check_out_file(a.out, "--out", a.overwrite)  # before minutes of features, not after
    meta = build_reference(a.shards, a.out, a.resolution, a.pr_num, a.limit, a.batch_size, a.device,
                           progress=True)
    print(f"reference {a.out}: statistics of {meta['num_images']} images at {a.resolution}x{a.resolution}, "
          f"{meta['num_pr']} kept for precision/recall" + (f", {meta['skipped']} skipped" if meta["skipped"] else ""))
    return 0


def check_out_file(out: str, option: str, overwrite: bool = False) -> None:
    """A file the command will write at its end: refused now where it cannot be written, or would replace a
    file without --overwrite."""
    path = Path(out)
    if path.is_dir():
        raise ValueError(f"{option} {out}: a directory; give a file name (e.g. {path / 'ref.npz'})")
    parent = next((p for p in path.absolute().parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise ValueError(f"{option} {out}: {parent} is a file, not a folder")
    if parent is not None and not os.access(parent, os.W_OK):
        raise ValueError(f"{option} {out}: {parent} is not writable")
    if path.exists() and not overwrite:
        raise ValueError(f"{option} {out} exists; pass --overwrite to replace it, or give another name")


def _check_ref(ref: str, option: str = "--ref") -> None:
    if not Path(ref).is_file():
        raise FileNotFoundError(f"{option} {ref}: no such file (build one with `adm eval ref SHARDS --out REF.npz`)")


def refs_of(settings: list[EvalSetting], ref: str | None) -> dict[str, list[EvalSetting]]:
    """The settings by the reference each is evaluated against (its own `ref:`, else --ref), every file checked."""
    by_ref: dict[str, list[EvalSetting]] = {}
    for s in settings:
        if not (s.ref or ref):
            raise ValueError(f"setting {s.name!r} has no reference: give --ref REF.npz, or `ref:` in its entry")
        by_ref.setdefault(s.ref or ref, []).append(s)
    for r, group in by_ref.items():
        _check_ref(r, "--ref" if any(not s.ref for s in group) else f"setting {group[0].name!r}: ref")
    return by_ref


def check_all(snapshot, settings: list[EvalSetting], ref: str | None, inception_weights: str | None) -> None:
    from .preflight import check

    for r, group in refs_of(settings, ref).items():
        check(snapshot, group, r, inception_weights)


def cmd_run(a) -> int:
    """Evaluate one snapshot now, for each setting (through the registry: done ones are reused)."""
    from . import registry
    from .farm import prepare, run_dir_of
    from .schedule import attempts_spent, schedule_pass

    snap = Path(a.snapshot).resolve()
    settings = settings_from(a)
    check_all(snap, settings, a.ref, a.inception_weights)  # before anything is claimed or queued
    run_dir = run_dir_of(snap)
    backend = backend_for(a)
    counts = schedule_pass(run_dir, settings, a.ref and Path(a.ref), backend, a.max_attempts, a.inception_weights,
                           a.metric_workers, only=[snap], retry_failed=a.retry_failed)
    key_dirs = [prepare(run_dir, snap, s, Path(s.ref or a.ref), a.inception_weights, a.metric_workers)
                for s in settings]
    if backend.name == "slurm" and a.wait:
        backend.wait_all()
        _wait_for_other_passes(snap, settings, key_dirs, backend)
    unfinished = False
    for s, key_dir in zip(settings, key_dirs):
        if (key_dir / registry.METRICS).is_file():
            m = json.loads((key_dir / registry.METRICS).read_text())["metrics"]
            print(f"{snap.name} {s.name}: " + "  ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                                                        for k, v in m.items()))
            continue
        failed = key_dir / registry.FAILED
        tried = registry.attempts(key_dir)
        claim = registry.read_claim(key_dir, tried[-1]) if tried else {}
        if failed.is_file():
            f = json.loads(failed.read_text())
            print(f"{snap.name} {s.name}: FAILED after {f['attempts']} attempt(s): {f['last_error']} ({key_dir}); "
                  "--retry-failed tries again")
        elif claim.get("state") == "failed":
            print(f"{snap.name} {s.name}: attempt {attempts_spent(key_dir)} of {a.max_attempts} failed: {claim.get('error')}; "
                  f"run the command again to retry ({key_dir})")
        elif not tried:
            print(f"{snap.name} {s.name}: not submitted: Slurm refused it (above); no attempt counted ({key_dir})")
        elif backend.name == "slurm" and a.wait:  # waited for: its jobs ended, and no result came
            why = backend.ended_how(claim, key_dir) if claim else None
            print(f"{snap.name} {s.name}: attempt {attempts_spent(key_dir)} of {a.max_attempts} ended without a "
                  f"result ({why or 'its jobs ended'}); run the command again to retry ({key_dir})")
            unfinished = True
        else:
            print(f"{snap.name} {s.name}: submitted ({key_dir})")
    return 0 if counts["failed"] == counts["retrying"] == counts["refused"] == 0 and not unfinished else 1


WAIT_POLL_S = 30  # how often `adm eval run --wait` asks Slurm about jobs another pass submitted


def _wait_for_other_passes(snap: Path, settings, key_dirs: list[Path], backend) -> None:
    """`--wait` for the evaluations whose running attempt another pass (the schedule, another `adm eval run`)
    submitted: this process holds no handle on those jobs, so it asks about the claim's jobs until they end."""
    from . import registry

    told = set()
    while True:
        running = False
        for s, key_dir in zip(settings, key_dirs):
            tried = registry.attempts(key_dir)
            if (key_dir / registry.METRICS).is_file() or not tried:
                continue
            claim = registry.read_claim(key_dir, tried[-1])
            if claim.get("state") not in ("failed", "done") and backend.alive(claim):
                running = True
                if (key_dir, tried[-1]) not in told:
                    told.add((key_dir, tried[-1]))
                    print(f"{snap.name} {s.name}: attempt {tried[-1]} is running (Slurm jobs "
                          f"{', '.join(map(str, claim.get('jobs', [])))}, submitted by another pass); waiting",
                          flush=True)
        if not running:
            return
        time.sleep(WAIT_POLL_S)


def _pass_ahead(others: list[dict], chain: str, mine: str | None) -> str | None:
    """Why this pass of a recurring schedule ends, given the run's other passes Slurm holds: a pass of an older
    chain (two schedules started at once: the older goes on, whichever pass meets the other), or this chain's
    next pass, already queued (this pass is running again: a requeue). Chains are named by their first job,
    which no pass changes, so the rule settles at the first meeting."""
    for other in sorted(others, key=lambda o: _job_number(o["chain"])):
        if _job_number(other["chain"]) < _job_number(chain):
            return f"{other['job']} is an older schedule's pass (chain {other['chain']}, this one {chain})"
        if other["chain"] == chain and _job_number(other["job"]) > _job_number(mine):
            return f"{other['job']} is this schedule's next pass, queued already (this pass ran again)"
    return None


def _job_number(job: str) -> float:
    try:
        return float(str(job).split("_")[0])
    except ValueError:
        return float("inf")


def parse_every(text: str) -> float:
    """A pass interval: 30m, 2h, 1d, or seconds; between a minute and a year."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    if text and text[-1] in units and text[:-1].replace(".", "", 1).isdigit():
        seconds = float(text[:-1]) * units[text[-1]]
    elif text.replace(".", "", 1).isdigit():
        seconds = float(text)
    else:
        raise ValueError(f"--every {text!r}: expected a duration such as 30m, 2h or 1d")
    if not 60 <= seconds <= 365 * 86400:
        raise ValueError(f"--every {text!r}: between 1m and 365d, please (each pass rewrites the report)")
    return seconds


def _without_option(argv: list[str], name: str) -> list[str]:
    """argv without `name VALUE` / `name=VALUE`."""
    out, skip = [], False
    for x in argv:
        if skip:
            skip = False
        elif x == name:
            skip = True
        elif not x.startswith(name + "="):
            out.append(x)
    return out


SCHEDULED_PASS = "ADM_SCHEDULED_PASS"  # set in the recurring chain's Slurm jobs (slurm/eval_jobs.py)
SCHEDULE_CHAIN = "ADM_SCHEDULE_CHAIN"  # and the chain's name there: its first job's id


def cmd_schedule(a) -> int:
    from .report import write_report
    from .schedule import schedule_pass

    run_dir = Path(a.run_dir)
    if not (run_dir / "snapshots").is_dir():
        raise FileNotFoundError(f"{run_dir}: no snapshots/ directory (is it a training run directory?)")
    every = parse_every(a.every)
    settings = settings_from(a)
    from .schedule import find_snapshots, newest_trained, not_evaluated_here

    if (why := not_evaluated_here(run_dir)):
        raise ValueError(why)
    newest = newest_trained(find_snapshots(run_dir))
    in_chain = bool(os.environ.get(SCHEDULED_PASS))

    def checked():  # the references, and each setting against the newest snapshot the training wrote
        if newest:
            check_all(newest, settings, a.ref, a.inception_weights)
        else:
            refs_of(settings, a.ref)

    if not in_chain:  # typed by a user: refused before anything runs
        checked()
    backend = backend_for(a)
    chain = (os.environ.get(SCHEDULE_CHAIN) or os.environ.get("SLURM_JOB_ID")) if in_chain else None
    if backend.name == "slurm" and not a.once and (others := backend.schedule_passes(run_dir)):
        if chain is None:
            other = others[0]["job"]
            raise ValueError(f"{run_dir} is already scheduled: job {other} is its next pass (one schedule per run; "
                             f"`adm jobs cancel {other} --run-dir {run_dir}` first to change it)")
        if (ahead := _pass_ahead(others, chain, os.environ.get("SLURM_JOB_ID"))):
            print(f"[eval] {run_dir}: job {ahead}; this pass ends, that one goes on")
            return 0  # so that exactly one chain survives, with one pending pass
    while True:
        try:
            if in_chain:  # a pass of the recurring chain: a file damaged since fails this pass, not the schedule
                checked()
            counts = schedule_pass(run_dir, settings, a.ref and Path(a.ref), backend, a.max_attempts,
                                   a.inception_weights, a.metric_workers, retry_failed=a.retry_failed)
            a.retry_failed = False  # once: the later passes give up on what fails again
            report = write_report(run_dir)
        except Exception as e:  # a recurring schedule outlives a pass that fails: the next one tries again
            if a.once:
                raise
            import traceback
            traceback.print_exc()
            print(f"[eval] {time.strftime('%H:%M:%S')} {run_dir}: this pass failed ({type(e).__name__}: {e}); "
                  "the next pass tries again", file=sys.stderr, flush=True)
        else:
            print(f"[eval] {time.strftime('%H:%M:%S')} {run_dir}: {counts['done']} done ({counts['now']} in this "
                  "pass), " + ", ".join(f"{v} {k}" for k, v in counts.items() if k not in ("done", "now"))
                  + f"; report {report}", flush=True)
            if a.once:
                return 0 if counts["failed"] == 0 else 1
        if backend.name == "slurm":  # the next pass is a Slurm job that begins later and resubmits itself
            argv = [x for x in (sys.argv[1:] if a.argv is None else a.argv) if x != "--retry-failed"]  # once only
            argv = _without_option(argv, "--cluster") + ["--cluster", "slurm"]  # never `auto` falling back to local
            job = backend.submit_schedule(argv, every, run_dir, chain)
            print(f"[eval] next pass: job {job} begins in {a.every}")
            return 0
        print(f"[eval] next pass at {time.strftime('%H:%M', time.localtime(time.time() + every))} (in {a.every}; "
              "no Slurm, so this command stays in the foreground: Ctrl-C stops it, --once runs one pass for cron)",
              flush=True)
        time.sleep(every)


def cmd_results(a) -> int:
    from .registry import failures, results

    if not Path(a.run_dir).is_dir():
        raise FileNotFoundError(f"{a.run_dir}: no such run directory")
    if not any((Path(a.run_dir) / d).exists() for d in ("eval", "snapshots", "training_options.json")):
        raise ValueError(f"{a.run_dir}: not a run directory (no eval/, snapshots/ or training_options.json)")
    found = results(Path(a.run_dir))  # once: the table and the JSON are the same records
    rows = [(r["snapshot_name"], r["label"], str(r["metrics"]["num_samples"]),
             *(f"{r['metrics'][k]:.4f}" if k in r["metrics"] else "-"
               for k in ("fid", "sfid", "precision", "recall", "inception_score"))) for r in found]
    head = ("snapshot", "setting", "N", "FID", "sFID", "precision", "recall", "IS")
    write_json(json_target(a.json_out), found)
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    for row in [head, *rows]:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))
    for f in failures(Path(a.run_dir)):
        print(f"FAILED {f['snapshot_name']} {f['setting']['name']} after {f['attempts']} attempts: "
              f"{f.get('last_error') or 'no error recorded'}")
    return 0


def cmd_features(a) -> int:
    from .features import featurize_dir, sample_shards

    if not 0 <= a.index < a.count:
        raise ValueError(f"--index {a.index} of --count {a.count}: expected 0 <= index < count")
    if not Path(a.samples).is_dir() or not sample_shards(Path(a.samples)):
        raise FileNotFoundError(f"{a.samples}: no samples-*.npz shards there (adm sample writes them)")
    paths = featurize_dir(Path(a.samples), Path(a.out), a.index, a.count, batch_size=a.batch_size, device=a.device)
    print(f"{len(paths)} feature shard(s) in {a.out}")
    return 0


def cmd_metrics(a) -> int:
    from .comm import discover
    from .features import load_features
    from .inception import logits_weight
    from .metrics import load_reference, reduce

    target = json_target(a.json_out)
    comm = discover(a.workers)
    w = logits_weight(a.inception_weights) if a.inception_weights else None
    feats = load_features(Path(a.features))
    ref = load_reference(a.ref, cache_dir=cache_of(a))
    result = reduce(feats, ref, a.ref, a.pr_distance, comm, w, a.device)
    comm.close()
    if comm.rank == 0:
        result["workers"] = comm.size
        for k, v in result.items():
            print(f"{k}: {v:.6f}" if isinstance(v, float) else f"{k}: {v}")
        write_json(target, result)
    return 0


def main(argv=None, prog="adm eval") -> int:
    parser = argparse.ArgumentParser(prog=prog, description="evaluation: FID, sFID, precision, recall (and IS)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("compare", help="ADM's evaluator: REF.npz vs SAMPLE.npz")
    p.add_argument("ref", help="reference npz: images (arr_0, uint8 NHWC) or statistics (mu, sigma, mu_s, sigma_s)")
    p.add_argument("sample", help="sample npz, in the same formats as REF")
    p.add_argument("--json", dest="json_out", help="write the metrics here")
    p.add_argument("--pr-distance", choices=["fp32", "fp16"], default="fp32",
                   help="distance arithmetic for precision/recall (fp16: ADM's, for published numbers)")
    p.add_argument("--inception-weights", help="torch-fidelity's full Inception weights file: adds Inception Score")
    add_feature_args(p)
    add_cache_args(p)
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("ref", help="a reference batch (ADM format) from WebDataset shards")
    p.add_argument("shards", help="a split written by `adm data write` (shards + manifest.json)")
    p.add_argument("--out", required=True, help="the reference batch to write (npz: statistics + images)")
    p.add_argument("--resolution", type=int, required=True, help="image side the shards must hold (checked)")
    p.add_argument("--pr-num", type=at_least(4), default=10000, help="images kept for precision/recall")
    p.add_argument("--limit", type=at_least(2), help="use only the first N images of the split")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    add_feature_args(p)
    p.set_defaults(func=cmd_ref)

    p = sub.add_parser("run", help="evaluate one snapshot now (recorded in its run's registry)")
    p.add_argument("snapshot", help="a snapshot directory of a training run")
    p.add_argument("--ref", help="reference batch (npz) of the settings without a `ref:` of their own")
    p.add_argument("--wait", action="store_true", help="on Slurm: wait for the jobs")
    add_setting_args(p)
    add_cluster_args(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("schedule", help="evaluate every new snapshot of a run, now and every --every")
    p.add_argument("run_dir", help="a training run directory (its snapshots/ are evaluated)")
    p.add_argument("--ref", help="reference batch (npz) of the settings without a `ref:` of their own")
    p.add_argument("--every", default="2h", help="time between passes (30m, 2h, 1d)")
    p.add_argument("--once", action="store_true", help="one pass, then exit")
    add_setting_args(p)
    add_cluster_args(p)
    p.set_defaults(func=cmd_schedule, argv=None)

    p = sub.add_parser("results", help="the registry of a run: metrics per snapshot and setting")
    p.add_argument("run_dir", help="a training run directory")
    p.add_argument("--json", dest="json_out", help="also write the results here as JSON")
    p.set_defaults(func=cmd_results)

    p = sub.add_parser("features", help="farm stage: sample shards -> feature shards (worker INDEX of COUNT)")
    p.add_argument("samples", help="a directory of sample shards written by `adm sample`")
    p.add_argument("--out", required=True, help="directory for the feature shards")
    p.add_argument("--index", type=at_least(0), default=0, help="this worker's index (0-based)")
    p.add_argument("--count", type=at_least(1), default=1, help="workers in all; worker i takes every count-th shard")
    add_feature_args(p)
    p.set_defaults(func=cmd_features)

    p = sub.add_parser("metrics", help="farm stage: feature shards + reference -> metrics (MPI/torchrun workers)")
    p.add_argument("features", help="a directory of feature shards written by `adm eval features`")
    p.add_argument("--ref", required=True, help="reference batch (npz)")
    p.add_argument("--json", dest="json_out", help="write the metrics here")
    p.add_argument("--pr-distance", choices=["fp32", "fp16"], default="fp32",
                   help="distance arithmetic for precision/recall (fp16: ADM's, for published numbers)")
    p.add_argument("--inception-weights", help="torch-fidelity's full Inception weights file: adds Inception Score")
    p.add_argument("--workers", choices=["auto", "single", "mpi", "torch"], default="auto",
                   help="auto: MPI ranks under mpiexec/srun --mpi, torch.distributed under torchrun")
    p.add_argument("--device", default=None, help="for precision/recall; default: the rank's GPU if any, else cpu")
    add_cache_args(p)
    p.set_defaults(func=cmd_metrics)

    a = parser.parse_args(argv)
    if getattr(a, "device", None):
        check_device(a.device)
    if a.command == "schedule":
        a.argv = list(sys.argv[1:] if argv is None else argv)
    return a.func(a)
