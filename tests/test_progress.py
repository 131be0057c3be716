"""Progress of long work: a bar on a terminal, whole lines at intervals in a batch job's log."""

import io
import re
import time

from adm.progress import progress


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_a_log_gets_whole_lines_at_intervals_with_count_rate_and_time_left():
    log = io.StringIO()
    for _ in progress(range(12), desc="sampling", unit="img", interval_s=0.1, stream=log):
        time.sleep(0.03)
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue() and log.getvalue().endswith("\n")
    assert 2 <= len(lines) <= 5, lines  # about one a 0.1 s over 0.36 s, and the last
    counts = [int(re.fullmatch(r"sampling: (\d+)/12 img \(\d+%\) in 00:00, [\d.]+img/s, about 00:0\d left", line)[1])
              for line in lines]
    assert counts == sorted(counts) and counts[-1] == 12 and counts[0] > 0


def test_short_work_says_nothing_in_a_log_and_draws_a_bar_on_a_terminal():
    log, term = io.StringIO(), Terminal()
    for stream in (log, term):
        bar = progress(total=5, desc="features", unit="img", stream=stream)
        bar.update(5)
        bar.close()
    assert log.getvalue() == ""
    assert "\r" in term.getvalue() and "features: 100%" in term.getvalue() and "5/5" in term.getvalue()
    quiet = io.StringIO()
    for _ in progress(range(3), desc="x", enabled=False, interval_s=0, stream=quiet):
        time.sleep(0.01)
    assert quiet.getvalue() == ""


def test_work_of_unknown_length_says_its_count_and_rate():
    log = io.StringIO()
    for _ in progress(iter(range(6)), desc="reading", unit="shard", interval_s=0.05, stream=log):
        time.sleep(0.03)
    assert re.fullmatch(r"reading: 6 shard in 00:00, [\d.]+shard/s", log.getvalue().splitlines()[-1])
