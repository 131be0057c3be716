import sys

from adm.cli import run_guarded

argv = sys.argv[1:]
if argv and argv[0] in ("sample", "report"):  # `adm sample` and `adm report` live in this package too
    from eval import report, sample

    module = sample if argv[0] == "sample" else report
    sys.exit(run_guarded(module.main, argv[1:], f"python -m eval {argv[0]}"))
from eval.cli import main  # noqa: E402

sys.exit(run_guarded(main, argv))
