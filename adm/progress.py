"""Progress of long work: tqdm's bar on a terminal; in a batch job's log (no terminal) a plain line every
`interval_s` with the count, the rate and the time left, so that a Slurm log tells slow work from a hang.
Work shorter than the interval says nothing there, as before."""

import sys

from tqdm import tqdm

LINE = "{desc}: {n_fmt}/{total_fmt} {unit} ({percentage:.0f}%) in {elapsed}, {rate_fmt}, about {remaining} left"
LINE_NO_TOTAL = "{desc}: {n_fmt} {unit} in {elapsed}, {rate_fmt}"


class _Lines:
    """tqdm's output as whole lines: it redraws its bar after a carriage return, which a log file keeps."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> None:
        text = text.replace("\r", "").strip()
        if text:
            self.stream.write(text + "\n")
            self.stream.flush()

    def flush(self) -> None:
        self.stream.flush()


def progress(iterable=None, *, total: int | None = None, desc: str = "", unit: str = "it", enabled: bool = True,
             interval_s: float = 60.0, stream=None, **kwargs) -> tqdm:
    """A tqdm (iterate over it, or call update/close) that draws a bar on a terminal and writes a line every
    interval_s elsewhere; `enabled=False` says nothing anywhere."""
    stream = stream if stream is not None else sys.stderr
    if stream.isatty():
        return tqdm(iterable, total=total, desc=desc, unit=unit, disable=not enabled, file=stream, **kwargs)
    if total is None and iterable is not None and hasattr(iterable, "__len__"):
        total = len(iterable)
    # delay: nothing until the first interval has passed; maxinterval: tqdm's monitor thread would otherwise
    # redraw every 10 s once updates come fast
    return tqdm(iterable, total=total, desc=desc, unit=unit, disable=not enabled, file=_Lines(stream),
                mininterval=interval_s, maxinterval=interval_s, delay=interval_s,
                bar_format=LINE if total else LINE_NO_TOTAL, **kwargs)
