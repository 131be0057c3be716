"""Preemption: the signal handler only sets a flag; ranks agree on it at step boundaries."""

import signal

EXIT_REQUEUE = 75  # EX_TEMPFAIL: "saved after a preemption signal; run the same command again to resume"
# every signal this process got: SIGTERM means Slurm itself ends the job (and requeues it, or not)
RECEIVED: set[str] = set()
# RECEIVED as it was when the ranks agreed to stop. Decide from this, not from RECEIVED later: once other
# ranks exit, srun's --kill-on-bad-exit sends the survivors a SIGTERM that says nothing about why they stopped.
AGREED: set[str] = set()


class PreemptionFlag:
    """SIGUSR2 (submitit's, Slurm's --signal) and SIGTERM set `requested`; nothing else happens in the handler."""

    def __init__(self, signals=(signal.SIGUSR2, signal.SIGTERM)):
        self.requested, self.signal_name, self.signals = False, None, signals
        for s in signals:  # installing runs any handler still pending (catch_early's): RECEIVED is read after
            signal.signal(s, self._handle)
        early = sorted(RECEIVED & {signal.Signals(s).name for s in signals})  # got before this existed
        if early and not self.requested:
            self.requested, self.signal_name = True, early[0]

    def agree(self) -> None:
        """The ranks agreed to stop: freeze which signals brought us here."""
        AGREED.clear()
        AGREED.update(RECEIVED)

    def ignore_further(self) -> None:
        """After the last save a late signal (Slurm's tick can be late) must not kill a finished run."""
        for s in self.signals:
            signal.signal(s, signal.SIG_IGN)

    def _handle(self, signum, frame):
        self.requested = True
        self.signal_name = signal.Signals(signum).name
        RECEIVED.add(self.signal_name)


def catch_early(signals=(signal.SIGUSR2, signal.SIGTERM)) -> None:
    """From a training process's first line until PreemptionFlag takes over (after the imports, the checks
    and DeepSpeed's start: seconds): a preemption signal is recorded, not left to its default action, which
    would kill the process before it could stop cleanly or say anything."""
    for s in signals:
        signal.signal(s, _record)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, set(signals))  # blocked by a launcher until now: delivered here


def _record(signum, frame):
    RECEIVED.add(signal.Signals(signum).name)


def submitit_should_requeue() -> bool:
    """SIGUSR2 is our --signal (time limit, or preemption with preempt_send_user_signal): submitit requeues.
    A SIGTERM before the agreement comes from Slurm ending the job itself (`scontrol requeue`, a preemption
    without the user signal, `scancel`): Slurm requeues or not; requeueing here would undo a cancel."""
    return "SIGTERM" not in AGREED
