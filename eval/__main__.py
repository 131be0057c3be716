import sys

from adm.cli import run_guarded
from eval.compare import main

sys.exit(run_guarded(main, sys.argv[1:]))
