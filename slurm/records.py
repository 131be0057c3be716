"""Job records kept in the run directory (RUN/jobs.jsonl), so they outlive the session that submitted."""

import fcntl
import json
import os
import sys
import time
from pathlib import Path

RECORDS = "jobs.jsonl"


def add(run_dir: Path, record: dict) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    if record.get("folder"):  # absolute: `adm jobs` finds the logs from any directory, not only the submit one
        record = {**record, "folder": os.path.abspath(record["folder"])}
    line = (json.dumps({"submitted": time.strftime("%Y-%m-%d %H:%M:%S"), **record}) + "\n").encode()
    # NFS has no atomic O_APPEND between hosts (a scheduler job on a node, a submit on the login node):
    # a POSIX lock, which NFS does carry, and the line in one write
    fd = os.open(run_dir / RECORDS, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX)
        except OSError as e:  # a filesystem without locks (Lustre mounted noflock): the job is submitted already,
            # so its record goes in unlocked (a line torn by a race is skipped when read) rather than not at all
            print(f"warning: {run_dir / RECORDS}: no lock on this filesystem ({e.strerror}); appended without one",
                  file=sys.stderr)
        os.write(fd, line)
    finally:
        os.close(fd)  # closing releases the lock


def read(run_dir: Path) -> list[dict]:
    path = run_dir / RECORDS
    if not path.is_file():
        return []
    out, torn = [], 0
    for line in filter(str.strip, path.read_text().splitlines()):
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # a line torn by a writer without the lock: one lost record, not every command
            torn += 1
    if torn:
        print(f"warning: {path}: skipped {torn} unreadable line(s)", file=sys.stderr)
    for rec in out:
        if rec.get("folder") and not os.path.isabs(rec["folder"]):
            rec["folder"] = str(_older_folder(run_dir, Path(rec["folder"])))
    return out


def _older_folder(run_dir: Path, folder: Path) -> Path:
    """A log folder recorded relative to the directory the job was submitted from (records before they were
    absolute): RUN/slurm/JOB of a training, RUN/eval/KEY/slurm of an evaluation, found under this run_dir."""
    if folder.exists():
        return folder
    parts = folder.parts
    if len(parts) >= 3 and parts[-3] == "eval" and parts[-1] == "slurm":
        return run_dir.joinpath(*parts[-3:])
    if len(parts) >= 2 and parts[-2] == "slurm":
        return run_dir.joinpath(*parts[-2:])
    return folder


def newest_passes(recs: list[dict]) -> list[dict]:
    """The records to list: every scheduler chain (a pass every few hours, for months) as its newest pass,
    with "passes" counting them, where that chain's first pass stood; every other record as it is."""
    out, at = [], {}
    for rec in recs:
        if rec.get("kind") != "eval-schedule":
            out.append(rec)
            continue
        chain = str(rec.get("chain") or rec["job_id"])
        if chain in at:
            out[at[chain]] = {**rec, "passes": out[at[chain]]["passes"] + 1}
        else:
            at[chain] = len(out)
            out.append({**rec, "passes": 1})
    return out


def find(job_id: str, run_dirs: list[Path]) -> tuple[Path, dict] | None:
    """The record of a job: a training's, or an evaluation's by any of its stages (sampling and feature
    arrays, their tasks as ARRAY_TASK, the metrics job)."""
    job_id = str(job_id)
    for run_dir in run_dirs:
        for rec in read(run_dir):
            ids = {str(rec["job_id"]), *map(str, rec.get("jobs", []))}
            if job_id in ids or job_id.split("_")[0] in ids:
                return run_dir, rec
    return None
