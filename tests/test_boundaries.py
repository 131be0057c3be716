"""Package boundaries from DESIGN.md: the networks in models/ are pure torch."""

import ast

import pytest

from conftest import REPO

# models/ may touch files only in these modules (snapshot I/O and the command line)
FILE_MODULES = {"snapshot.py", "cli.py", "__main__.py"}
FORBIDDEN = {"torch.distributed", "deepspeed", "webdataset", "submitit", "mpi4py", "os", "pathlib", "time",
             "datetime", "shutil", "tempfile", "io", "trainer", "data_pipeline", "slurm", "eval", "random"}


def imports_of(path):
    tree = ast.parse(path.read_text())
    names, calls = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module)
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            calls.add(node.func.id)
    return names, calls


@pytest.mark.parametrize("path", sorted(p for p in (REPO / "models").glob("*.py") if p.name not in FILE_MODULES),
                         ids=lambda p: p.name)
def test_model_modules_are_pure(path):
    names, calls = imports_of(path)
    bad = {n for n in names if any(n == f or n.startswith(f + ".") for f in FORBIDDEN)}
    assert not bad, f"{path.name} imports {bad}"
    assert "open" not in calls, f"{path.name} opens files"


# DESIGN.md's package table, the imports it rules out between our packages (`adm`, the one command's front
# and its config helpers, is shared by all): the trainer writes training state and snapshots and knows
# nothing of the farm or Slurm; the farm reads snapshots and never training state.
NEVER = {"data_pipeline": {"models", "trainer", "eval", "slurm"}, "trainer": {"eval", "slurm"}, "eval": {"trainer"}}


@pytest.mark.parametrize("package", sorted(NEVER))
def test_packages_import_only_what_the_design_allows(package):
    bad = sorted(f"{path.relative_to(REPO)} imports {name}" for path in (REPO / package).rglob("*.py")
                 for name in imports_of(path)[0] if name.split(".")[0] in NEVER[package])
    assert not bad, "; ".join(bad)
