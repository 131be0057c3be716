import sys

from trainer.preemption import catch_early

catch_early()  # before the heavy imports: a preemption signal then must not kill a rank that is starting

from adm.cli import run_guarded  # noqa: E402
from trainer.cli import main  # noqa: E402

sys.exit(run_guarded(main, sys.argv[1:]))
