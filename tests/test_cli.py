"""The `adm` command line, run as a user runs it."""

import subprocess
import sys

import pytest

from conftest import REPO, run_cli


def test_help_lists_subcommands():
    out = run_cli("--help").stdout
    assert "models" in out and "demo" in out


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


def test_user_errors_are_one_clear_line():
    for args, expected in [(("models", "describe", "adm-1024"), "unknown model preset 'adm-1024'"),
                           (("models", "describe", "tiny-32", "heads=3"), "unknown key 'heads'"),
                           (("models", "describe", "tiny-32", "dropout=lots"), "bad value for 'dropout'"),
                           (("models", "describe", "missing.yaml"), "config file missing.yaml does not exist")]:
        proc = run_cli(*args, check=False)
        assert proc.returncode == 2, proc
        assert expected in proc.stderr and "Traceback" not in proc.stderr
    proc = run_cli("frobnicate", check=False)
    assert proc.returncode == 2 and "unknown command" in proc.stderr


def test_demo_options_are_checked_before_anything_is_written(tmp_path, capsys):
    from adm.cli import main as adm

    for args, expected in [(["--resolution", "17"], "--resolution 17: a multiple of 8"),
                           (["--snapshots", "0"], "--snapshots 0: at least 2"),
                           (["--kimg", "-1"], "--kimg -1.0: must be positive"),
                           (["--samples", "1"], "--samples 1: at least 4"),
                           (["--scales", "1"], "--scales '1': two classifier-guidance scales"),
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
