"""The README's test command runs the fast suite plus the long checks named in tests/slow_in_ci.txt."""

import os
import subprocess
import sys

from conftest import REPO, listed_slow_tests


FILES = ("tests/test_demo.py", "tests/test_slurm.py", "tests/test_eval_metrics.py")  # slow, slow, fast


def collect(*args, slow_list=None):
    env = dict(os.environ, **({"ADM_SLOW_LIST": str(slow_list)} if slow_list else {}))
    proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *args],
                          cwd=REPO, capture_output=True, text=True, env=env, timeout=300)
    ids = [line for line in proc.stdout.splitlines() if "::" in line]
    return proc, ids


def test_listed_slow_checks_run_and_the_others_are_deselected(tmp_path):
    listing = tmp_path / "slow.txt"
    listing.write_text("# a comment\ntests/test_demo.py   # the whole file\n"
                       "tests/test_slurm.py::test_dry_run_and_bad_input\n")
    _, everything = collect(*FILES)
    _, fast = collect("-m", "not slow", *FILES)
    _, listed = collect("--slow=listed", *FILES, slow_list=listing)
    demo = [i for i in everything if i.startswith("tests/test_demo.py::")]
    assert demo and fast and set(fast).isdisjoint(demo)
    assert sorted(listed) == sorted(fast + demo + ["tests/test_slurm.py::test_dry_run_and_bad_input"])
    _, none = collect("--slow=none", *FILES, slow_list=listing)
    assert sorted(none) == sorted(fast)
    _, again = collect("--slow=listed", "--slow=all", *FILES, slow_list=listing)  # the last option wins
    assert sorted(again) == sorted(everything)


def test_the_shipped_list_names_existing_slow_checks():
    assert listed_slow_tests(REPO / "tests" / "slow_in_ci.txt")
    proc, ids = collect("--slow=listed")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]


def test_a_list_entry_that_names_nothing_is_an_error(tmp_path):
    listing = tmp_path / "slow.txt"
    listing.write_text("tests/test_slurm.py::test_no_such_thing\n")
    proc, _ = collect("--slow=listed", *FILES, slow_list=listing)
    assert proc.returncode != 0
    assert f"{listing}: 'tests/test_slurm.py::test_no_such_thing' names no collected test marked slow" in \
        proc.stdout + proc.stderr
