"""Job records kept in the run directory (RUN/jobs.jsonl), so they outlive the session that submitted."""

import json
import time
from pathlib import Path

RECORDS = "jobs.jsonl"


def add(run_dir: Path, record: dict) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / RECORDS, "a") as f:
        f.write(json.dumps({"submitted": time.strftime("%Y-%m-%d %H:%M:%S"), **record}) + "\n")


def read(run_dir: Path) -> list[dict]:
    path = run_dir / RECORDS
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


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
