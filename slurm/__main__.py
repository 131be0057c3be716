import sys

from adm.cli import run_guarded
from slurm.submit import main_jobs, main_submit

argv = sys.argv[1:]
if argv and argv[0] == "jobs":
    sys.exit(run_guarded(main_jobs, argv[1:]))
sys.exit(run_guarded(main_submit, argv[1:] if argv and argv[0] == "submit" else argv))
