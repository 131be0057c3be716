import sys

from adm.cli import run_guarded
from eval.cli import main

sys.exit(run_guarded(main, sys.argv[1:]))
