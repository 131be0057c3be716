"""The `adm` command line, run as a user runs it."""

import argparse
import importlib
import os
import re
import subprocess
import sys

import pytest

from conftest import REPO, run_cli


def test_help_lists_subcommands():
    """`adm --help` names every command, one line each with its summary (the README's list of ten)."""
    from adm.cli import COMMANDS

    out = run_cli("--help").stdout
    listed = [line.split()[0] for line in out.split("commands:\n", 1)[1].split("\n\n", 1)[0].splitlines()]
    assert listed == ["models", "data", "train", "submit", "jobs", "sample", "eval", "report", "posthoc", "demo"]
    for name, (_, summary) in COMMANDS.items():
        assert f"  {name}" in out and summary in out, name


def test_models_list_prints_presets_with_counts():
    out = run_cli("models", "list").stdout
    for name, count in [("adm-64", "295.9M"), ("adm-128", "421.5M"), ("adm-256", "553.8M"), ("adm-512", "559.0M"),
                        ("upsampler-64-256", "311.8M"), ("upsampler-128-512", "308.8M"),
                        ("classifier-64", "65.4M"), ("classifier-128", "42.6M"), ("tiny-32", "1.4M")]:
        line = next(line for line in out.splitlines() if f" {name} " in line)
        assert count in line, line


def test_models_describe_preset_with_override():
    out = run_cli("models", "describe", "adm-64", "dropout=0.0").stdout
    assert "dropout=0.0" in out and "295,904,454" in out and "3 x 6 heads" in out
    assert "channel_mult: [1, 2, 3, 4]," in out  # ADM's 64x64 multipliers, as its flags write them


def test_python_dash_m_package_works():
    proc = subprocess.run([sys.executable, "-m", "models", "describe", "tiny-32"], capture_output=True, text=True,
                          cwd=REPO)
    assert proc.returncode == 0 and "tiny-32" in proc.stdout


def test_every_command_runs_as_python_dash_m():
    """What `adm --help` and the README promise: each command also runs from its package with `python -m`."""
    from adm.cli import COMMANDS

    forms = {"models": ["models"], "data": ["data_pipeline"], "train": ["trainer"], "submit": ["slurm", "submit"],
             "jobs": ["slurm", "jobs"], "sample": ["eval", "sample"], "eval": ["eval"], "report": ["eval", "report"],
             "posthoc": ["trainer.posthoc"], "demo": ["adm", "demo"]}
    assert set(forms) == set(COMMANDS)
    forms |= {f"{m} module": [m] for m in ("eval.sample", "eval.report", "adm.demo")}  # the modules themselves too
    for command, form in forms.items():
        proc = subprocess.run([sys.executable, "-m", *form, "--help"], capture_output=True, text=True, cwd=REPO)
        assert proc.returncode == 0 and proc.stdout.startswith("usage: "), (command, proc.stdout[:300], proc.stderr)


def test_user_errors_are_one_clear_line(tmp_path):
    (tmp_path / "latin1.yaml").write_bytes("lr: 3e-4  # \xe9t\xe9\n".encode("latin-1"))
    for args, expected in [(("train", "tests"), "tests: a directory; expected a YAML file"),
                           (("train", str(tmp_path / "latin1.yaml")), "latin1.yaml: not UTF-8 text (byte 12)"),
                           (("data", "verify", str(tmp_path / "nope")), "nope: no such directory"),
                           (("data", "bench", str(tmp_path), "--resolution", "32", "--seconds", "nan"),
                            "--seconds must be positive and finite and --workers at least 0, got nan"),
                           (("models", "describe", "adm-1024"), "unknown model preset 'adm-1024'"),
                           (("models", "describe", "tiny-32", "heads=3"), "unknown key 'heads'"),
                           (("models", "describe", "tiny-32", "dropout=lots"), "bad value for 'dropout'"),
                           (("models", "describe", "missing.yaml"), "config file missing.yaml does not exist")]:
        proc = run_cli(*args, check=False)
        assert proc.returncode == 2, proc
        assert expected in proc.stderr and "Traceback" not in proc.stderr
    proc = run_cli("frobnicate", check=False)
    assert proc.returncode == 2 and "unknown command" in proc.stderr


def test_a_full_disk_is_one_line_naming_the_file_and_other_os_errors_still_show_their_traceback(capsys):
    import errno

    from adm.cli import run_guarded

    def failing(error):
        def main(argv):
            raise error
        return main

    for code in (errno.ENOSPC, errno.EDQUOT):
        full = OSError(code, os.strerror(code), "runs/x/checkpoints/.tmp-000123/mp_rank_00_model_states.pt")
        assert run_guarded(failing(full), []) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [f"error: runs/x/checkpoints/.tmp-000123/mp_rank_00_model_states.pt: {os.strerror(code)} "
                       "(free space, then run the command again)"]
    with pytest.raises(OSError, match="Input/output error"):  # a fault, not the user's to fix: the traceback
        run_guarded(failing(OSError(errno.EIO, "Input/output error")), [])


def test_torchs_own_failures_keep_their_traceback_and_a_users_error_is_one_line(capsys):
    """Out of memory, a CUDA error and a broken collective are RuntimeErrors, like the user errors that print
    one line: they go on with their traceback (where it happened); a plain RuntimeError is still one line."""
    import torch.distributed

    from adm.cli import run_guarded

    def failing(error):
        def main(argv):
            raise error
        return main

    for error in (torch.OutOfMemoryError("CUDA out of memory."), torch.AcceleratorError("device-side assert"),
                  torch.distributed.DistBackendError("NCCL error: unhandled system error")):
        with pytest.raises(type(error)):
            run_guarded(failing(error), [])
    assert run_guarded(failing(RuntimeError("run_dir x: no checkpoint")), []) == 2
    assert capsys.readouterr().err == "error: run_dir x: no checkpoint\n"


def test_demo_options_are_checked_before_anything_is_written(tmp_path, capsys):
    from adm.cli import main as adm

    for args, expected in [(["--resolution", "17"], "--resolution 17: a multiple of 8"),
                           (["--snapshots", "0"], "--snapshots 0: at least 2"),
                           (["--kimg", "-1"], "--kimg -1.0: at least 0.064 (one global batch of 64 images)"),
                           (["--samples", "1"], "--samples 1: at least 4"),
                           (["--scales", "1"], "--scales '1': two classifier-guidance scales"),
                           (["--upsampler-patch", "6"], "--upsampler-patch 6: 0 (whole images) or a multiple of 4"),
                           (["--upsampler-patch", "32"], "under the upsampler's resolution 32"),
                           (["--steps", "ddim0"], "timestep respacing 'ddim0'")]:
        assert adm(["demo", "--out", str(tmp_path / "demo"), *args]) == 2
        assert expected in capsys.readouterr().err
    assert not (tmp_path / "demo").exists()


def test_the_site_file_is_checked(tmp_path, monkeypatch):
    """The site file's keys are known ones: a typo would send every job to the default partition."""
    from slurm.submit import site_defaults

    site = tmp_path / "site.yaml"
    site.write_text("partition: gpu\naccount: my-project\nsetup:\n  - module load cuda/12.4\n")  # the guide's
    monkeypatch.setenv("ADM_SITE", str(site))
    assert site_defaults() == {"partition": "gpu", "account": "my-project", "setup": ["module load cuda/12.4"]}
    site.write_text("partitoin: gpu\n")
    proc = run_cli("submit", "train", "preset=tiny-32", "--cluster", "local", "--dry-run", check=False)
    assert proc.returncode == 2 and f"{site}: unknown option(s) partitoin; known: partition, account" in proc.stderr
    site.write_text("setup: module load cuda\n")
    with pytest.raises(ValueError, match="setup must be a list of shell lines"):
        site_defaults()
    site.write_text("partition: gpu\naccount: a\npartition: debug\n")  # which one was meant: said, not guessed
    with pytest.raises(ValueError, match=rf"{site}: not valid YAML: .*found duplicate key 'partition'"):
        site_defaults()
    # each value of the type sbatch takes, named with its file (a list or a number became a traceback, a
    # bare `#SBATCH --qos` line, or a script with --mem=abc)
    for text, expected in [("partition: [a, b]\n", "partition: expected a name, got ['a', 'b']"),
                           ("qos: true\n", "qos: expected a name, got True"),
                           ("mem: abc\n", "mem: expected Slurm's form, e.g. 64G or 500M, got 'abc'"),
                           ("cpus_per_task: abc\n", "cpus_per_task: expected a whole number of at least 1, got 'abc'"),
                           ("cpus_per_task: 0\n", "cpus_per_task: expected a whole number of at least 1, got 0"),
                           ("setup: [1]\n", "setup must be a list of shell lines (strings), got [1]")]:
        site.write_text(text)
        with pytest.raises(ValueError, match=re.escape(f"{site}: {expected}")):
            site_defaults()
    site.write_text("mem: 64G\ncpus_per_task: 8\n")
    assert site_defaults() == {"mem": "64G", "cpus_per_task": 8}


def test_slurm_time_takes_every_form_slurm_takes():
    """sbatch's --time forms (1-02:30 is a day, two hours and thirty minutes: it was read as 24 hours and
    2.5 minutes; 1-12 was refused)."""
    from slurm.submit import parse_time

    for text, minutes in [("90", 90), ("90:30", 91), ("00:90:00", 90), ("24:00:00", 1440), ("1-12", 2160),
                          ("1-02:30", 1590), ("1-00:00:00", 1440), ("2-3:4:5", 3065)]:
        assert parse_time(text) == minutes, text
    for text in ("1:2:3:4", "abc", "1-", "-5"):
        with pytest.raises(ValueError, match="expected one of Slurm's forms"):
            parse_time(text)


def test_commands_check_their_options_before_reading_or_training(tmp_path, capsys):
    """`adm models convert X --preset nope` says the preset before reading X (several GB); a demo stage of
    less than one batch is refused before the data stage; a training config describes its model; the
    posthoc module's errors are one line too."""
    from adm.cli import main as adm

    pt = tmp_path / "x.pt"
    pt.write_bytes(b"not a checkpoint")
    assert adm(["models", "convert", str(pt), str(tmp_path / "s"), "--preset", "nope"]) == 2
    assert "unknown model preset 'nope'" in capsys.readouterr().err
    assert adm(["demo", "--out", str(tmp_path / "demo"), "--classifier-kimg", "0.03"]) == 2
    assert "--classifier-kimg 0.03: at least 0.064 (one global batch of 64 images)" in capsys.readouterr().err
    assert adm(["demo", "--out", str(tmp_path / "demo"), "--kimg", "inf"]) == 2
    assert not (tmp_path / "demo").exists()
    assert adm(["models", "describe", "configs/train/tiny-32.yaml"]) == 0  # its preset and model section
    out = capsys.readouterr().out
    assert "model_channels=32" in out and "num_classes=11" in out
    (tmp_path / "m.yaml").write_text("model:\n")
    assert adm(["models", "describe", str(tmp_path / "m.yaml")]) == 2
    assert "model: expected a preset's name or a section of model settings, got None" in capsys.readouterr().err
    proc = subprocess.run([sys.executable, "-m", "trainer.posthoc", str(tmp_path / "nope"), "--sigma-rel", "0.07"],
                          cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr


def _parsers(parser):
    """A parser and every sub-command parser under it."""
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in dict.fromkeys(action.choices.values()):  # aliases name one parser twice
                yield from _parsers(sub)


def test_every_option_says_what_it_does(monkeypatch):
    """`adm COMMAND --help` explains each argument: every flag and positional argument of every command and
    sub-command has a help text."""
    from adm.cli import COMMANDS

    class Seen(Exception):
        pass

    def capture(self, *args, **kwargs):
        raise Seen(self)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    monkeypatch.setattr(argparse.ArgumentParser, "parse_known_args", capture)
    bare = []
    for name, (target, _) in COMMANDS.items():
        module_name, _, func = target.partition(":")
        with pytest.raises(Seen) as seen:
            getattr(importlib.import_module(module_name), func or "main")([])
        for parser in _parsers(seen.value.args[0]):
            bare += [f"{parser.prog} {a.option_strings[0] if a.option_strings else a.dest}" for a in parser._actions
                     if a.help is None and not isinstance(a, (argparse._HelpAction, argparse._SubParsersAction))]
    assert not bare, f"arguments without a help text: {', '.join(bare)}"
