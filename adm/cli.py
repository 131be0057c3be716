"""`adm`: one command fronting every package. `adm COMMAND --help` for each."""

import errno
import importlib
import os
import sys

from data_pipeline.patient_read import StillUnreadable

# command -> (module with main(argv, prog), one-line help). Modules are imported only when used.
COMMANDS = {
    "models": ("models.cli", "ADM networks: list presets, describe layouts, convert released checkpoints"),
    "data": ("data_pipeline.cli", "WebDataset shards: write ImageNet (or any labelled images), verify, info, bench"),
    "train": ("trainer.cli", "train with DeepSpeed ZeRO (diffusion, classifier, upsampler); re-running resumes"),
    "submit": ("slurm.submit:main_submit", "submit training to Slurm through submitit (or run it locally)"),
    "jobs": ("slurm.submit:main_jobs", "a run's jobs: state, requeues, progress, logs; cancel"),
    "sample": ("eval.sample", "sample a snapshot (guided, cascaded) into ADM-format npz shards, per-seed"),
    "eval": ("eval.cli", "evaluation: compare (ADM's evaluator), ref, run, schedule, results"),
    "report": ("eval.report", "a run's report: metric curves, tables, grids, losses (HTML + markdown + JSON)"),
    "posthoc": ("trainer.posthoc", "synthesise the EMA of any width from a run's power-EMA profiles (EDM2)"),
    "demo": ("adm.demo", "run the demo on this machine"),
}

USER_ERRORS = (ValueError, KeyError, FileNotFoundError, NotImplementedError, RuntimeError,
               FileExistsError, IsADirectoryError, NotADirectoryError, PermissionError,  # paths given by the user
               TimeoutError,  # a wait the user bounded (adm jobs cancel --timeout)
               StillUnreadable)  # a file the filesystem kept refusing: its message says what to do
FULL = (errno.ENOSPC, errno.EDQUOT)  # a full disk or quota: one line naming the file, not a traceback


def torch_failure(e: BaseException) -> bool:
    """torch's own failures (out of memory, a CUDA error or device-side assert, a collective that broke) are
    RuntimeErrors too, but not the user's input to fix: they keep their traceback, which says where."""
    torch = sys.modules.get("torch")  # not imported: not torch's
    if torch is None:
        return False
    kinds = (getattr(torch, "OutOfMemoryError", None), getattr(torch, "AcceleratorError", None),
             getattr(getattr(torch, "distributed", None), "DistError", None))
    return isinstance(e, tuple(k for k in kinds if isinstance(k, type)))


def run_guarded(main, argv, prog=None) -> int:
    """Run a command; a user error prints one clear message (no traceback) and exits 2.
    Set ADM_DEBUG=1 to see the traceback."""
    try:
        return main(argv, prog) if prog else main(argv)
    except USER_ERRORS as e:
        if os.environ.get("ADM_DEBUG") or torch_failure(e):
            raise
        msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        print(f"error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # Ctrl-C: one line (what was done, how to go on), not a traceback
        print(f"\ninterrupted{': ' + str(e) if str(e) else ''}", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `adm ... | head`: the reader has gone; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except OSError as e:
        if e.errno not in FULL or os.environ.get("ADM_DEBUG"):
            raise
        print(f"error: {e.filename or 'a file'}: {e.strerror} (free space, then run the command again)",
              file=sys.stderr)
        return 2


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: adm COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "Each command also runs as `python -m adm COMMAND ...` or from its package (`python -m eval sample`, "
              "`python -m trainer ...`); `adm COMMAND --help` for its options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from adm import __version__
        print(__version__)
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"error: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    target = COMMANDS[name][0]
    module_name, _, func = target.partition(":")
    module = importlib.import_module(module_name)
    return run_guarded(getattr(module, func or "main"), rest, f"adm {name}")


if __name__ == "__main__":
    sys.exit(main())
