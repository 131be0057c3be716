"""The evaluation plan on Slurm: a sampling job array over seed ranges, a feature job array that
starts after it (afterok), and a metrics job after that; plus the recurring scheduler job, which
begins later (`--begin now+N`) and resubmits itself. Everything goes through submitit."""

import functools
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

from submitit.core.utils import FailedJobError
from submitit.helpers import Checkpointable

from eval import registry
from eval.farm import base_evaluations, feature_task, load_spec, metrics_task, sample_task, strided
from eval.schedule import NotSubmitted

from . import records
from .jobs import own_cpus
from .submit import outside_any_job, parse_time, sacct, sbatch_error, site_defaults

ACTIVE = {"PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "SUSPENDED", "RESIZING", "STAGE_OUT"}


def _metrics_entry(key_dir: str) -> None:
    """The metrics job: with several tasks, the workers find each other through Slurm's environment."""
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        import submitit
        # overwrite: a MASTER_PORT exported by the site file's setup lines must not stop the metrics job
        submitit.helpers.TorchDistributedEnvironment().export(overwrite=True)
    own_cpus()
    metrics_task(key_dir, backend="auto")


def _schedule_entry(argv: list[str], chain: str | None = None) -> int:
    from eval.cli import SCHEDULE_CHAIN, SCHEDULED_PASS, main

    os.environ[SCHEDULED_PASS] = "1"  # a pass of the chain: a failing check is logged, the next pass submitted
    os.environ[SCHEDULE_CHAIN] = str(chain or os.environ.get("SLURM_JOB_ID", ""))  # the chain's first job
    return main(argv)


class SchedulePass(Checkpointable):
    """A pass of the recurring schedule, which submits the next one as it ends. Checkpointable: a pass that
    reaches its time limit (the first over a run of hundreds of snapshots submits many arrays) is requeued
    as the same call, rather than dying before it submits the next and ending the chain. It runs again from
    the start, quickly: what the first run submitted is claimed and skipped."""

    def __call__(self, argv: list[str], chain: str | None = None) -> int:
        return _schedule_entry(argv, chain)


@functools.lru_cache(maxsize=1)
def max_array_size() -> int:
    """Slurm's MaxArraySize (an array's indices run 0 .. MaxArraySize - 1; 1001 unless the site set it), from
    `scontrol show config`; 1001 where that cannot be read."""
    try:
        out = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return 1001
    found = re.search(r"^MaxArraySize\s*=\s*(\d+)", out, re.M)
    return max(1, int(found.group(1))) if found else 1001


class SampleTasks(Checkpointable):
    """A sampling array task. Checkpointable: at its time limit (submitit's signal, 90 s before it) or on a
    preemption, submitit requeues the same call (up to 3 times for time limits), which goes on from the
    batches its shard kept (eval.sample.Sampler.shard): a shard of ADM-256 at 250 steps can outlast --time."""

    def __call__(self, key_dir: str, first: int, stride: int) -> list[str]:
        own_cpus()
        return strided(sample_task, key_dir, first, stride)


_sample_tasks = SampleTasks()


def _feature_tasks(key_dir: str, first: int, stride: int) -> list[str]:
    own_cpus()
    return strided(feature_task, key_dir, first, stride)


def base_sampling_arrays(key_dir: Path) -> list[str]:
    """A cascade's wait: the sampling arrays, still queued or running, of the evaluations that sample its base
    images (eval.farm.base_evaluations). Its own sampling array starts after them (afterany: where one fails,
    the cascade samples those images itself) and then runs only the upsampler on their shards."""
    waits = []
    for other in base_evaluations(key_dir):
        tried = registry.attempts(other)
        owner = registry.read_claim(other, tried[-1]) if tried else {}
        if (other / registry.METRICS).is_file() or owner.get("cluster") != "slurm" or not owner.get("jobs"):
            continue
        array = str(owner["jobs"][0])
        queued = subprocess.run(["squeue", "-h", "-o", "%i", "-j", array], capture_output=True, text=True).stdout
        if queued.split():  # (an ended array is not waited for: Slurm forgets ended jobs, and sbatch would refuse)
            waits.append(array)
    return waits


def jobs_alive(owner: dict) -> bool:
    """Whether any of a claim's Slurm jobs (sampling array, feature array, metrics job) is pending or running;
    also used by `--cluster local` passes where a Slurm answers, so their claims are not waited on forever."""
    states = sacct([str(j) for j in owner["jobs"]])
    if not states:  # accounting not caught up yet: ask the queue
        queued = subprocess.run(["squeue", "-h", "-o", "%i", "-j", ",".join(map(str, owner["jobs"]))],
                                capture_output=True, text=True).stdout.split()
        return bool(queued) or time.time() - owner.get("time", 0) < 60
    return any(s["state"].split()[0] in ACTIVE for s in states.values())


def ended_how(owner: dict, key_dir: Path) -> str | None:
    """Why an evaluation's Slurm jobs ended without a result: the stage and state sacct gives ("FAILED(sampling)")
    and the error its first failed task logged (the last `...Error: ...` line of its stderr), with where the
    logs are; None for a claim without Slurm jobs."""
    from .submit import eval_stage

    if "jobs" not in owner:
        return None
    jobs = [str(j) for j in owner["jobs"]]
    states = sacct(jobs)
    stage = eval_stage(jobs, states) if states else "no accounting record"
    failed = sorted(k for k, v in states.items() if v["state"].split()[0] not in ("COMPLETED", *ACTIVE))
    error = None
    for job in failed:
        for log in sorted((Path(key_dir) / "slurm").glob(f"{job}/*_log.err")):
            lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines()
                     if re.match(r"^[\w.]*(Error|Exception|Interrupt)\b.*:", ln.strip())]
            if lines:
                error = f"{job}: {lines[-1]}"
                break
        if error:
            break
    return (f"Slurm: {stage}" + (f"; {error}" if error else "")
            + f"; logs: adm jobs logs {jobs[-1]} --run-dir {Path(key_dir).parent.parent}, or {Path(key_dir) / 'slurm'}")


class SlurmBackend:
    name = "slurm"

    def __init__(self, partition=None, account=None, minutes=240, gpus_per_task=None, cpus_per_task=None,
                 array_parallelism=64, metric_workers=1, qos=None, constraint=None, mem=None):
        site = site_defaults()  # every key of the site file applies, as for training jobs; flags win
        self.partition, self.account = partition or site.get("partition"), account or site.get("account")
        self.qos, self.constraint, self.mem = qos or site.get("qos"), constraint or site.get("constraint"), \
            mem or site.get("mem")
        self.setup = list(site.get("setup", []))
        self.minutes, self.cpus_per_task = minutes, cpus_per_task or site.get("cpus_per_task")
        self.array_parallelism, self.metric_workers = array_parallelism, metric_workers
        info = subprocess.run(["sinfo", "-h", "-o", "%G"], capture_output=True, text=True) if shutil.which(
            "sinfo") else None
        if info is not None and info.returncode != 0:  # not "no GPUs": the evaluation would run on CPUs unasked
            raise ValueError(f"sinfo failed ({(info.stderr or info.stdout).strip() or 'no message'}), so whether "
                             "the cluster has GPUs is unknown; is slurmctld up?")
        gres = info.stdout if info is not None else ""
        if gpus_per_task is None:
            gpus_per_task = 1 if "gpu" in gres else 0
        elif gpus_per_task > 0 and "gpu" not in gres:  # sbatch would refuse every job of the plan
            raise ValueError(f"--gpus-per-task {gpus_per_task}: this cluster has no GPUs (sinfo shows no gres/gpu); "
                             "use --gpus-per-task 0")
        self.gpus_per_task = gpus_per_task
        self.submitted: list = []

    @classmethod
    def from_args(cls, a) -> "SlurmBackend":
        from .submit import check_account, check_partition

        site = site_defaults()
        check_partition(a.partition or site.get("partition"))
        check_account(a.account or site.get("account"), a.qos or site.get("qos"))
        return cls(a.partition, a.account, parse_time(a.time), a.gpus_per_task, a.cpus_per_task,
                   a.array_parallelism, a.metric_workers, a.qos, a.constraint, a.mem)

    def _executor(self, folder: Path, name: str, **extra):
        import submitit

        ex = submitit.AutoExecutor(folder=str(folder), cluster="slurm")
        params = dict(name=name, timeout_min=self.minutes, slurm_array_parallelism=self.array_parallelism,
                      slurm_partition=self.partition, slurm_account=self.account, slurm_qos=self.qos,
                      slurm_constraint=self.constraint, slurm_mem=self.mem,
                      slurm_setup=self.setup or None, cpus_per_task=self.cpus_per_task,
                      gpus_per_node=self.gpus_per_task or None)
        params.update(extra)
        ex.update_parameters(**{k: v for k, v in params.items() if v is not None})
        return ex

    def start(self, key_dir: Path, attempt: int) -> dict:
        spec, setting = load_spec(key_dir)
        folder = key_dir / "slurm" / "%j"
        n = setting.num_shards
        tasks = min(n, max_array_size())  # task i takes shards i, i + tasks, ...: one each, unless Slurm caps arrays
        if tasks < n:
            print(f"[eval] {key_dir.name}: {n} shards in arrays of {tasks} tasks (Slurm's MaxArraySize), "
                  f"up to {-(-n // tasks)} shards per task: --time is per task", flush=True)
        share = ([str(key_dir)] * tasks, list(range(tasks)), [tasks] * tasks)
        after = lambda job_id: {"dependency": f"afterok:{job_id}", "kill-on-invalid-dep": "yes"}  # noqa: E731
        queued: list[str] = []

        def submit(stage, call):  # a refusal at any stage withdraws the stages queued before it
            try:
                with outside_any_job():
                    jobs = call()
            except FailedJobError as e:  # nothing of this evaluation stays queued: not an attempt
                if queued:
                    subprocess.run(["scancel", *queued], capture_output=True)
                raise NotSubmitted(f"Slurm refused the {stage}: {sbatch_error(str(e))}") from None
            first = jobs[0] if isinstance(jobs, list) else jobs
            queued.append(str(first.job_id).split("_")[0])  # an array's id, without its task
            # on the claim at once: a pass killed before the last stage is queued leaves jobs a later pass
            # sees running (and waits for), not an attempt that looks dead while its jobs work beside a retry
            registry.update_claim(key_dir, attempt, {**registry.local_owner(), "cluster": "slurm",
                                                     "jobs": list(queued), "state": "submitting"})
            return queued[-1], first

        waits = base_sampling_arrays(key_dir) if setting.upsampler else []
        ex = self._executor(folder, f"eval-sample-{setting.name}", **(
            {"slurm_additional_parameters": {"dependency": "afterany:" + ":".join(waits)}} if waits else {}))
        sample_id, _ = submit("sampling array", lambda: ex.map_array(_sample_tasks, *share))
        if waits:
            print(f"[eval] {key_dir.name}: sampling after job(s) {', '.join(waits)}, which sample its base images",
                  flush=True)
        ex = self._executor(folder, f"eval-features-{setting.name}", slurm_additional_parameters=after(sample_id))
        feature_id, _ = submit("feature array", lambda: ex.map_array(_feature_tasks, *share))
        ex = self._executor(folder, f"eval-metrics-{setting.name}", gpus_per_node=None,
                            tasks_per_node=self.metric_workers, slurm_additional_parameters=after(feature_id))
        _, metrics_job = submit("metrics job", lambda: ex.submit(_metrics_entry, str(key_dir)))
        jobs = [sample_id, feature_id, metrics_job.job_id]
        self.submitted.append(metrics_job)
        records.add(Path(spec["run_dir"]), {"job_id": metrics_job.job_id, "cluster": "slurm", "kind": "eval",
                                            "key": key_dir.name, "jobs": jobs, "folder": str(key_dir / "slurm")})
        return {**registry.local_owner(), "cluster": "slurm", "jobs": jobs, "state": "submitted"}

    def alive(self, owner: dict) -> bool:
        return jobs_alive(owner) if "jobs" in owner else registry.local_alive(owner)

    def ended_how(self, owner: dict, key_dir: Path) -> str | None:
        return ended_how(owner, key_dir)

    def wait_all(self) -> None:
        for job in self.submitted:
            try:
                job.wait()
            except Exception:  # a failed job is reported by the registry, not here
                pass

    def schedule_passes(self, run_dir: Path) -> list[dict]:
        """The run's other scheduler passes Slurm still holds (not this job): each {"job", "chain"}, the chain
        named by its first job (a record from before chains were named is a chain of its own)."""
        from .submit import queued_jobs

        active, mine = queued_jobs(), os.environ.get("SLURM_JOB_ID")
        return [{"job": str(r["job_id"]), "chain": str(r.get("chain") or r["job_id"])}
                for r in records.read(Path(run_dir))
                if r.get("kind") == "eval-schedule" and str(r["job_id"]) in active and str(r["job_id"]) != mine]

    def submit_schedule(self, argv: list[str], every_s: float, run_dir: Path, chain: str | None = None) -> str:
        """The chain's next pass (chain: its first job; None starts a chain, named by the job submitted now)."""
        ex = self._executor(Path(run_dir) / "slurm" / "%j", f"eval-schedule-{Path(run_dir).name}",
                            gpus_per_node=None, timeout_min=60,
                            slurm_additional_parameters={"begin": f"now+{int(every_s)}"})
        with outside_any_job():  # this is usually a scheduler pass, itself a Slurm job
            job = ex.submit(SchedulePass(), list(argv), chain)
        records.add(Path(run_dir), {"job_id": job.job_id, "cluster": "slurm", "kind": "eval-schedule",
                                    "chain": str(chain or job.job_id),
                                    "folder": str(Path(run_dir) / "slurm" / str(job.job_id))})
        return job.job_id
