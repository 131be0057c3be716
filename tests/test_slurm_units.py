"""The Slurm front end's bookkeeping without a cluster: which jobs block a run directory, an evaluation's
stage from its three jobs, sbatch's errors on one line, job lookup by any stage. (tests/test_slurm.py runs
the same code against the real local Slurm.)"""

import os
import re
import subprocess
from pathlib import Path

import pytest

from slurm import records, submit


@pytest.fixture
def srun_on_path(tmp_path, monkeypatch):
    """submitit renders an sbatch script only where `srun` is on PATH (its own check of being on a cluster);
    these tests read the script, never run it, so an `srun` that does nothing will do."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 0\n")
    (bin_dir / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")


def test_only_trainings_keep_a_training_from_resuming(tmp_path, monkeypatch):
    run = tmp_path / "run"
    for job, kind in (("11", "eval"), ("12", "eval-schedule"), ("13", "train")):
        records.add(run, {"job_id": job, "cluster": "slurm", "kind": kind})
    records.add(run, {"job_id": "14", "cluster": "slurm"})  # a record from before kinds were written: a training
    monkeypatch.setattr(submit, "queued_jobs", lambda: {"11", "12"})
    assert submit.running_job_for(run) is None  # a pending scheduler pass does not block the resume
    assert submit.running_job_for(run, kinds=("eval-schedule",)) == "12"
    assert submit.running_job_for(run, kinds=("eval-schedule",), exclude="12") is None  # the pass itself
    monkeypatch.setattr(submit, "queued_jobs", lambda: {"14"})
    assert submit.running_job_for(run) == "14"


def test_an_evaluation_shows_the_stage_it_is_at(tmp_path):
    jobs = [5, 6, 7]
    done = {"state": "COMPLETED"}
    states = {"5_0": {"state": "RUNNING"}, "5_[1-3]": {"state": "PENDING"}, "6_[0-3]": {"state": "PENDING"},
              "7": {"state": "PENDING"}}
    assert submit.eval_stage(jobs, states) == "RUNNING(sampling)"
    states = {"5_0": done, "5_1": done, "6_0": done, "6_1": {"state": "FAILED"}, "7": {"state": "CANCELLED by 0"}}
    assert submit.eval_stage(jobs, states) == "FAILED(features)"
    states = {"5_0": done, "6_0": done, "7": done}
    assert submit.eval_stage(jobs, states) == "COMPLETED"
    assert submit.eval_stage(jobs, {}) == "UNKNOWN(sampling)"  # accounting has not caught up yet
    # its requeues over every job and task, its elapsed time from the first start to the last end (or now)
    states = {"5_0": {"restarts": "1", "start": "2026-12-06T10:00:00", "end": "2026-12-06T10:02:00"},
              "5_1": {"restarts": "0", "start": "2026-12-06T10:00:05", "end": "2026-12-06T10:03:00"},
              "6_0": {"restarts": "2", "start": "2026-12-06T10:03:01", "end": "Unknown"},
              "6_[1-2]": {"restarts": "0", "start": "Unknown", "end": "Unknown"},
              "7": {"restarts": "0", "start": "None", "end": "Unknown"}, "77": {"restarts": "5", "start": "2020-01-01T00:00:00"}}
    now = __import__("datetime").datetime(2026, 12, 7, 11, 0, 30)
    assert submit.eval_totals(jobs, states, now) == ("3", "1-01:00:30")
    del states["6_0"]
    assert submit.eval_totals(jobs, states, now) == ("1", "00:03:00")
    assert submit.eval_totals(jobs, {}, now) == ("-", "-")
    run = tmp_path / "run"
    records.add(run, {"job_id": "7", "cluster": "slurm", "kind": "eval", "jobs": jobs, "folder": "f"})
    for job in ("7", "5", "6", "5_1"):  # any stage, or an array task, finds the evaluation's record
        assert records.find(job, [run])[1]["job_id"] == "7"
    assert records.find("8", [run]) is None


def test_sbatch_errors_come_on_one_line():
    text = ("Command '['sbatch', '/x/submission_file.sh']' returned non-zero exit status 1.\n"
            "sbatch: error: resolve_ctls_from_dns_srv: res_nsearch error: Unknown host\n"
            "sbatch: error: fetch_config: DNS SRV lookup failed\n"
            "sbatch: error: _establish_config_source: failed to fetch config\n"
            "sbatch: fatal: Could not establish a configuration source\n")
    assert submit.sbatch_error(text) == ("resolve_ctls_from_dns_srv: res_nsearch error: Unknown host; fetch_config: "
                                         "DNS SRV lookup failed; _establish_config_source: failed to fetch config; "
                                         "Could not establish a configuration source")
    assert submit.sbatch_error("weird\n") == "weird" and submit.sbatch_error("") == "sbatch failed"


def test_more_nodes_than_the_partition_has_is_refused(monkeypatch):
    rows = "debug* 1\ndebug* 2\nurgent 1\n"  # sinfo -o '%P %D': a row per node state
    monkeypatch.setattr(submit.shutil, "which", lambda name: "/usr/bin/" + name)
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a, 0, rows, ""))
    submit.check_nodes(3, None)
    with pytest.raises(ValueError, match="--nodes 4: partition 'debug' has 3 node"):
        submit.check_nodes(4, None)
    with pytest.raises(ValueError, match="--nodes 2: partition 'urgent' has 1 node"):
        submit.check_nodes(2, "urgent")


def test_cpu_tasks_get_their_share_of_the_partitions_nodes_not_the_login_nodes(monkeypatch):
    rows = "debug* 16\ndebug* 8\nbig 64\n"  # sinfo -o '%P %c': a row per node kind
    monkeypatch.setattr(submit.shutil, "which", lambda name: "/usr/bin/" + name)
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a, 0, rows, ""))
    assert (submit.node_cpus(None), submit.node_cpus("big"), submit.node_cpus("nosuch")) == (8, 64, None)


def test_evaluation_jobs_take_every_site_key_and_flags_win(tmp_path, monkeypatch, srun_on_path):
    """The site file's qos, constraint and mem reach the evaluation jobs' sbatch scripts as they reach
    training's (submitit renders them); a flag overrides the site file."""
    from slurm.eval_jobs import SlurmBackend

    site = tmp_path / "site.yaml"
    site.write_text("partition: p1\naccount: a1\nqos: high\nconstraint: h100\nmem: 64G\ncpus_per_task: 6\n"
                    "setup: ['module load cuda']\n")
    monkeypatch.setenv("ADM_SITE", str(site))
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a, 0, "", ""))  # no sinfo
    script = SlurmBackend(gpus_per_task=0)._executor(tmp_path / "%j", "eval-x")._executor \
        ._make_submission_file_text("<command>", "<uid>")
    for line in ("--partition=p1", "--account=a1", "--qos=high", "--constraint=h100", "--mem=64G",
                 "--cpus-per-task=6", "module load cuda"):
        assert line in script, line
    script = SlurmBackend(gpus_per_task=0, qos="low", mem="8G")._executor(tmp_path / "%j", "eval-x")._executor \
        ._make_submission_file_text("<command>", "<uid>")
    assert "--qos=low" in script and "--mem=8G" in script and "--qos=high" not in script


def test_a_cancel_that_outlasts_its_timeout_is_one_clear_line(tmp_path, capsys):
    """`adm jobs cancel JOB --timeout S` on a job that does not end within S: an error line naming the job and
    the wait, exit status 2, not a traceback."""
    import sys

    from adm.cli import run_guarded

    stubborn = subprocess.Popen([sys.executable, "-c", "import signal, time\nsignal.signal(signal.SIGTERM, "
                                 "signal.SIG_IGN)\nprint('ready', flush=True)\ntime.sleep(60)"], stdout=subprocess.PIPE)
    try:
        assert stubborn.stdout.readline() == b"ready\n"
        run = tmp_path / "run"
        records.add(run, {"job_id": str(stubborn.pid), "cluster": "local", "kind": "train",
                          "started": submit.process_start(stubborn.pid), "folder": str(run / "slurm")})
        code = run_guarded(submit.main_jobs, ["cancel", str(stubborn.pid), "--run-dir", str(run), "--timeout", "1"])
        assert code == 2
        assert f"error: job {stubborn.pid} is still ending after 1 s" in capsys.readouterr().err
    finally:
        stubborn.kill()
        stubborn.wait()


def test_a_cancelled_local_job_says_cancelled(tmp_path, capsys):
    """`adm jobs cancel` on a --cluster local job: it ends, and `adm jobs` lists it as CANCELLED (as Slurm's
    accounting would), not as a job that ended on its own."""
    import sys
    import threading

    waiting = subprocess.Popen([sys.executable, "-c", "import time\nprint('ready', flush=True)\ntime.sleep(60)"],
                               stdout=subprocess.PIPE)
    try:
        assert waiting.stdout.readline() == b"ready\n"
        run = tmp_path / "run"
        records.add(run, {"job_id": str(waiting.pid), "cluster": "local", "kind": "train", "folder": str(
            run / "slurm" / str(waiting.pid)), "started": submit.process_start(waiting.pid)})
        threading.Timer(0.5, waiting.wait).start()  # reap it once signalled, as submitit's parent would
        assert submit.main_jobs(["cancel", str(waiting.pid), "--run-dir", str(run), "--timeout", "20"]) == 0
        assert f"job {waiting.pid} ended (CANCELLED)" in capsys.readouterr().out
        assert submit.main_jobs([str(run)]) == 0
        row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith(str(waiting.pid)))
        assert row.split()[2] == "CANCELLED", row
    finally:
        waiting.kill()
        waiting.wait()


def test_each_scheduler_chain_is_listed_as_its_newest_pass(tmp_path, monkeypatch, capsys):
    """A schedule passes every few hours for months: `adm jobs` shows each chain once (its newest pass, with
    that pass's state and the number of passes), not hundreds of rows above the training; --all shows all."""
    run = tmp_path / "run"
    for job, kind, chain in (("1", "train", None), ("2", "eval-schedule", "2"), ("3", "eval-schedule", "2"),
                             ("4", "eval", None), ("5", "eval-schedule", "2"), ("6", "eval-schedule", None)):
        records.add(run, {"job_id": job, "cluster": "slurm", "kind": kind, **({"chain": chain} if chain else {})})
    asked = []

    def sacct(ids):
        asked.append(sorted(ids))
        return {"1": {"state": "RUNNING", "restarts": "0", "elapsed": "1:00"},
                "2": {"state": "COMPLETED", "restarts": "0", "elapsed": "0:10"},
                "5": {"state": "PENDING", "restarts": "0", "elapsed": "0:00"}}

    monkeypatch.setattr(submit, "sacct", sacct)
    monkeypatch.setattr(submit, "queued_jobs", lambda: {"1", "5"})
    assert submit.main_jobs([str(run)]) == 0
    rows = [line.split()[:4] for line in capsys.readouterr().out.splitlines()[1:]]
    assert rows == [["1", "train", "RUNNING", "0"], ["5", "eval-schedule", "(3", "passes)"],
                    ["4", "eval", "UNKNOWN", "-"], ["6", "eval-schedule", "UNKNOWN", "-"]], rows
    out = submit.main_jobs([str(run)]) == 0 and capsys.readouterr().out
    assert re.search(r"^5 +eval-schedule \(3 passes\) +PENDING ", out, re.M), out
    assert asked[0] == ["1", "4", "5", "6"]  # the older passes are not asked of Slurm's accounting either
    assert submit.main_jobs(["list", str(run), "--all"]) == 0
    rows = [line.split()[:2] for line in capsys.readouterr().out.splitlines()[1:]]
    assert rows == [[j, k] for j, k in (("1", "train"), ("2", "eval-schedule"), ("3", "eval-schedule"),
                                        ("4", "eval"), ("5", "eval-schedule"), ("6", "eval-schedule"))]


def _submit_args(**kw):
    import argparse

    base = dict(cluster="local", max_timeouts=3, name="t", minutes=60, nodes=1, gpus_per_node=2, gpus=True,
                partition=None, account=None, qos=None, constraint=None, signal_delay=120, mem=None,
                exclusive=False, dependency=None, cpus_per_task=None, cpu=False)
    return argparse.Namespace(**{**base, **kw})


def test_a_local_cluster_job_on_a_gpu_machine_sees_its_gpus(tmp_path):
    """--cluster local with GPUs: submitit's local executor is told the GPUs per node, else it sets
    CUDA_VISIBLE_DEVICES to "" for every task and training silently runs on the CPU."""
    executor, cluster = submit.make_executor(_submit_args(), tmp_path / "%j", {})
    assert cluster == "local"
    assert executor._executor.parameters.get("gpus_per_node") == 2
    executor, _ = submit.make_executor(_submit_args(gpus=False, cpu=True), tmp_path / "%j", {})
    assert not executor._executor.parameters.get("gpus_per_node")  # CPU tasks: no GPUs to show


def test_a_torn_line_in_the_job_records_costs_that_record_only(tmp_path, capsys):
    """A line torn by a concurrent writer (appends are not atomic between NFS clients) must not break
    `adm jobs`, `adm submit` or the scheduler, which all read the records: skipped, with a warning."""
    run = tmp_path / "run"
    records.add(run, {"job_id": "1", "cluster": "slurm", "kind": "train"})
    with open(run / records.RECORDS, "a") as f:
        f.write('{"job_id": "2", "clus\n')
    records.add(run, {"job_id": "3", "cluster": "slurm", "kind": "eval"})
    assert [r["job_id"] for r in records.read(run)] == ["1", "3"]
    assert "skipped 1 unreadable line" in capsys.readouterr().err
    assert records.find("3", [run])[1]["kind"] == "eval"


def test_a_job_record_goes_in_on_a_filesystem_without_locks(tmp_path, monkeypatch, capsys):
    """A run directory on Lustre mounted without locks: lockf fails after the job was submitted; its record
    is appended all the same (with a warning), so `adm jobs` and the double-submit guard still see it."""
    import errno
    import fcntl

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    run = tmp_path / "run"
    monkeypatch.setattr(fcntl, "lockf", no_locks)
    records.add(run, {"job_id": "5", "cluster": "slurm", "kind": "train"})
    records.add(run, {"job_id": "6", "cluster": "slurm", "kind": "eval"})
    assert [r["job_id"] for r in records.read(run)] == ["5", "6"]
    assert capsys.readouterr().err.count("no lock on this filesystem (No locks available); appended without one") == 2


def test_jobs_submitted_from_inside_a_job_do_not_inherit_its_slurm_environment(monkeypatch):
    """The scheduler's next pass and its evaluation jobs are submitted from inside a Slurm job: the job's
    SLURM_* (CPU binding, CPUs per task) and MASTER_*/RANK must not reach the new jobs; SLURM_CONF (which
    cluster) must."""
    import os

    inherited = dict(SLURM_JOB_ID="77", SLURM_CPU_BIND="quiet,mask_cpu:0x3", SLURM_CPUS_PER_TASK="2",
                     MASTER_PORT="23456", RANK="0", SUBMITIT_EXECUTOR="slurm", SLURM_CONF="/etc/site/slurm.conf")
    for k, v in inherited.items():
        monkeypatch.setenv(k, v)
    seen = submit.submit_or_explain(lambda: dict(os.environ))  # what sbatch would be run with
    assert seen["SLURM_CONF"] == "/etc/site/slurm.conf"
    assert not {"SLURM_JOB_ID", "SLURM_CPU_BIND", "SLURM_CPUS_PER_TASK", "MASTER_PORT", "RANK",
                "SUBMITIT_EXECUTOR"} & set(seen)
    assert all(os.environ[k] == v for k, v in inherited.items())  # this process keeps its own


def test_a_gpu_training_job_gets_cpus_for_its_data_workers(tmp_path, srun_on_path):
    """Without --cpus-per-task or a site value, Slurm often gives a task one CPU, which its DataLoader workers
    would share with it: a GPU task asks for data_workers + 2; a flag or the site file wins."""
    def script(site, **kw):
        executor, _ = submit.make_executor(_submit_args(cluster="slurm", default_cpus_per_task=4, **kw),
                                           tmp_path / "%j", site)
        return executor._executor._make_submission_file_text("<command>", "<uid>")

    assert "--cpus-per-task=4" in script({})
    assert "--cpus-per-task=6" in script({"cpus_per_task": 6})
    assert "--cpus-per-task=3" in script({"cpus_per_task": 6}, cpus_per_task=3)


def test_a_training_job_runs_where_it_was_submitted(tmp_path, monkeypatch):
    """Relative paths (the config, run_dir, data) mean what they meant where `adm submit` ran, also after a
    requeue; a submission directory the node cannot reach is a clear error, not a run written to /tmp."""
    import os
    import pickle

    import trainer.config
    import trainer.loop
    from slurm.jobs import TrainJob

    seen = []
    monkeypatch.setattr(trainer.config, "load_train_config", lambda config, overrides: (config, overrides))
    monkeypatch.setattr(trainer.loop, "training_loop", lambda cfg: seen.append((os.getcwd(), cfg)) or 0)
    (tmp_path / "here").mkdir()
    monkeypatch.chdir(tmp_path / "here")
    job = pickle.loads(pickle.dumps(TrainJob("configs/x.yaml", ["run_dir=runs/a"])))
    requeued = job.checkpoint().function  # what submitit pickles for the requeue
    monkeypatch.chdir(tmp_path)  # Slurm starts the job elsewhere
    assert job() == 0 and requeued() == 0
    assert seen == [(str(tmp_path / "here"), ("configs/x.yaml", ["run_dir=runs/a"]))] * 2
    with pytest.raises(SystemExit, match="submitted from, /no/such/dir, is not reachable on .*shared filesystem"):
        TrainJob("x.yaml", [], cwd="/no/such/dir")()


def test_a_sigterm_while_a_training_task_starts_stops_it_and_leaves_the_requeue_to_slurm(monkeypatch):
    """A SIGTERM (scancel, `scontrol requeue`, a preemption without the user signal) that reaches a submitit
    task while it imports and starts, before the training loop's handler: submitit's own handler only logged
    it, so the rank trained on, and rank 0 could requeue a job Slurm was ending. It is recorded: the loop stops
    on it (status 75), and rank 0 does not call submitit's requeue."""
    import signal

    import trainer.config
    import trainer.loop
    from slurm.jobs import TrainJob
    from trainer import preemption

    before = {s: signal.getsignal(s) for s in (signal.SIGUSR2, signal.SIGTERM)}
    requeued = []

    def started(config, overrides):  # the seconds of imports and checks before the loop's handler
        os.kill(os.getpid(), signal.SIGTERM)  # delivered to the main thread before os.kill returns
        return config

    def loop(cfg):  # the training loop's handling: its flag, and the agreement at the first step boundary
        flag = preemption.PreemptionFlag()
        if not flag.requested:
            return 0  # (trained to the end)
        flag.agree()
        return preemption.EXIT_REQUEUE

    monkeypatch.setattr(trainer.config, "load_train_config", started)
    monkeypatch.setattr(trainer.loop, "training_loop", loop)
    monkeypatch.setenv("SLURM_PROCID", "0")
    try:
        preemption.RECEIVED.clear()
        signal.signal(signal.SIGTERM, lambda signum, frame: None)  # submitit's: "Bypassing signal SIGTERM"
        signal.signal(signal.SIGUSR2, lambda signum, frame: requeued.append(signum))  # its checkpoint + requeue
        with pytest.raises(SystemExit) as stopped:
            TrainJob("x.yaml", [])()
        assert stopped.value.code == preemption.EXIT_REQUEUE and not requeued
    finally:
        preemption.RECEIVED.clear()
        preemption.AGREED.clear()
        for s, h in before.items():
            signal.signal(s, h)


def test_whether_the_cluster_has_gpus_is_asked_of_sinfo_and_a_failing_sinfo_is_said(tmp_path, monkeypatch):
    """`adm submit train --cluster slurm` checks that the cluster has the GPUs it asks for; a sinfo that fails
    (slurmctld down) is said as such, not taken for a cluster without GPUs."""
    import argparse

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    args = argparse.Namespace(cpu=False, cluster="slurm")
    for script, answer in [("echo 'gpu:h100:8'", True),
                           ("echo '(null)'", "this cluster has no GPUs (sinfo shows no gres/gpu): pass --cpu"),
                           ("echo 'slurm_load_partitions: Unable to contact slurm controller' >&2; exit 1",
                            "sinfo failed (slurm_load_partitions: Unable to contact slurm controller), so whether "
                            "the cluster has GPUs is unknown"),
                           ("printf 'sinfo: error: a\\nsinfo: error: b\\n' >&2; exit 1",  # several lines: one
                            "sinfo failed (sinfo: error: a sinfo: error: b), so whether")]:
        (bin_dir / "sinfo").write_text(f"#!/bin/sh\n{script}\n")
        (bin_dir / "sinfo").chmod(0o755)
        if answer is True:
            assert submit._gpus_requested(args) is True
        else:
            with pytest.raises(ValueError, match=re.escape(answer)):
                submit._gpus_requested(args)
    assert submit._gpus_requested(argparse.Namespace(cpu=True, cluster="slurm")) is False


def test_more_shards_than_an_array_may_hold_are_shared_out_over_its_tasks(tmp_path, monkeypatch, capsys):
    """Slurm refuses an array past its MaxArraySize (1001 by default: 1.28M samples in shards of 1000 are
    1280): then array task i takes shards i, i + T, ... and every shard is sampled and featurized once."""
    import json

    from slurm import eval_jobs

    conf = "ClusterName             = c\nMaxArraySize            = 3\nMaxJobCount             = 10000\n"
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a, 0, conf, ""))
    eval_jobs.max_array_size.cache_clear()
    assert eval_jobs.max_array_size() == 3
    eval_jobs.max_array_size.cache_clear()
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a, 1, "", "no scontrol"))
    assert eval_jobs.max_array_size() == 1001  # Slurm's default where the config cannot be read
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a, 0, "", ""))  # no GPUs
    key_dir = tmp_path / "run" / "eval" / "k"
    key_dir.mkdir(parents=True)
    (key_dir / "setting.json").write_text(json.dumps({"run_dir": str(tmp_path / "run"), "setting": {
        "name": "x", "num": 7, "shard_size": 1}}))  # 7 shards
    ran, arrays = {"sample": [], "feature": []}, []

    class Job:
        job_id = "41"

    class Executor:
        def map_array(self, fn, *args):
            arrays.append(len(args[0]))
            for call in zip(*args):
                fn(*call)
            return [Job()] * len(args[0])

        def submit(self, fn, *args):
            return Job()

    monkeypatch.setattr(eval_jobs, "sample_task", lambda key, i: ran["sample"].append(i))
    monkeypatch.setattr(eval_jobs, "feature_task", lambda key, i: ran["feature"].append(i))
    monkeypatch.setattr(eval_jobs.SlurmBackend, "_executor", lambda self, *a, **k: Executor())
    for cap, tasks in ((3, 3), (1001, 7)):
        monkeypatch.setattr(eval_jobs, "max_array_size", lambda: cap)
        ran["sample"].clear(), ran["feature"].clear(), arrays.clear()
        eval_jobs.SlurmBackend(gpus_per_task=0).start(key_dir, 1)
        assert arrays == [tasks, tasks]
        assert sorted(ran["sample"]) == sorted(ran["feature"]) == list(range(7))
    assert "7 shards in arrays of 3 tasks (Slurm's MaxArraySize), up to 3 shards per task" in capsys.readouterr().out


def test_a_sampling_task_at_its_time_limit_is_requeued_as_the_same_call(tmp_path, monkeypatch):
    """The sampling array's tasks are submitit-Checkpointable: at the time limit's signal submitit pickles
    the delayed call that `checkpoint` returns and requeues it; that call, run again, goes on where the shard
    stopped (its kept batches: test_a_shard_stopped_midway_samples_again_only_the_batch_it_was_on)."""
    import json
    import pickle

    import submitit
    from slurm import eval_jobs

    key_dir = tmp_path / "run" / "eval" / "k"
    key_dir.mkdir(parents=True)
    (key_dir / "setting.json").write_text(json.dumps({"run_dir": str(tmp_path / "run"), "setting": {
        "name": "x", "num": 7, "shard_size": 1}}))  # 7 shards
    task = eval_jobs._sample_tasks
    assert isinstance(task, submitit.helpers.Checkpointable)
    again = pickle.loads(pickle.dumps(task.checkpoint(str(key_dir), 1, 3)))
    assert isinstance(again, submitit.helpers.DelayedSubmission)
    assert type(again.function) is eval_jobs.SampleTasks and again.args == (str(key_dir), 1, 3)
    monkeypatch.setattr(eval_jobs, "sample_task", lambda key, i: f"shard {i}")
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "1")
    import torch

    threads = torch.get_num_threads()
    try:
        assert again.result() == ["shard 1", "shard 4"]  # task 1 of 3's share of the 7 shards
    finally:
        torch.set_num_threads(threads)  # (the task takes the job's CPUs)


def test_a_schedule_pass_at_its_time_limit_is_requeued_so_the_chain_goes_on(tmp_path, monkeypatch):
    """The recurring schedule's pass submits the next pass as it ends: killed at its time limit before that,
    the chain would end. It is submitit-Checkpointable, requeued as the same call (same argv, same chain)."""
    import pickle

    import submitit
    from eval import cli
    from slurm import eval_jobs

    submitted = []

    class Job:
        job_id = "77"

    class Executor:
        def submit(self, fn, *args):
            submitted.append((fn, args))
            return Job()

    monkeypatch.setattr(eval_jobs.SlurmBackend, "_executor", lambda self, *a, **k: Executor())
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a, 0, "", ""))  # no GPUs
    run = tmp_path / "run"
    run.mkdir()
    argv = ["schedule", str(run), "--ref", "ref.npz", "--cluster", "slurm"]
    assert eval_jobs.SlurmBackend(gpus_per_task=0).submit_schedule(argv, 7200, run, "70") == "77"
    (fn, args), = submitted
    assert isinstance(fn, submitit.helpers.Checkpointable) and args == (argv, "70")
    again = pickle.loads(pickle.dumps(fn.checkpoint(*args)))
    seen = []
    monkeypatch.setattr(cli, "main", lambda a: seen.append((a, os.environ[cli.SCHEDULE_CHAIN])) or 0)
    monkeypatch.setenv(cli.SCHEDULED_PASS, "")
    monkeypatch.setenv(cli.SCHEDULE_CHAIN, "")
    assert again.result() == 0 and seen == [(argv, "70")]  # the same pass of the same chain


def test_a_pass_killed_while_submitting_leaves_its_queued_jobs_on_the_claim(tmp_path, monkeypatch):
    """The scheduler pass (itself a Slurm job, or a user's command) killed after queueing the sampling array and
    before the feature array: the claim names the queued job at once, so a later pass sees the attempt alive
    while that job runs (and waits) instead of retrying beside it; when all stages are queued, all three."""
    import json

    from eval import registry
    from eval.schedule import _advance
    from slurm import eval_jobs

    monkeypatch.setattr(subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a, 0, "", ""))  # no GPUs
    monkeypatch.setattr(eval_jobs, "max_array_size", lambda: 1001)
    key_dir = tmp_path / "run" / "eval" / "k"
    key_dir.mkdir(parents=True)
    (key_dir / "setting.json").write_text(json.dumps({"run_dir": str(tmp_path / "run"), "setting": {
        "name": "x", "num": 2, "shard_size": 1}}))
    ids = iter(["51", "52", "53"])

    class Job:
        def __init__(self):
            self.job_id = next(ids)

    class Executor:
        def map_array(self, fn, *args):
            if calls.append(fn) or len(calls) == 2:
                raise KeyboardInterrupt  # the pass killed before the feature array is queued
            return [Job()] * len(args[0])

        def submit(self, fn, *args):
            return Job()

    calls = []
    monkeypatch.setattr(eval_jobs.SlurmBackend, "_executor", lambda self, *a, **k: Executor())
    backend = eval_jobs.SlurmBackend(gpus_per_task=0)
    assert registry.try_claim(key_dir, 1)
    with pytest.raises(KeyboardInterrupt):
        backend.start(key_dir, 1)
    claim = registry.read_claim(key_dir, 1)
    assert claim["jobs"] == ["51"] and claim["state"] == "submitting"
    monkeypatch.setattr(eval_jobs, "jobs_alive", lambda owner: owner["jobs"] == ["51"])  # still sampling
    assert _advance(key_dir, backend, 3, print) == "running" and registry.attempts(key_dir) == [1]
    ids = iter(["52", "53", "54"])
    assert backend.start(key_dir, 2)["jobs"] == ["52", "53", "54"]  # (map_array's second call: no kill now)
    assert registry.read_claim(key_dir, 2)["jobs"] == ["52", "53", "54"]


def test_job_folders_are_found_from_any_directory(tmp_path, monkeypatch):
    """`adm jobs` run inside the run directory found no logs and took finished local jobs for ENDED: records
    held their folders relative to where the job was submitted. They are absolute now; older relative ones
    are found under the run directory they were read from (a training's slurm/JOB, an evaluation's
    eval/KEY/slurm)."""
    import json

    run = tmp_path / "runs" / "r"
    (run / "slurm" / "11").mkdir(parents=True)
    (run / "eval" / "k--x" / "slurm").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    records.add(Path("runs/r"), {"job_id": "11", "cluster": "local", "folder": "runs/r/slurm/11"})
    with open(run / records.RECORDS, "a") as f:  # as records were written before
        f.write(json.dumps({"job_id": "12", "folder": "runs/r/slurm/12"}) + "\n")
        f.write(json.dumps({"job_id": "13", "folder": "runs/r/eval/k--x/slurm", "jobs": ["13", "14", "15"]}) + "\n")
    monkeypatch.chdir(run)  # inside the run directory, as the guide allows
    folders = [rec["folder"] for rec in records.read(Path("."))]
    assert folders[0] == str(run / "slurm" / "11")
    assert Path(folders[1]) == Path("slurm/12") and Path(folders[2]) == Path("eval/k--x/slurm")
    assert Path(folders[2]).resolve() == (run / "eval" / "k--x" / "slurm").resolve()


def test_why_an_evaluation_on_slurm_failed_is_recorded(tmp_path, monkeypatch):
    """A Slurm evaluation that ended without a result recorded `last_error: null` ("FAILED after 3 attempts:
    None"): the stage and state from sacct and the failed task's own error line are recorded now."""
    from slurm import eval_jobs

    key_dir = tmp_path / "run" / "eval" / "k"
    logs = key_dir / "slurm" / "70_1"
    logs.mkdir(parents=True)
    (logs / "70_1_0_log.err").write_text(
        "submitit INFO (2026-12-06) - Starting with JobEnvironment\nTraceback (most recent call last):\n"
        "  File \"x.py\", line 1, in <module>\nmodels.snapshot.SnapshotError: /s/model.safetensors: sha256 differs "
        "from the manifest (corrupt)\nsubmitit ERROR (2026-12-06) - Submitted job triggered an exception\n")
    states = {"70_0": {"state": "COMPLETED"}, "70_1": {"state": "FAILED"}, "71": {"state": "CANCELLED by 0"},
              "72": {"state": "CANCELLED by 0"}}
    monkeypatch.setattr(eval_jobs, "sacct", lambda jobs: states)
    why = eval_jobs.ended_how({"jobs": ["70", "71", "72"]}, key_dir)
    assert why.startswith("Slurm: FAILED(sampling); 70_1: models.snapshot.SnapshotError: /s/model.safetensors: "
                          f"sha256 differs from the manifest (corrupt); logs: adm jobs logs 72 --run-dir {tmp_path / 'run'}, "
                          f"or {key_dir / 'slurm'}"), why
    assert eval_jobs.ended_how({"pid": 5}, key_dir) is None  # a local claim: its own error is recorded


def test_stopping_a_local_cluster_kills_its_own_stuck_steps_only(tmp_path):
    """`local_cluster.sh stop` kills a job step that would not die, but only its own cluster's (found by the
    SLURM_CONF its slurmd passed on): a second cluster on the machine (another state directory) keeps its jobs."""
    script = Path(__file__).resolve().parents[1] / "slurm" / "local_cluster.sh"
    tag = f"adm-test-{os.getpid()}"
    steps = {}
    for name in ("mine", "other"):
        (tmp_path / name).mkdir()
        env = {**os.environ, "SLURM_CONF": str(tmp_path / name / "slurm.conf")}
        steps[name] = subprocess.Popen(["bash", "-c", f'exec -a "slurmstepd: [{tag}-{name}]" sleep 300'], env=env)
    try:
        deadline = __import__("time").time() + 10
        while len(subprocess.run(["pgrep", "-f", f"^slurmstepd: \\[{tag}"], capture_output=True,
                                 text=True).stdout.split()) < 2:
            assert __import__("time").time() < deadline
        subprocess.run(["bash", str(script), "stop"], env={**os.environ, "ADM_SLURM_BASE": str(tmp_path / "mine")},
                       check=True, capture_output=True)
        assert steps["mine"].wait(timeout=10) == -9
        assert steps["other"].poll() is None
    finally:
        for p in steps.values():
            p.kill()
            p.wait()


def test_the_demo_follows_a_slurm_training_an_interrupted_demo_left(tmp_path, monkeypatch, capsys):
    """Ctrl-C while the demo follows its Slurm training leaves the job training: said, naming the job; the
    rerun follows that job instead of submitting (which `adm submit` refused: the run is in use). A rerun
    after it ended queues nothing and goes on ("already trained"), where it replayed the old job's log and
    sent the signal to a finished job (a traceback every time after). The signal goes only to a running job."""
    from adm import demo
    from slurm import records
    import slurm.submit

    run = tmp_path / "runs" / "diffusion"
    (run / "slurm" / "32").mkdir(parents=True)
    (run / "slurm" / "32" / "32_0_log.out").write_text("[resume] fresh start\n[train] kimg 0.064 loss 0.9\n")
    states, scancels, sleeps = ["RUNNING"], [], []
    monkeypatch.setattr(slurm.submit, "running_job_for", lambda run_dir: "32")
    monkeypatch.setattr(slurm.submit, "sacct", lambda jobs: {"32": {"state": states[0]}})
    monkeypatch.setattr(demo, "adm", lambda *a, **k: pytest.fail("submitted beside the running job"))
    monkeypatch.setattr(subprocess, "run", lambda cmd, **k: scancels.append(cmd) or subprocess.CompletedProcess(cmd, 0))

    def ctrl_c(seconds):
        sleeps.append(seconds)
        raise KeyboardInterrupt
    monkeypatch.setattr(demo.time, "sleep", ctrl_c)
    with pytest.raises(KeyboardInterrupt, match=f"Slurm job 32 goes on training; run the demo again to follow it, or "
                                                f"`adm jobs cancel 32 --run-dir {run}` to stop it"):
        demo.train_on_slurm([], run, preempt=True)
    assert "following Slurm job 32, left running by an interrupted demo" in capsys.readouterr().out
    assert scancels == [["scancel", "--signal=USR2", "32"]] and (run / "demo-state").read_text() == "preempted once\n"

    scancels.clear()
    (run / "demo-state").unlink()
    states[0] = "COMPLETED"  # the job ended while nobody followed it: its old [train] lines are not a cue
    demo.train_on_slurm([], run, preempt=True)
    assert scancels == [] and not (run / "demo-state").exists()

    monkeypatch.setattr(slurm.submit, "running_job_for", lambda run_dir: None)
    records.add(run, {"job_id": "32", "cluster": "slurm", "folder": str(run / "slurm" / "32")})
    monkeypatch.setattr(demo, "adm", lambda *a, **k: subprocess.CompletedProcess(a, 0, "already trained", ""))
    demo.train_on_slurm([], run, preempt=True)  # nothing queued: nothing followed, nothing claimed
    out = capsys.readouterr().out
    assert "already trained" in out and "submitted to Slurm as job" not in out and scancels == []


def test_evaluation_tasks_use_only_their_own_cpus(monkeypatch):
    """A sampling, feature or metrics task runs torch on SLURM_CPUS_PER_TASK threads (a training task does):
    without Slurm's CPU binding every task saw all the node's cores (load 9 on 2 cores in the demo)."""
    import torch

    from slurm import eval_jobs

    before = torch.get_num_threads()
    monkeypatch.setattr(eval_jobs, "strided", lambda task, key_dir, first, stride: [torch.get_num_threads()])
    monkeypatch.setattr(eval_jobs, "metrics_task", lambda key_dir, backend: seen.append(torch.get_num_threads()))
    seen = []
    try:
        for cpus in (1, 3):
            monkeypatch.setenv("SLURM_CPUS_PER_TASK", str(cpus))
            torch.set_num_threads(7)
            assert eval_jobs._sample_tasks("k", 0, 1) == [cpus]
            torch.set_num_threads(7)
            assert eval_jobs._feature_tasks("k", 0, 1) == [cpus]
            torch.set_num_threads(7)
            eval_jobs._metrics_entry("k")
        assert seen == [1, 3]
    finally:
        torch.set_num_threads(before)


def test_a_requeued_trainings_elapsed_time_adds_up_every_run(monkeypatch):
    """`adm jobs` showed a requeued training's last run only (3:06 of 0:48 + 3:06): sacct -D gives a row per
    incarnation, and their Elapsed times add up (days included); requeues count the rows after the first."""
    import shutil

    import slurm.submit

    rows = ("1|PREEMPTED|00:00:48|2026-12-06T10:00:00|2026-12-06T10:00:48\n"
            "1|COMPLETED|00:03:06|2026-12-06T10:01:30|2026-12-06T10:04:36\n"
            "2|RUNNING|1-23:59:30|2026-12-04T10:00:00|Unknown\n2|REQUEUED|00:00:45|2026-12-06T10:00:00|Unknown\n")
    monkeypatch.setattr(shutil, "which", lambda name: "/usr/bin/" + name)
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a, 0, rows, ""))
    info = slurm.submit.sacct(["1", "2"])
    assert (info["1"]["elapsed"], info["1"]["restarts"], info["1"]["state"]) == ("00:03:54", "1", "COMPLETED")
    assert (info["2"]["elapsed"], info["2"]["restarts"]) == ("2-00:00:15", "1")
    assert info["1"]["start"] == "2026-12-06T10:00:00"  # the first run's start
