"""docs/GUIDE.md cannot drift from the tool: every `adm` command line in it names a real subcommand,
and every option it passes is one that subcommand accepts (read from its own --help)."""

import re
import shlex

import pytest

from conftest import REPO, run_cli


def guide_commands() -> list[list[str]]:
    text = (REPO / "docs" / "GUIDE.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, re.S)
    lines = [line.split("#")[0].strip() for block in blocks for line in block.splitlines()]
    return [shlex.split(line)[1:] for line in lines if line.startswith("adm ")]


def help_for(args: list[str]) -> str:
    """The --help of the deepest subcommand the line names."""
    if len(args) > 1 and not args[1].startswith("-") and "=" not in args[1]:
        proc = run_cli(args[0], args[1], "--help", check=False)
        if proc.returncode == 0 and f"{args[1]}" in proc.stdout.splitlines()[0]:
            return proc.stdout
    proc = run_cli(args[0], "--help", check=False)
    assert proc.returncode == 0, f"adm {args[0]}: not a command ({proc.stderr})"
    return proc.stdout


def test_guide_has_commands():
    assert len(guide_commands()) >= 20


@pytest.mark.parametrize("args", guide_commands(), ids=lambda a: " ".join(a[:2]))
def test_guide_command_is_accepted(args):
    text = help_for(args)
    for token in args:
        if token.startswith("--"):
            assert token.split("=")[0] in text, f"adm {' '.join(args)}: {token} is not an option"
