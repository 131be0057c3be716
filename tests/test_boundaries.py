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
