"""Preemption: the signal handler only sets a flag; ranks agree on it at step boundaries."""

import signal

EXIT_REQUEUE = 75  # EX_TEMPFAIL: "saved after a preemption signal; run the same command again to resume"
# every signal this process got: SIGTERM means Slurm itself ends the job (and requeues it, or not)
RECEIVED: set[str] = set()


class PreemptionFlag:
    """SIGUSR2 (submitit's, Slurm's --signal) and SIGTERM set `requested`; nothing else happens in the handler."""

    def __init__(self, signals=(signal.SIGUSR2, signal.SIGTERM)):
        self.requested = False
        self.signal_name = None
        self.signals = signals
        for s in signals:
            signal.signal(s, self._handle)

    def ignore_further(self) -> None:
        """After the last save a late signal (Slurm's tick can be late) must not kill a finished run."""
        for s in self.signals:
            signal.signal(s, signal.SIG_IGN)

    def _handle(self, signum, frame):
        self.requested = True
        self.signal_name = signal.Signals(signum).name
        RECEIVED.add(self.signal_name)
