"""`adm submit train ...` and `adm jobs ...`: training on Slurm through submitit (or locally)."""

import argparse
import contextlib
import datetime
import getpass
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from adm.config import at_least, slurm_mem

from . import records

CLUSTERS = ("auto", "slurm", "local", "debug")


CANCELLED = "cancelled"  # in a local job's folder: `adm jobs cancel` stopped it
SITE_KEYS = ("partition", "account", "qos", "constraint", "mem", "cpus_per_task", "setup")


def site_defaults() -> dict:
    """Cluster defaults (partition, account, qos, setup lines, ...) from $ADM_SITE or ~/.config/adm/site.yaml."""
    import yaml

    from adm.config import load_yaml, yaml_problem

    for path in (os.environ.get("ADM_SITE"), Path.home() / ".config" / "adm" / "site.yaml"):
        if path and Path(path).is_file():
            try:
                data = load_yaml(path) or {}
            except yaml.YAMLError as e:
                raise ValueError(f"{path}: not valid YAML: {yaml_problem(e)}") from None
            if not isinstance(data, dict):
                raise ValueError(f"{path}: expected a mapping of option: value")
            unknown = sorted(set(map(str, data)) - set(SITE_KEYS))
            if unknown:  # a typo (partitoin:) would otherwise be ignored, and jobs land on the default partition
                raise ValueError(f"{path}: unknown option(s) {', '.join(unknown)}; known: {', '.join(SITE_KEYS)}")
            _check_site(path, data)
            return data
    return {}


def _check_site(path, data: dict) -> None:
    """Each site option of the type sbatch takes, named with its file: a list or a number where a name goes
    reached sbatch (or submitit) as a traceback or a bare `#SBATCH --qos` line."""
    import argparse

    from adm.config import slurm_mem

    for key in ("partition", "account", "qos", "constraint"):
        if key in data and not (isinstance(data[key], str) and data[key].strip()):
            raise ValueError(f"{path}: {key}: expected a name, got {data[key]!r}")
    if "mem" in data:
        try:
            slurm_mem(str(data["mem"]))
        except argparse.ArgumentTypeError as e:
            raise ValueError(f"{path}: mem: {e}") from None
    cpus = data.get("cpus_per_task")
    if cpus is not None and (not isinstance(cpus, int) or isinstance(cpus, bool) or cpus < 1):
        raise ValueError(f"{path}: cpus_per_task: expected a whole number of at least 1, got {cpus!r}")
    setup = data.get("setup", [])
    if not isinstance(setup, list) or not all(isinstance(line, str) for line in setup):
        raise ValueError(f"{path}: setup must be a list of shell lines (strings), got {setup!r}")


def parse_time(value: str) -> int:
    """Slurm's --time forms -> minutes (seconds rounded up): M, M:S, H:M:S, D-H, D-H:M, D-H:M:S."""
    parts = None
    if m := re.fullmatch(r"(\d+)-(\d+)(?::(\d+))?(?::(\d+))?", value):
        parts = [int(x) if x else 0 for x in m.groups()]
    elif re.fullmatch(r"\d+(?::\d+){0,2}", value):
        fields = [int(x) for x in value.split(":")]
        parts = [0, 0, *fields[:1], 0] if len(fields) == 1 else [0, 0, *fields] if len(fields) == 2 else [0, *fields]
    if parts is None:
        raise ValueError(f"--time {value!r}: expected one of Slurm's forms: minutes, MM:SS, HH:MM:SS, D-HH, "
                         "D-HH:MM or D-HH:MM:SS")
    d, h, mi, sec = parts
    return d * 1440 + h * 60 + mi + (1 if sec else 0)


def slurm_available() -> bool:
    return shutil.which("sbatch") is not None and subprocess.run(["sinfo", "-h"], capture_output=True).returncode == 0


def check_partition(partition: str | None) -> None:
    if not partition or not shutil.which("sinfo"):
        return
    names = subprocess.run(["sinfo", "-h", "-o", "%R"], capture_output=True, text=True).stdout.split()
    if names and partition not in names:
        raise ValueError(f"--partition {partition!r}: Slurm knows {', '.join(sorted(set(names)))}")


def _partition_numbers(field: str, partition: str | None) -> tuple[str | None, list[int]]:
    """The partition (the default one, marked *, without a name) and sinfo's numeric `field` (%D nodes, %c CPUs
    per node) on each of its rows (one per node state or kind); [] without sinfo or such a partition."""
    if not shutil.which("sinfo"):
        return partition, []
    rows = subprocess.run(["sinfo", "-h", "-o", f"%P {field}"], capture_output=True, text=True).stdout.split("\n")
    rows = [r.split() for r in rows if len(r.split()) == 2 and r.split()[1].isdigit()]
    name = partition or next((r[0].rstrip("*") for r in rows if r[0].endswith("*")), None)
    return name, [int(r[1]) for r in rows if r[0].rstrip("*") == name]


def check_nodes(nodes: int, partition: str | None) -> None:
    """More nodes than the partition has would pend forever (Reason=PartitionConfig): refused here."""
    name, counts = _partition_numbers("%D", partition)
    if counts and nodes > sum(counts):
        raise ValueError(f"--nodes {nodes}: partition {name!r} has {sum(counts)} node(s); the job would pend forever")


def node_cpus(partition: str | None) -> int | None:
    """CPUs of the partition's smallest node (the default partition's without one), as sinfo says; None
    where it does not."""
    return min(_partition_numbers("%c", partition)[1], default=None)


def _sacctmgr_names(*query: str) -> list[str]:
    if not shutil.which("sacctmgr"):
        return []
    proc = subprocess.run(["sacctmgr", "-n", "-P", "show", *query], capture_output=True, text=True, timeout=30)
    return sorted(set(proc.stdout.split())) if proc.returncode == 0 else []


def check_account(account: str | None, qos: str | None = None) -> None:
    """Slurm accepts an unknown account or QOS when accounting is not enforced: refuse them here instead."""
    user = os.environ.get("USER") or getpass.getuser()
    names = _sacctmgr_names("associations", f"user={user}", "format=account") if account else []
    if names and account not in names:
        raise ValueError(f"--account {account!r}: Slurm user {user!r} may use {', '.join(names)}")
    names = _sacctmgr_names("qos", "format=name") if qos else []
    if names and qos not in names:
        raise ValueError(f"--qos {qos!r}: Slurm knows {', '.join(names)}")


@contextlib.contextmanager
def outside_any_job():
    """Submit as from a login shell. Inside a job (the scheduler's next pass, a training submitted from an
    allocation), the job's own SLURM_* variables would reach the new job's srun (CPU binding, CPUs per task)
    and its MASTER_*/RANK would reach its ranks; submitit's clean_env hides them. SLURM_CONF says which
    cluster this is (a site with several, the local test cluster): kept."""
    import submitit

    keep = {k: os.environ[k] for k in ("SLURM_CONF",) if k in os.environ}
    with submitit.helpers.clean_env():
        os.environ.update(keep)
        yield


def submit_or_explain(submit):
    """Run a submitit submission; sbatch's refusal becomes a one-line error instead of a traceback."""
    from submitit.core.utils import FailedJobError

    try:
        with outside_any_job():
            return submit()
    except FailedJobError as e:
        raise ValueError(f"Slurm refused the job: {sbatch_error(str(e))}") from None


def sbatch_error(text: str) -> str:
    """sbatch's own error lines (submitit wraps them in its command and output), joined on one line."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    errors = [re.split(r"(?:error|fatal):", ln, maxsplit=1)[1].strip() for ln in lines if re.search(r"(error|fatal):", ln)]
    return "; ".join(dict.fromkeys(errors)) or (lines[-1] if lines else "sbatch failed")


@contextlib.contextmanager
def stdio_to(path: Path):
    """File descriptors 1 and 2 go to `path` meanwhile. A process started now inherits them: submitit's
    local controller, which runs the job after this command returns, would otherwise keep this command's
    stdout open, so that `out=$(adm submit ...)` or a pipe waited for the whole job."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for f in (fd, *saved):
            os.close(f)


def queued_jobs() -> set[str]:
    """Jobs Slurm still holds: pending, running, or ending (a cancelled job's ranks may still be saving)."""
    if not shutil.which("squeue"):
        return set()
    ids = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True).stdout.split()
    return set(ids) | {i.split("_")[0] for i in ids}  # an array's tasks show as JOB_TASK or JOB_[range]


def running_job_for(run_dir: Path, kinds: tuple[str, ...] = ("train",), exclude: str | None = None) -> str | None:
    """A job of ours of these kinds that is still pending or running in this run directory (Slurm's, or a
    local one), or for trainings, another training holding it (`adm train` by hand). Evaluation jobs do
    not keep a training from resuming, nor the other way round."""
    from trainer.runlock import holder

    active = queued_jobs()
    for rec in records.read(run_dir):
        if rec.get("kind", "train") not in kinds or str(rec["job_id"]) == exclude:
            continue
        if str(rec["job_id"]) in active or (rec.get("cluster") == "local" and _local_state(rec) == "RUNNING"):
            return str(rec["job_id"])
    held = holder(run_dir) if "train" in kinds else None
    return f"pid {held.get('pid')} on {held.get('host')}" if held else None


def make_executor(args, folder: Path, site: dict):
    import submitit

    cluster = args.cluster
    if cluster == "auto":
        cluster = "slurm" if slurm_available() else "local"
    executor = submitit.AutoExecutor(folder=str(folder), cluster=cluster,
                                     slurm_max_num_timeout=args.max_timeouts)
    params = dict(name=args.name, timeout_min=args.minutes, nodes=args.nodes, tasks_per_node=args.gpus_per_node,
                  gpus_per_node=args.gpus_per_node if args.gpus else None)
    slurm = dict(slurm_partition=args.partition or site.get("partition"),
                 slurm_account=args.account or site.get("account"), slurm_qos=args.qos or site.get("qos"),
                 slurm_constraint=args.constraint or site.get("constraint"),
                 slurm_signal_delay_s=args.signal_delay, slurm_mem=args.mem or site.get("mem"),
                 # a task that dies (OOM killer, segfault) ends the step: the others would wait in a collective
                 slurm_srun_args=["--kill-on-bad-exit=1"],
                 slurm_setup=list(site.get("setup", [])) or None,
                 slurm_additional_parameters={**({"exclusive": True} if args.exclusive else {}),
                                              **({"dependency": args.dependency} if args.dependency else {})} or None,
                 # unset, Slurm often gives a task 1 CPU: a GPU task gets its data workers + 2 (itself, pinning),
                 # a CPU task its share of a node (the partition's, not this login node's)
                 cpus_per_task=args.cpus_per_task or site.get("cpus_per_task") or
                 (max(1, (node_cpus(args.partition or site.get("partition")) or os.cpu_count() or 1)
                      // args.gpus_per_node) if args.cpu and cluster == "slurm" else
                  getattr(args, "default_cpus_per_task", None)))
    if cluster == "slurm":
        params.update({k: v for k, v in slurm.items() if v is not None})
    elif cluster == "local":
        # gpus_per_node too: without it submitit's local executor hides every GPU (CUDA_VISIBLE_DEVICES="")
        params = {k: v for k, v in params.items() if k in ("name", "timeout_min", "tasks_per_node", "gpus_per_node") and v}
    else:
        params = {}
    executor.update_parameters(**{k: v for k, v in params.items() if v is not None})
    if cluster == "local":  # submitit's local executor has the signal delay too (default 30 s), not via AutoExecutor
        executor._executor.update_parameters(signal_delay_s=args.signal_delay)
    return executor, cluster


def cmd_submit_train(args) -> int:
    from trainer.cli import already_done, check_data, check_resume
    from trainer.config import load_train_config

    site = site_defaults()
    args.minutes = parse_time(args.time)
    for flag, value in (("--nodes", args.nodes), ("--gpus-per-node", args.gpus_per_node)):
        if value < 1:
            raise ValueError(f"{flag}: need at least 1, got {value}")
    cfg = load_train_config(args.config, args.overrides)  # a bad config fails before anything is queued
    if args.nodes > 1 and (args.cluster in ("local", "debug") or (args.cluster == "auto" and not slurm_available())):
        raise ValueError(f"--nodes {args.nodes}: --cluster {args.cluster} runs on this one machine; use --nodes 1 "
                         "(and --gpus-per-node for its processes)")
    world = args.nodes * args.gpus_per_node
    cfg.batch_layout(world)
    check_data(cfg, world)
    check_resume(cfg)
    done = already_done(cfg)
    if done:
        print(done)
        return 0
    if args.minutes * 60 <= args.signal_delay + 60:
        raise ValueError(f"--time {args.time} leaves no room: the preemption signal comes {args.signal_delay} s "
                         "before the limit and a save needs time too (raise --time or lower --signal-delay)")
    args.gpus = bool(args.gpus_per_node and _gpus_requested(args))
    run_dir = Path(cfg.run_dir)
    busy = running_job_for(run_dir)
    if busy and busy.startswith("pid "):
        raise ValueError(f"{run_dir} is in use by another training, {busy}: wait for it, or stop it")
    if busy:
        raise ValueError(f"{run_dir} is in use by job {busy} (pending or running): wait for it or `adm jobs cancel {busy}`")
    check_partition(args.partition or site.get("partition"))
    if (args.cluster == "slurm" or (args.cluster == "auto" and slurm_available())):
        check_nodes(args.nodes, args.partition or site.get("partition"))
    check_account(args.account or site.get("account"), args.qos or site.get("qos"))
    args.name = args.name or f"adm-{run_dir.name}"
    folder = run_dir / "slurm" / "%j"
    args.default_cpus_per_task = cfg.data_workers + 2
    made = [d for d in (run_dir / "slurm", run_dir) if not d.exists()]  # by submitit's executor: a dry run keeps none
    executor, cluster = make_executor(args, folder, site)
    if cluster == "debug":
        if world != 1:
            raise ValueError(f"--cluster debug runs one process in this one (for breakpoints): use --nodes 1 "
                             f"--gpus-per-node 1, not a world of {world}")
        args.wait = True  # submitit's debug executor runs the job in-process when its result is asked for
    if args.dry_run:
        from dataclasses import asdict

        if cluster != "slurm":
            print(f"(cluster {cluster}: no sbatch script; would run {world} local task(s))")
        else:
            print(executor._executor._make_submission_file_text("<command>", "<uid>"))
        print(json.dumps({"config": args.config, "overrides": args.overrides, "resolved": asdict(cfg)}, indent=2))
        for d in made:  # (folders only: nothing was written into them)
            if d.is_dir() and not any(f.is_file() for f in d.rglob("*")):
                shutil.rmtree(d)
        return 0
    from .jobs import TrainJob

    if cluster == "local":  # its controller outlives this command: it must not hold our stdout/stderr
        (run_dir / "slurm").mkdir(parents=True, exist_ok=True)
        with stdio_to(run_dir / "slurm" / "local-controller.log"):
            job = executor.submit(TrainJob(args.config, args.overrides))
    else:
        job = submit_or_explain(lambda: executor.submit(TrainJob(args.config, args.overrides)))
    started = {"started": process_start(int(job.job_id))} if cluster == "local" else {}  # pids get reused
    records.add(run_dir, {"job_id": job.job_id, "cluster": cluster, "kind": "train", "config": args.config, **started,
                          "overrides": args.overrides, "nodes": args.nodes, "tasks_per_node": args.gpus_per_node,
                          "folder": str(run_dir / "slurm" / str(job.job_id))})
    print(f"submitted job {job.job_id} ({cluster}); logs: {run_dir / 'slurm' / str(job.job_id)}; "
          f"watch: adm jobs {run_dir}")
    if args.wait:
        job.results()
        print(f"job {job.job_id} finished")
    return 0


def _gpus_requested(args) -> bool:
    if args.cpu:
        return False
    if args.cluster in ("local", "debug") or (args.cluster == "auto" and not slurm_available()):
        import torch  # this machine runs the tasks: it has a GPU or they run on its CPU
        return torch.cuda.is_available()
    if not shutil.which("sinfo"):
        raise ValueError("--cluster slurm: no Slurm here (sinfo is not on PATH); use --cluster local to run on this "
                         "machine")
    info = subprocess.run(["sinfo", "-h", "-o", "%G"], capture_output=True, text=True)
    if info.returncode != 0:
        said = " ".join((info.stderr or info.stdout).split()) or "no message"  # one line (sinfo's span several)
        raise ValueError(f"--cluster slurm: sinfo failed ({said}), "
                         "so whether the cluster has GPUs is unknown; is slurmctld up?")
    if "gpu" not in info.stdout:
        raise ValueError("GPUs were requested but this cluster has no GPUs (sinfo shows no gres/gpu): "
                         "pass --cpu to run one CPU task per --gpus-per-node instead")
    return True


def sacct(job_ids: list[str]) -> dict[str, dict]:
    if not job_ids or not shutil.which("sacct"):
        return {}
    # -D: every requeued incarnation is a row of its own; the count of rows - 1 is the requeue count
    out = subprocess.run(["sacct", "-n", "-P", "-X", "-D", "-j", ",".join(job_ids), "-o",
                          "JobID,State,Elapsed,Start,End"], capture_output=True, text=True).stdout
    info: dict[str, dict] = {}
    for line in out.splitlines():
        parts = line.split("|")
        if len(parts) >= 3:
            prev = info.get(parts[0])
            start, end = (parts[3:5] + ["", ""])[:2]
            seconds = _seconds(parts[2]) + (prev["seconds"] if prev else 0)  # every incarnation's run time
            info[parts[0]] = {"state": parts[1], "elapsed": _clock(seconds), "seconds": seconds,
                              "restarts": str(int(prev["restarts"]) + 1) if prev else "0",
                              "start": prev["start"] if prev and _when(prev["start"]) else start, "end": end}
    return info


def _seconds(elapsed: str) -> int:
    """sacct's Elapsed ([D-]HH:MM:SS, or MM:SS) in seconds; 0 where it is not one."""
    days, _, clock = elapsed.strip().rpartition("-")
    try:
        parts = [int(x) for x in clock.split(":")]
        return int(days or 0) * 86400 + sum(v * 60 ** i for i, v in enumerate(reversed(parts)))
    except ValueError:
        return 0


def _clock(seconds: int) -> str:
    """Seconds as sacct writes them: [D-]HH:MM:SS."""
    days, rest = divmod(max(0, int(seconds)), 86400)
    return (f"{days}-" if days else "") + f"{rest // 3600:02d}:{rest % 3600 // 60:02d}:{rest % 60:02d}"


def _when(stamp: str | None) -> datetime.datetime | None:
    """sacct's Start/End ("2026-12-06T11:43:11"; "Unknown" or "None" while pending or running)."""
    try:
        return datetime.datetime.fromisoformat(stamp or "")
    except ValueError:
        return None


def eval_totals(jobs: list, states: dict[str, dict], now: datetime.datetime | None = None) -> tuple[str, str]:
    """An evaluation's requeues over all its jobs and array tasks, and its elapsed time from the first start
    to the last end (or now, while any runs), in sacct's [D-]HH:MM:SS."""
    rows = [v for k, v in states.items() for j in map(str, jobs) if k == j or k.startswith(j + "_")]
    requeues = str(sum(int(v["restarts"]) for v in rows)) if rows else "-"
    started = [v for v in rows if _when(v.get("start"))]
    if not started:
        return requeues, "-"
    now = now or datetime.datetime.now()
    first = min(_when(v["start"]) for v in started)
    last = max(_when(v.get("end")) or now for v in started)
    return requeues, _clock(int((last - first).total_seconds()))


def eval_stage(jobs: list, states: dict[str, dict]) -> str:
    """An evaluation's state from its three jobs (array tasks appear in sacct as ARRAY_TASK or
    ARRAY_[range]): the first stage not completed, as "RUNNING(sampling)" or "FAILED(metrics)"."""
    for stage, job in zip(("sampling", "features", "metrics"), map(str, jobs)):
        rows = [v["state"].split()[0] for k, v in states.items() if k == job or k.startswith(job + "_")]
        if not rows:
            return f"UNKNOWN({stage})"
        for state in ("RUNNING", "REQUEUED", "PENDING", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY",
                      "NODE_FAIL"):
            if state in rows:
                return f"{state}({stage})"
        if any(r != "COMPLETED" for r in rows):
            return f"{next(r for r in rows if r != 'COMPLETED')}({stage})"
    return "COMPLETED"


def last_images(run_dir: Path) -> str:
    latest = run_dir / "checkpoints" / "LATEST"
    tag = latest.read_text().strip() if latest.is_file() else ""
    # :g keeps small runs readable (0.064 kimg, not 0.1) and large ones short (12345.7 kimg)
    return f"{int(tag[3:]) / 1000:g} kimg" if tag[:3] == "img" and tag[3:].isdigit() else "-"


def cmd_jobs(args) -> int:
    if args.action == "list":
        run_dirs = [Path(args.target or ".")]
        if not run_dirs[0].is_dir():
            raise FileNotFoundError(f"{run_dirs[0]}: no such run directory")
        rows = []
        for run_dir in run_dirs:
            recs = records.read(run_dir) if args.all else records.newest_passes(records.read(run_dir))
            states = sacct([str(j) for r in recs if r.get("cluster") == "slurm" for j in r.get("jobs", [r["job_id"]])])
            queued = queued_jobs() if states else set()
            for r in recs:
                st = dict(states.get(str(r["job_id"]), {}))
                if st and st["state"].split()[0] not in ("PENDING", "RUNNING", "REQUEUED"):
                    st["state"] = st["state"].split()[0] + ("(ending)" if str(r["job_id"]) in queued else "")
                if r.get("jobs"):  # an evaluation: its state at the stage it is at (sampling, features, metrics)
                    st["state"] = eval_stage(r["jobs"], states)
                    st["restarts"], st["elapsed"] = eval_totals(r["jobs"], states)
                if r.get("cluster") == "local":
                    st = {"state": _local_state(r), "elapsed": "-", "restarts": "-"}
                kind = r.get("kind", "?") + (f" ({r['passes']} passes)" if r.get("passes", 1) > 1 else "")
                rows.append((str(r["job_id"]), kind, st.get("state", "UNKNOWN"), st.get("restarts", "-"),
                             st.get("elapsed", "-"), last_images(run_dir), r.get("folder", "")))
        if not rows:
            print(f"no jobs recorded in {run_dirs[0]}/jobs.jsonl")
            return 0
        head = ("job", "kind", "state", "requeues", "elapsed", "run at", "logs")  # the run's newest checkpoint
        widths = [max(len(x[i]) for x in rows + [head]) for i in range(7)]
        for row in [head] + rows:
            print("  ".join(v.ljust(w) for v, w in zip(row, widths)))
        return 0
    if not args.target:
        raise ValueError(f"adm jobs {args.action} JOB: give the job id (adm jobs RUN_DIR lists them)")
    found = records.find(args.target, [Path(p) for p in (args.run_dirs or ["."])])
    if found is None:
        where = ", ".join(f"{d}/jobs.jsonl" for d in (args.run_dirs or ["."]))
        raise ValueError(f"job {args.target}: not in {where}" + ("" if args.run_dirs else
                                                                  " (pass --run-dir RUN, the run it trained)"))
    run_dir, rec = found
    if args.action == "logs":
        folder, job = Path(rec["folder"]), str(args.target)
        # an evaluation's folder holds one folder per job and array task (JOB/, ARRAY_TASK/)
        ids = {str(j) for j in rec.get("jobs", [])} if job == str(rec["job_id"]) else {job}  # (this attempt's)
        logs = sorted(folder.glob("*_log.*")) if not rec.get("jobs") else sorted(
            p for p in folder.glob("*/*_log.*") if p.parent.name in ids or p.parent.name.split("_")[0] in ids)
        if not logs:
            print(f"job {job}: no logs yet under {folder}")
        for log in logs:
            print(f"==> {log} <==")
            print(log.read_text()[-args.tail:])
        return 0
    if args.action == "cancel":
        job = str(rec["job_id"])
        if rec.get("cluster") != "slurm":
            state = _local_state(rec)
            if state != "RUNNING":
                print(f"job {job} is not running ({state}): nothing to cancel")
                return 0
            Path(rec["folder"]).mkdir(parents=True, exist_ok=True)  # `adm jobs` says CANCELLED, as Slurm would
            (Path(rec["folder"]) / CANCELLED).write_text(time.strftime("%Y-%m-%d %H:%M:%S") + "\n")
            os.kill(int(job), signal.SIGTERM)  # submitit's local controller: it stops its tasks
            print(f"cancelled {job}" + ("" if args.no_wait else "; waiting for it to end"), flush=True)
            deadline = time.time() + args.timeout
            while not args.no_wait and _local_state(rec) == "RUNNING":
                if time.time() > deadline:
                    raise TimeoutError(f"job {job} is still ending after {args.timeout:.0f} s (pid {job})")
                time.sleep(0.5)
            if not args.no_wait:
                print(f"job {job} ended ({_local_state(rec)}); checkpoint: {last_images(run_dir)}")
            return 0
        jobs = [str(j) for j in rec.get("jobs", [job])]  # an evaluation: its sampling, feature and metrics jobs
        if not set(jobs) & queued_jobs():
            state = (sacct([job]).get(job) or {}).get("state", "not in the queue")
            print(f"job {job} is not pending or running ({state}): nothing to cancel")
            return 0
        training = rec.get("kind", "train") == "train"
        subprocess.run(["scancel", *jobs], check=True)
        print(f"cancelled {' '.join(jobs)}" + ("" if args.no_wait else "; its ranks save a checkpoint on the way out, "
              "waiting for the job to end" if training else "; waiting for the jobs to end"), flush=True)
        deadline = time.time() + args.timeout
        while not args.no_wait and set(jobs) & queued_jobs():
            if time.time() > deadline:
                raise TimeoutError(f"job {job} is still ending after {args.timeout:.0f} s (squeue -j {job})")
            time.sleep(1)
        if not args.no_wait:
            print(f"job {job} ended" + (f"; checkpoint: {last_images(run_dir)}; the same submit command resumes it"
                                        if training else ""))
        return 0
    raise ValueError(f"unknown action {args.action}")


def process_start(pid: int) -> str | None:
    """A process's start time in clock ticks since boot (/proc/PID/stat field 22): with the pid, it names
    the process; a pid alone may have been reused since."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _local_state(rec) -> str:
    """A --cluster local job: RUNNING while its submitit controller lives (the same process, not a reuse of
    its pid); then CANCELLED if `adm jobs cancel` stopped it, FAILED if a task's result holds an error,
    COMPLETED if every task returned."""
    pid = int(rec["job_id"])
    start = process_start(pid)
    if start is not None:
        if rec.get("started") == start:
            return "RUNNING"
        if rec.get("started") is None:  # a record from before start times were kept: trust the command line
            if b"submitit" in Path(f"/proc/{pid}/cmdline").read_bytes():
                return "RUNNING"
    if (Path(rec["folder"]) / CANCELLED).is_file():
        return "CANCELLED"
    import pickle

    outcomes = []
    for result in Path(rec["folder"]).glob("*_result.pkl"):
        try:
            outcomes.append(pickle.loads(result.read_bytes())[0])
        except Exception:  # unreadable: counted as a failure
            outcomes.append("error")
    if not outcomes:
        return "ENDED"  # killed, or ended without a result
    return "FAILED" if "error" in outcomes else "COMPLETED"


def register_submit(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="what", required=True, metavar="WHAT")
    p = sub.add_parser("train", help="submit a training run (re-submitting resumes it)")
    p.add_argument("config", nargs="?", help="YAML config (or none, with preset=NAME among the overrides)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="dotted overrides of the config, e.g. total_kimg=64 run_dir=runs/adm-64")
    p.add_argument("--nodes", type=int, default=1, help="nodes of the job")
    p.add_argument("--gpus-per-node", type=int, default=1, help="one task per GPU")
    p.add_argument("--cpu", action="store_true", help="CPU tasks (gloo), e.g. on the local test cluster")
    p.add_argument("--partition",
                   help="Slurm partition (default: the site file's, else the cluster's default)")
    p.add_argument("--time", default="24:00:00", help="HH:MM:SS")
    p.add_argument("--account", help="Slurm account to charge")
    p.add_argument("--qos", help="Slurm quality of service")
    p.add_argument("--constraint", help="node features, Slurm's --constraint")
    p.add_argument("--mem", type=slurm_mem, help="memory per node, Slurm's form: 64G, 500M, 0 (all)")
    p.add_argument("--cpus-per-task", type=at_least(1), help="CPUs per task (default: the site file's, else the "
                   "config's data workers + 2)")
    p.add_argument("--exclusive", action="store_true", help="whole nodes, shared with no other job")
    p.add_argument("--signal-delay", type=at_least(0), default=120, help="seconds between the signal and the time limit")
    p.add_argument("--max-timeouts", type=at_least(0), default=1000, help="requeues after a timeout before giving up")
    p.add_argument("--dependency", help="Slurm's --dependency, e.g. afterok:12345")
    p.add_argument("--name", help="job name (default: adm-<run directory's name>)")
    p.add_argument("--cluster", choices=CLUSTERS, default="auto", help="auto: Slurm if found, else local")
    p.add_argument("--dry-run", action="store_true", help="print the sbatch script and config, submit nothing")
    p.add_argument("--wait", action="store_true", help="wait for the job to finish")
    p.set_defaults(func=cmd_submit_train)


def main_submit(argv=None, prog="adm submit") -> int:
    parser = argparse.ArgumentParser(prog=prog, description="submit jobs to Slurm (submitit) or run them locally")
    register_submit(parser)
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "train":  # key=value overrides may come after the options
        sub = parser._subparsers._group_actions[0].choices["train"]
        args = sub.parse_intermixed_args(argv[1:])
    else:
        args = parser.parse_args(argv)
    if args.config and "=" in args.config and not args.config.endswith((".yaml", ".yml")):
        args.overrides, args.config = [args.config, *args.overrides], None
    return args.func(args)


def main_jobs(argv=None, prog="adm jobs") -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog=prog, description="the jobs of a run: state, requeues, progress, logs")
    parser.add_argument("action", nargs="?", default="list", choices=["list", "logs", "cancel"],
                        help="list: the jobs and their state; logs: a job's output; cancel: a job (default: list)")
    parser.add_argument("target", nargs="?", help="list: RUN_DIR (default .); logs/cancel: JOB id")
    parser.add_argument("--run-dir", dest="run_dirs", action="append", help="where to look for the job's record")
    parser.add_argument("--all", action="store_true", help="list: every scheduler pass (default: each "
                        "`adm eval schedule` chain as its newest pass, with how many it has run)")
    parser.add_argument("--tail", type=int, default=4000, help="characters of each log to show")
    parser.add_argument("--no-wait", action="store_true", help="cancel: return at once, without waiting for the "
                        "job to end (its ranks save a checkpoint on the way out)")
    parser.add_argument("--timeout", type=float, default=600, help="cancel: longest wait for the job to end (s)")
    if argv and argv[0] not in ("list", "logs", "cancel", "-h", "--help"):
        argv = ["list", *argv]
    args = parser.parse_args(argv)
    return cmd_jobs(args)
