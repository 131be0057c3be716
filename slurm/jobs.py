"""The callables submitit runs. They carry no state in their pickle: a requeued job finds LATEST itself."""

import os
import signal

import submitit


def own_cpus() -> None:
    """torch's threads to this task's CPUs (SLURM_CPUS_PER_TASK; under `--cluster local`, the machine's share
    of each task): without Slurm's CPU binding a task sees every core of the node, and tasks sharing it would
    oversubscribe it several times over."""
    cpus = os.environ.get("SLURM_CPUS_PER_TASK", "")
    local_tasks = int(os.environ.get("SUBMITIT_LOCAL_NTASKS", "1"))  # --cluster local: tasks share this machine
    if not cpus.isdigit() and local_tasks > 1:
        cpus = str(max(1, (os.cpu_count() or 1) // local_tasks))
    if cpus.isdigit():
        import torch

        torch.set_num_threads(max(1, int(cpus)))


class TrainJob(submitit.helpers.Checkpointable):
    """One Slurm task per device runs the training loop; on preemption/timeout the ranks save together,
    then global rank 0 hands over to submitit, which pickles this same (stateless) call and requeues."""

    def __init__(self, config: str | None, overrides: list[str], cwd: str | None = None):
        self.config, self.overrides = config, list(overrides)
        self.cwd = cwd or os.getcwd()  # relative paths (the config, run_dir, data) mean what they meant there

    def __call__(self) -> int:
        from trainer.preemption import catch_early

        # submitit's own SIGTERM handler only logs ("Bypassing signal SIGTERM"): a SIGTERM (scancel, Slurm's
        # requeue or preemption) during the seconds of imports and DeepSpeed's start before the training loop's
        # handler was lost, on one rank or all; recorded now, the loop stops on it and rank 0 leaves the requeue
        # to Slurm. (SIGUSR2 stays submitit's until then: on rank 0 it requeues at once, nothing being unsaved.)
        catch_early((signal.SIGTERM,))
        cwd = getattr(self, "cwd", None)  # None: pickled by an older version
        try:
            if cwd:
                os.chdir(cwd)
        except OSError as e:  # else Slurm would run us in /tmp, and each node would write its own run there
            raise SystemExit(f"error: the directory this job was submitted from, {cwd}, is not reachable "
                             f"on {os.uname().nodename} ({e.strerror}): submit from a shared filesystem") from None
        from trainer.config import load_train_config
        from trainer.loop import training_loop
        from trainer.preemption import EXIT_REQUEUE, submitit_should_requeue

        own_cpus()
        submitit_handler = signal.getsignal(signal.SIGUSR2)  # submitit's checkpoint-and-requeue
        code = training_loop(load_train_config(self.config, self.overrides))
        if code == EXIT_REQUEUE:
            # which signals stopped the ranks decides who requeues: submitit (SIGUSR2) or Slurm itself (SIGTERM)
            if int(os.environ.get("SLURM_PROCID", "0")) == 0 and callable(submitit_handler) \
                    and submitit_should_requeue():
                submitit_handler(signal.SIGUSR2, None)  # checkpoint() + scontrol requeue + exit
            raise SystemExit(EXIT_REQUEUE)
        return code

    def checkpoint(self, *args, **kwargs) -> submitit.helpers.DelayedSubmission:
        # the training state is already on disk (the trainer's collective save); resubmit the same call
        return submitit.helpers.DelayedSubmission(TrainJob(self.config, self.overrides, getattr(self, "cwd", None)))
