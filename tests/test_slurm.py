"""Training through submitit on a real single-node Slurm (started by slurm/local_cluster.sh)."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO

pytestmark = pytest.mark.slow
BASE = ["preset=tiny-32", "model.num_classes=11", "batch=16", "num_slots=4", "data_workers=1", "status_kimg=0.064",
        "grid=false"]


@pytest.fixture(scope="module")
def cluster(slurm_cluster):
    return slurm_cluster


@pytest.fixture(scope="module")
def shards(digit_shards):
    return digit_shards / "train"


def adm(*args, check=True, timeout=600):
    proc = subprocess.run([sys.executable, "-m", "adm", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env=os.environ)
    if check and proc.returncode != 0:
        raise AssertionError(f"adm {' '.join(args)}: {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return proc


def job_id(run: Path) -> str:
    return str(json.loads((run / "jobs.jsonl").read_text().splitlines()[-1])["job_id"])


def wait_state(run: Path, states: set[str], timeout=240) -> str:
    deadline = time.time() + timeout
    while time.time() < deadline:
        out = adm("jobs", str(run)).stdout.splitlines()[1].split()
        if out[2] in states:
            return out[2]
        time.sleep(1)
    raise AssertionError(f"job not in {states} after {timeout} s: {out}")


def submit(shards, run, *extra):
    return adm("submit", "train", f"data={shards}", f"run_dir={run}", *BASE, *extra, "--gpus-per-node", "2", "--cpu",
               "--time", "00:10:00")


def test_the_cluster_restarts_over_files_its_killed_daemons_left(cluster, tmp_path):
    """A machine restored from a snapshot (or a crash) leaves the daemons' pid files and mariadb's socket behind,
    and the pids may now belong to other programs. `start` must neither trust those files nor kill those programs."""
    run = Path(cluster["ADM_SLURM_BASE"]) / "run"
    names = ("slurmd", "slurmctld", "slurmdbd", "mariadb", "munged")
    pids = [int((run / f"{name}.pid").read_text()) for name in names]
    for pid in pids:
        os.kill(pid, 9)
    deadline = time.time() + 30
    while any(Path(f"/proc/{pid}").exists() and "zombie" not in Path(f"/proc/{pid}/status").read_text()
              for pid in pids) and time.time() < deadline:
        time.sleep(0.1)
    assert (run / "mysqld.sock").is_socket()  # the dead server's socket: it refuses connections
    stranger = subprocess.Popen(["sleep", "600"])
    try:
        for name in ("mariadb", "slurmctld"):
            (run / f"{name}.pid").write_text(f"{stranger.pid}\n")
        with open(tmp_path / "start.log", "w") as log:  # not a pipe: the daemons it starts would hold a pipe open
            proc = subprocess.run(["bash", "slurm/local_cluster.sh", "start"], cwd=REPO, env=cluster, stdout=log,
                                  stderr=subprocess.STDOUT, timeout=300)
        assert proc.returncode == 0, (tmp_path / "start.log").read_text()[-3000:]
        assert stranger.poll() is None
        assert int((run / "mariadb.pid").read_text()) != stranger.pid
        accounts = subprocess.run(["sacctmgr", "-n", "list", "cluster", "format=cluster"], capture_output=True,
                                  text=True, timeout=60)
        assert "adm" in accounts.stdout.split()
        step = subprocess.run(["srun", "-n", "1", "echo", "ran"], capture_output=True, text=True, timeout=120)
        assert step.stdout.strip() == "ran", step.stderr[-2000:]
    finally:
        stranger.kill()


def test_two_task_training_job_finishes_with_snapshots(cluster, shards, tmp_path):
    run = tmp_path / "run"
    proc = submit(shards, run, "total_kimg=0.128", "--wait")
    assert "submitted job" in proc.stdout
    assert (run / "snapshots" / "img000000000128" / "model.safetensors").is_file()
    assert wait_state(run, {"COMPLETED"}) == "COMPLETED"
    logs = adm("jobs", "logs", job_id(run), "--run-dir", str(run)).stdout
    assert "[train]" in logs


@pytest.fixture(scope="module")
def uninterrupted(cluster, shards, tmp_path_factory):
    """The final raw weights of the run the interrupted ones must reproduce bit for bit."""
    ref = tmp_path_factory.mktemp("uninterrupted")
    submit(shards, ref, "total_kimg=0.384", "--wait")
    return load_file(str(ref / "snapshots" / "img000000000384" / "raw.safetensors"))


def submit_and_wait_for_training(shards, run, *extra) -> str:
    submit(shards, run, "total_kimg=0.384", *extra)
    jid = job_id(run)
    log = run / "slurm" / jid / f"{jid}_0_log.out"
    deadline = time.time() + 120
    while time.time() < deadline and not (log.is_file() and "[train]" in log.read_text()):
        time.sleep(0.5)
    assert log.is_file() and "[train]" in log.read_text(), "the job never started training"
    return jid


def assert_requeued_and_identical(run, jid, uninterrupted, signal_name):
    assert wait_state(run, {"COMPLETED", "FAILED", "CANCELLED"}) == "COMPLETED"
    row = adm("jobs", str(run)).stdout.splitlines()[1].split()
    assert int(row[3]) >= 1  # requeued at least once
    errors = "".join(p.read_text() for p in (run / "slurm" / jid).glob("*_0_log.err"))
    assert f"preemption signal ({signal_name})" in errors
    final = load_file(str(run / "snapshots" / "img000000000384" / "raw.safetensors"))
    assert final.keys() == uninterrupted.keys()
    assert all(torch.equal(final[k], uninterrupted[k]) for k in final)


def test_preemption_signal_requeues_and_resumes_bit_identically(cluster, shards, uninterrupted, tmp_path):
    """submitit's path: our --signal (SIGUSR2) arrives, the ranks save, rank 0 lets submitit requeue."""
    run = tmp_path / "run"
    jid = submit_and_wait_for_training(shards, run)
    subprocess.run(["scancel", "--signal=USR2", jid], check=True)
    assert_requeued_and_identical(run, jid, uninterrupted, "SIGUSR2")


def test_scontrol_requeue_saves_on_sigterm_and_resumes_bit_identically(cluster, shards, uninterrupted, tmp_path):
    """Slurm's own requeue: SIGTERM, then SIGKILL after KillWait (5 s here). The ranks save in between and
    leave the requeue to Slurm (a second requeue from submitit would be wrong)."""
    run = tmp_path / "run"
    jid = submit_and_wait_for_training(shards, run)
    subprocess.run(["scontrol", "requeue", jid], check=True)
    assert_requeued_and_identical(run, jid, uninterrupted, "SIGTERM")


def test_a_higher_priority_partition_preempts_and_the_run_resumes_bit_identically(cluster, shards, uninterrupted,
                                                                                    tmp_path):
    """A real preemption: a job in `urgent` needs the whole node; Slurm sends the training job its --signal
    (preempt_send_user_signal), the ranks save, the job is requeued, and it finishes after the urgent one."""
    run = tmp_path / "run"
    jid = submit_and_wait_for_training(shards, run)
    urgent = subprocess.run(["sbatch", "--parsable", "--partition=urgent", "--exclusive", "--time=1",
                             f"--output={tmp_path / 'urgent.out'}", "--wrap", "sleep 3"],
                            capture_output=True, text=True, check=True).stdout.strip().split(";")[0]
    assert_requeued_and_identical(run, jid, uninterrupted, "SIGUSR2")
    state = subprocess.run(["sacct", "-n", "-X", "-P", "-j", urgent, "-o", "State"], capture_output=True,
                           text=True).stdout.split()
    assert state == ["COMPLETED"], state


def test_a_crashing_job_is_reported_failed(cluster, shards, tmp_path):
    run = tmp_path / "run"
    submit(shards, run, "total_kimg=0.128", "lr=1e30", "max_bad_steps=2", "precision=fp32")
    assert wait_state(run, {"COMPLETED", "FAILED"}) == "FAILED"
    assert "non-finite steps in a row" in adm("jobs", "logs", job_id(run), "--run-dir", str(run)).stdout


def test_a_killed_task_fails_the_job_at_once(cluster, shards, tmp_path):
    """One rank SIGKILLed mid-training (as the OOM killer would): the job is reported FAILED with its log
    folder, promptly, instead of the other rank waiting in a collective until a timeout."""
    run = tmp_path / "run"
    jid = submit_and_wait_for_training(shards, run, "total_kimg=4")
    tasks = []
    for pid in subprocess.run(["pgrep", "-f", f"submitit.core._submit {run}"], capture_output=True,
                              text=True).stdout.split():
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            parent = Path(f"/proc/{Path(f'/proc/{pid}/stat').read_text().split()[3]}/cmdline").read_bytes()
        except OSError:
            continue
        if b"SLURM_PROCID=1" in environ and b"slurmstepd" in parent:  # the task itself, not a loader worker
            tasks.append(int(pid))
    assert len(tasks) == 1, tasks
    os.kill(tasks[0], 9)
    start = time.time()
    assert wait_state(run, {"COMPLETED", "FAILED", "CANCELLED"}, timeout=120) == "FAILED"
    assert time.time() - start < 60
    assert str(run / "slurm" / jid) in adm("jobs", str(run)).stdout


def test_dry_run_and_bad_input(cluster, shards, tmp_path):
    run = tmp_path / "run"
    out = adm("submit", "train", f"data={shards}", f"run_dir={run}", *BASE, "--gpus-per-node", "2", "--cpu",
              "--time", "01:00:00", "--partition", "debug", "--signal-delay", "300", "--dry-run").stdout
    for line in ("#SBATCH --ntasks-per-node=2", "#SBATCH --signal=USR2@300", "#SBATCH --time=60",
                 "#SBATCH --partition=debug", "srun --unbuffered", "--kill-on-bad-exit=1"):
        assert line in out
    assert not (run / "jobs.jsonl").exists()
    for extra, expected in [(["--partition", "gpu-huge"], "--partition 'gpu-huge': Slurm knows debug, urgent"),
                            (["--account", "nosuch"], "--account 'nosuch': Slurm user"),  # sbatch would accept it
                            (["--qos", "nosuch"], "--qos 'nosuch': Slurm knows normal"),
                            (["--constraint", "nosuch"], "Slurm refused the job: Batch job submission failed"),
                            (["--nodes", "2", "--gpus-per-node", "1"], "--nodes 2: partition 'debug' has 1 node(s)"),
                            (["--time", "00:02:00"], "leaves no room"),
                            (["--nodes", "0"], "--nodes: need at least 1, got 0"),
                            (["batch=15"], "not divisible by the world size 2")]:
        proc = adm("submit", "train", f"data={shards}", f"run_dir={run}", *BASE, "--gpus-per-node", "2", "--cpu",
                   *extra, check=False)
        assert proc.returncode == 2 and expected in proc.stderr, proc.stderr[-1000:]
    proc = adm("submit", "train", f"data={shards}", f"run_dir={run}", *BASE, "--gpus-per-node", "2", check=False)
    assert proc.returncode == 2 and "no GPUs" in proc.stderr
    proc = adm("jobs", str(tmp_path / "nope"), check=False)
    assert proc.returncode == 2 and f"{tmp_path / 'nope'}: no such run directory" in proc.stderr
    proc = adm("jobs", "logs", check=False)
    assert proc.returncode == 2 and "adm jobs logs JOB: give the job id" in proc.stderr
    submit(shards, run, "total_kimg=2.0")
    proc = adm("submit", "train", f"data={shards}", f"run_dir={run}", *BASE, "--gpus-per-node", "2", "--cpu",
               check=False)
    assert proc.returncode == 2 and f"in use by job {job_id(run)}" in proc.stderr
    adm("jobs", "cancel", job_id(run), "--run-dir", str(run))
    assert wait_state(run, {"CANCELLED", "CANCELLED+"}) .startswith("CANCELLED")


def test_time_limit_signal_requeues_and_the_run_finishes(cluster, shards, tmp_path):
    """A 2-minute job whose training needs longer: signalled before the limit, it saves, requeues
    (as a timeout, in submitit's terms) and finishes in a later allocation."""
    run = tmp_path / "run"
    adm("submit", "train", f"data={shards}", f"run_dir={run}", *BASE, "total_kimg=8", "status_kimg=1",
        "checkpoint_kimg=4", "snapshot_kimg=8", "--gpus-per-node", "2", "--cpu", "--time", "00:02:00",
        "--signal-delay", "50")
    # Once the first allocation has timed out and the job is requeued, give it room to finish: otherwise the
    # number of 2-minute allocations would depend on this machine's speed (1.9 kimg in 7 of them on a slow one).
    deadline = time.time() + 300
    while int(adm("jobs", str(run)).stdout.splitlines()[1].split()[3]) < 1:
        assert time.time() < deadline, adm("jobs", str(run)).stdout
        time.sleep(1)
    subprocess.run(["scontrol", "update", f"JobId={job_id(run)}", "TimeLimit=30"], check=True, timeout=60)
    assert wait_state(run, {"COMPLETED", "FAILED"}, timeout=600) == "COMPLETED"
    row = adm("jobs", str(run)).stdout.splitlines()[1].split()
    assert int(row[3]) >= 1
    assert (run / "snapshots" / "img000000008000" / "model.safetensors").is_file()
    errors = "".join(p.read_text() for p in (run / "slurm").rglob("*_0_log.err"))
    assert "this job is timed-out" in errors


def test_evaluation_plan_runs_as_job_arrays_with_dependencies(cluster, digit_shards, tmp_path):
    from test_eval_farm import SETTING, make_run

    run = make_run(tmp_path / "run", kimgs=(1,))
    snap = next((run / "snapshots").iterdir())
    ref = tmp_path / "ref.npz"
    adm("eval", "ref", str(digit_shards / "val"), "--out", str(ref), "--resolution", "32", "--pr-num", "20")
    out = adm("eval", "run", str(snap), "--ref", str(ref), "--cluster", "slurm", *SETTING, "--cpus-per-task", "1",
              "--wait").stdout
    key_dir = next(p for p in (run / "eval").iterdir() if (p / "setting.json").is_file())
    metrics = json.loads((key_dir / "metrics.json").read_text())["metrics"]
    assert metrics["num_samples"] == 6 and f"{snap.name} fast: num_samples 6" in out
    jobs = json.loads((key_dir / "attempt-1.json").read_text())["jobs"]
    deadline = time.time() + 120
    while True:  # the metrics job's result arrives a moment before Slurm records its end
        rows = subprocess.run(["sacct", "-n", "-P", "-X", "-j", ",".join(map(str, jobs)), "-o",
                               "JobID,State,Start,End"], capture_output=True, text=True).stdout.split()
        table = {r.split("|")[0]: r.split("|")[1:] for r in rows}
        if all(v[0] not in ("RUNNING", "PENDING", "COMPLETING") for v in table.values()) or time.time() > deadline:
            break
        time.sleep(1)
    sample_tasks = [k for k in table if k.startswith(f"{jobs[0]}_")]
    feature_tasks = [k for k in table if k.startswith(f"{jobs[1]}_")]
    assert len(sample_tasks) == 2 and len(feature_tasks) == 2  # 6 samples in shards of 4: two array tasks each
    assert all(v[0] == "COMPLETED" for v in table.values()), table
    # the dependencies held: features started after every sample task ended, metrics after the features
    assert min(table[k][1] for k in feature_tasks) >= max(table[k][2] for k in sample_tasks)
    assert table[str(jobs[2])][1] >= max(table[k][2] for k in feature_tasks)
    # a second run finds the result in the registry and submits nothing
    again = adm("eval", "run", str(snap), "--ref", str(ref), "--cluster", "slurm", *SETTING).stdout
    assert "num_samples 6" in again and len(list(key_dir.glob("attempt-*.json"))) == 1
    # adm jobs: the evaluation's row and every stage's logs (the array tasks' too)
    row = next(r.split() for r in adm("jobs", str(run)).stdout.splitlines() if r.split()[0] == str(jobs[2]))
    assert row[1:3] == ["eval", "COMPLETED"], row
    from datetime import datetime  # its time: the first sampling task's start to the metrics job's end
    span = int((datetime.fromisoformat(max(v[2] for v in table.values()))
                - datetime.fromisoformat(min(v[1] for v in table.values()))).total_seconds())
    assert row[3:5] == ["0", f"{span // 3600:02d}:{span % 3600 // 60:02d}:{span % 60:02d}"], row
    logs = adm("jobs", "logs", str(jobs[0]), "--run-dir", str(run)).stdout
    assert logs.count("==> ") == 4 and f"/{jobs[0]}_1/" in logs  # two sampling tasks, .out and .err each
    proc = adm("eval", "run", str(snap), "--ref", str(ref), "--cluster", "slurm", *SETTING, "--name", "g",
               "--gpus-per-task", "1", check=False)  # refused before a claim: sbatch would refuse every job
    assert proc.returncode == 2 and "--gpus-per-task 1: this cluster has no GPUs" in proc.stderr, proc.stderr
    # one schedule per run: a second chain of self-resubmitting passes is refused; trainings are not blocked
    adm("eval", "schedule", str(run), "--ref", str(ref), "--cluster", "slurm", *SETTING, "--every", "1h")
    pending = job_id(run)
    proc = adm("eval", "schedule", str(run), "--ref", str(ref), "--cluster", "slurm", *SETTING, "--every", "1h",
               check=False)
    assert proc.returncode == 2 and f"is already scheduled: job {pending} is its next pass" in proc.stderr
    record = json.loads((run / "jobs.jsonl").read_text().splitlines()[-1])
    assert record["kind"] == "eval-schedule" and record["chain"] == pending  # a chain is named by its first job
    # the pass before it, run again (a requeue of a pass that had queued the next): it finds its chain's next
    # pass queued, and ends without a pass or a second successor
    env = {**os.environ, "ADM_SCHEDULED_PASS": "1", "ADM_SCHEDULE_CHAIN": pending, "SLURM_JOB_ID": str(int(pending) - 1)}
    again = subprocess.run([sys.executable, "-m", "adm", "eval", "schedule", str(run), "--ref", str(ref), "--cluster",
                            "slurm", *SETTING, "--every", "1h"], cwd=REPO, capture_output=True, text=True, env=env,
                           timeout=600)
    assert again.returncode == 0 and f"job {pending} is this schedule's next pass, queued already" in again.stdout, \
        again.stdout + again.stderr
    assert job_id(run) == pending
    rows = [r.split() for r in adm("jobs", str(run)).stdout.splitlines()[1:]]
    assert [r[1:3] for r in rows if r[1] == "eval-schedule"] == [["eval-schedule", "PENDING"]], rows  # one chain, one pass
    from slurm.submit import running_job_for

    assert running_job_for(run) is None
    assert f"cancelled {pending}" in adm("jobs", "cancel", pending, "--run-dir", str(run)).stdout
    assert "nothing to cancel" in adm("jobs", "cancel", pending, "--run-dir", str(run)).stdout


def test_srun_mpi_pmi2_gives_mpi_ranks_to_the_eval_workers_and_slurms_to_the_trainer(cluster, tmp_path):
    """Tasks of srun --mpi=pmi2 (a site's MpiDefault): the eval workers talk through MPI (the mpich wheel's PMI
    client), the trainer takes its ranks from Slurm without starting MPI. A batch script's own shell (sbatch
    -n 2, SLURM_PROCID=0 and SLURM_NTASKS=2 in its environment) is one process, not rank 0 of 2 waiting for
    a rank 1 that never comes."""
    code = ("import sys; from trainer.distributed import discover; from eval.comm import discover as workers; "
            "e = discover(); mpi = 'mpi4py.MPI' in sys.modules; c = workers(); "
            "print('ranks', e.source, e.rank, e.world_size, mpi, c.size, c.allgather(c.rank))")
    proc = subprocess.run(["srun", "--mpi=pmi2", "-n", "2", sys.executable, "-c", code], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = sorted(line for line in proc.stdout.splitlines() if line.startswith("ranks"))
    assert lines == ["ranks slurm 0 2 False 2 [0, 1]", "ranks slurm 1 2 False 2 [0, 1]"]
    out = tmp_path / "batch.txt"
    script = ("from trainer.distributed import discover, launch_world; e = discover(); "
              "print(e.source, e.rank, e.world_size, launch_world())")
    proc = subprocess.run(["sbatch", "--wait", "-n", "2", f"--output={out}", "--time=2",
                           f"--wrap={sys.executable} -c \"{script}\""], cwd=REPO, capture_output=True, text=True,
                          timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert out.read_text().splitlines()[-1] == "single 0 1 1", out.read_text()[-2000:]


def test_cluster_debug_runs_in_process(shards, tmp_path):
    """--cluster debug: the same job, in this process (no Slurm needed), for breakpoints."""
    run = tmp_path / "run"
    # without --cpu the machine's own GPU is asked for, or its CPU used (not a Slurm's gres, which is not involved)
    dry = adm("submit", "train", f"data={shards}", f"run_dir={run}", *BASE, "--cluster", "debug", "--dry-run").stdout
    assert "(cluster debug: no sbatch script; would run 1 local task(s))" in dry
    resolved = json.loads(dry[dry.index("{"):])["resolved"]  # the merged config, not only what was typed
    assert resolved["batch"] == 16 and resolved["model"]["model_channels"] == 32 and resolved["run_dir"] == str(run)
    adm("submit", "train", f"data={shards}", f"run_dir={run}", *BASE, "--cluster", "local", "--cpu", "--dry-run")
    assert not run.exists()  # a dry run leaves nothing (submitit's executor made RUN/slurm/)
    bad = adm("submit", "train", f"data={shards}", f"run_dir={run}", *BASE, "--cluster", "local", "--nodes", "2",
              "--cpu", "--dry-run", check=False)
    assert bad.returncode == 2 and "--nodes 2: --cluster local runs on this one machine" in bad.stderr
    out = adm("submit", "train", f"data={shards}", f"run_dir={run}", *BASE, "total_kimg=0.064", "--cluster", "debug",
              "--gpus-per-node", "1", "--cpu").stdout
    assert "finished" in out and (run / "snapshots" / "img000000000064" / "model.safetensors").is_file()
    bad = adm("submit", "train", f"data={shards}", f"run_dir={run}", *BASE, "--cluster", "debug",
              "--gpus-per-node", "2", "--cpu", check=False)
    assert bad.returncode == 2 and "one process" in bad.stderr



def test_cluster_local_runs_the_tasks_as_one_world(shards, tmp_path):
    """--cluster local (submitit's local executor, the default without Slurm): 2 tasks are the 2 ranks of one
    training, not two one-rank trainings racing on one run directory; its state and cancel know the job's
    own process (a pid alone may have been reused)."""
    run = tmp_path / "run"
    adm("submit", "train", f"data={shards}", f"run_dir={run}", *BASE, "total_kimg=0.064", "--cluster", "local",
        "--gpus-per-node", "2", "--cpu", "--wait")
    [tag] = [p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("img")]
    manifest = json.loads((run / "checkpoints" / tag / "manifest.json").read_text())
    assert manifest["world_size"] == 2 and {"rank00000.pt", "rank00001.pt"} <= set(manifest["files"])
    assert (run / "snapshots" / "img000000000064" / "model.safetensors").is_file()
    row = adm("jobs", str(run)).stdout.splitlines()[1].split()
    assert row[2] == "COMPLETED" and row[5:7] == ["0.064", "kimg"]  # the checkpoint's 64 images, not rounded to 0.1
    # a running one: its tasks got --signal-delay, and cancel returns once it has ended
    long = tmp_path / "long"
    adm("submit", "train", f"data={shards}", f"run_dir={long}", *BASE, "total_kimg=20", "--cluster", "local",
        "--gpus-per-node", "2", "--cpu", "--signal-delay", "45", timeout=120)  # returns though its job runs on
    jid = job_id(long)
    deadline = time.time() + 300
    while not any("[train]" in p.read_text() for p in (long / "slurm" / jid).glob("*_log.out")):
        assert time.time() < deadline, "the local job never started training"
        time.sleep(0.5)
    tasks = subprocess.run(["pgrep", "-P", jid], capture_output=True, text=True).stdout.split()
    assert len(tasks) == 2, adm("jobs", str(long)).stdout  # still running: the submission returned at once
    assert all("SUBMITIT_LOCAL_SIGNAL_DELAY_S=45" in Path(f"/proc/{t}/environ").read_bytes()
                                   .decode(errors="replace").split("\0") for t in tasks)
    out = adm("jobs", "cancel", jid, "--run-dir", str(long)).stdout
    assert f"job {jid} ended (CANCELLED)" in out
    assert adm("jobs", str(long)).stdout.splitlines()[1].split()[2] == "CANCELLED"
    assert "is not running (COMPLETED): nothing to cancel" in adm("jobs", "cancel", job_id(run), "--run-dir",
                                                                  str(run)).stdout
    # a record whose pid now belongs to another process: neither RUNNING nor cancelled
    other = subprocess.Popen(["sleep", "60"])
    try:
        record = json.loads((run / "jobs.jsonl").read_text().splitlines()[-1])
        with open(run / "jobs.jsonl", "a") as f:
            f.write(json.dumps({**record, "job_id": other.pid, "folder": str(tmp_path / "none")}) + "\n")
        assert "is not running (ENDED)" in adm("jobs", "cancel", str(other.pid), "--run-dir", str(run)).stdout
        assert other.poll() is None
    finally:
        other.kill()
    failed = tmp_path / "failed"  # a task that raised: FAILED, not COMPLETED
    proc = adm("submit", "train", f"data={shards}", f"run_dir={failed}", *BASE, "total_kimg=0.064", "lr=1e30",
               "max_bad_steps=1", "precision=fp32", "--cluster", "local", "--gpus-per-node", "2", "--cpu", "--wait",
               check=False)
    assert proc.returncode != 0
    assert adm("jobs", str(failed)).stdout.splitlines()[1].split()[2] == "FAILED"

def test_the_demo_trains_as_slurm_jobs_when_a_slurm_answers(cluster, tmp_path):
    """`adm demo` with a Slurm up: its three trainings are 2-task jobs, the diffusion one preempted once by
    `scancel --signal=USR2`, requeued by submitit and finished (tiny settings, training stage only)."""
    out = tmp_path / "demo"
    stdout = adm("demo", "--out", str(out), "--until", "train", "--kimg", "1.536", "--snapshots", "2",
                 "--classifier-kimg", "0.256", "--upsampler-kimg", "0.128", timeout=900).stdout
    assert "as Slurm jobs" in stdout and stdout.count("submitted to Slurm as job") == 3
    assert "scancel --signal=USR2" in stdout and "resumed from LATEST" in stdout.replace("\n", " ")
    for name, images in (("diffusion", 1536), ("classifier", 256), ("upsampler", 128)):
        run = out / "runs" / name
        assert (run / "snapshots" / f"img{images:012d}" / "model.safetensors").is_file(), name
        row = adm("jobs", str(run)).stdout.splitlines()[1].split()
        assert row[2] == "COMPLETED" and (int(row[3]) >= 1) == (name == "diffusion"), row
    errors = "".join(p.read_text() for p in (out / "runs" / "diffusion" / "slurm").rglob("*_0_log.err"))
    assert "preemption signal (SIGUSR2)" in errors
    assert not (out / "report.html").exists()  # --until train stops there


def test_a_cascade_samples_after_its_base_evaluation_and_reuses_its_images(cluster, digit_shards, tmp_path):
    """On Slurm a cascade's sampling array waits (afterany) for the array of the plain evaluation of its snapshot
    that samples its base images, then runs only the upsampler on that evaluation's shards."""
    from test_eval_farm import SETTING, make_run, make_upsampler

    run = make_run(tmp_path / "run", kimgs=(1,))
    snap = next((run / "snapshots").iterdir())
    make_upsampler(tmp_path / "up")
    ref32, ref64 = tmp_path / "ref32.npz", tmp_path / "ref64.npz"
    adm("eval", "ref", str(digit_shards / "val"), "--out", str(ref32), "--resolution", "32", "--pr-num", "20")
    adm("eval", "ref", str(digit_shards / "train64"), "--out", str(ref64), "--resolution", "64", "--pr-num", "20",
        "--limit", "40")
    slurm = ["--cluster", "slurm", "--cpus-per-task", "1"]
    cascade_args = ["eval", "run", str(snap), "--ref", str(ref64), *SETTING, "--name", "cascade", "--upsampler",
                    str(tmp_path / "up"), "--upsampler-steps", "ddim2", *slurm]
    # a job holding the whole node keeps the plain evaluation's sampling queued while the cascade is submitted
    # (however fast the machine): the wait is then certain to be asked for
    blocker = subprocess.run(["sbatch", "--parsable", "--exclusive", "--time=5", "--output=/dev/null", "--wrap",
                              "sleep 300"], capture_output=True, text=True, check=True).stdout.strip().split(";")[0]
    try:
        deadline = time.time() + 60
        while subprocess.run(["squeue", "-h", "-o", "%T", "-j", blocker], capture_output=True,
                             text=True).stdout.strip() != "RUNNING":
            assert time.time() < deadline, "the blocking job did not start"
            time.sleep(0.5)
        adm("eval", "run", str(snap), "--ref", str(ref32), *SETTING, *slurm)  # queued; not waited for
        out = adm(*cascade_args).stdout
    finally:
        subprocess.run(["scancel", blocker], capture_output=True)
    adm(*cascade_args, "--wait")  # waits for the jobs the first call submitted
    [plain] = (run / "eval").glob(f"{snap.name}--fast--*")
    [cascade] = (run / "eval").glob(f"{snap.name}--cascade--*")
    jobs = {d: json.loads((d / "attempt-1.json").read_text())["jobs"] for d in (plain, cascade)}
    assert f"sampling after job(s) {jobs[plain][0]}, which sample its base images" in out, out
    scripts = "".join(p.read_text() for p in (cascade / "slurm").rglob(f"{jobs[cascade][0]}*_submission.sh"))
    assert f"#SBATCH --dependency=afterany:{jobs[plain][0]}\n" in scripts, scripts  # what sbatch was given
    assert (cascade / "metrics.json").is_file()
    deadline = time.time() + 120
    while True:  # (Slurm records an array task's end a moment after it ends)
        rows = subprocess.run(["sacct", "-n", "-P", "-X", "-j", f"{jobs[plain][0]},{jobs[cascade][0]}", "-o",
                               "JobID,State,Start,End"], capture_output=True, text=True).stdout.split()
        table = {r.split("|")[0]: r.split("|")[1:] for r in rows}
        if all(v[0] == "COMPLETED" for v in table.values()) and len(table) == 4 or time.time() > deadline:
            break
        time.sleep(1)
    base_tasks = [v for k, v in table.items() if k.startswith(f"{jobs[plain][0]}_")]
    cascade_tasks = [v for k, v in table.items() if k.startswith(f"{jobs[cascade][0]}_")]
    assert len(base_tasks) == 2 and len(cascade_tasks) == 2 and all(v[0] == "COMPLETED" for v in table.values()), table
    assert min(v[1] for v in cascade_tasks) >= max(v[2] for v in base_tasks)  # afterany held
    said = "".join(p.read_text() for p in (cascade / "slurm").glob(f"{jobs[cascade][0]}_*/*_log.err"))
    assert said.count(f"from {plain.name}: only the upsampler runs") == 2, said[-3000:]
