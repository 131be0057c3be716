"""Precision/recall split over metric workers (MPI ranks, as `adm eval ... --metric-workers N` runs them):
seconds at 1, 2, ... workers with the machine's cores shared out (threads per worker = cores / workers),
the same precision and recall at every count, and each worker's share of the distance GEMM work.

    .venv/bin/python bench/pr_workers.py --ref 2000 --samples 10000 --workers 1 2 --out bench/results/pr-workers.json

On a machine with C cores, W workers of C/W threads do the same GEMM work in all as one process of C
threads: the ratio to one worker shows what splitting costs (ideally 1.0). Across nodes, W workers
divide the time by W.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import write_result  # noqa: E402


def realistic_features(n_ref: int, n_samples: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Non-negative, correlated 2048-d points, as pool_3 features of images are."""
    base = np.abs(rng.normal(size=(n_ref + n_samples, 64)) @ rng.normal(size=(64, 2048))).astype(np.float32) / 8
    return base[:n_ref], base[n_ref:] * 1.05


def gemm_rows_per_worker(n: int, block: int, workers: int) -> list[int]:
    """Row x column pairs of the radii's distance blocks each worker computes (upper triangle, dealt out)."""
    blocks = [min(block, n - s) for s in range(0, n, block)]
    pairs = [(a, a) for a in blocks] + [(a, b) for i, a in enumerate(blocks) for b in blocks[i + 1:]]
    diag, off = pairs[:len(blocks)], pairs[len(blocks):]
    return [sum(a * b for a, b in diag[w::workers] + off[w::workers]) for w in range(workers)]


def worker(features: Path, out: Path, distance: str, repeats: int) -> None:
    """One MPI rank: time precision_recall with the others (rank 0 writes the result)."""
    from eval.comm import discover
    from eval.precision_recall import precision_recall

    comm = discover("auto")
    data = np.load(features)
    seconds = float("inf")
    for _ in range(repeats):  # the best of a few: the first also pays for oneDNN's set-up and page faults
        comm.barrier()
        start = time.perf_counter()
        pr = precision_recall(data["ref"], data["samples"], distance=distance, comm=comm)
        comm.barrier()
        seconds = min(seconds, time.perf_counter() - start)
    if comm.rank == 0:
        out.write_text(json.dumps({"workers": comm.size, "seconds": seconds, "precision": pr[0], "recall": pr[1]}))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ref", type=int, default=2000)
    p.add_argument("--samples", type=int, default=10000)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--distance", choices=["fp32", "fp16"], default="fp32")
    p.add_argument("--cores", type=int, default=os.cpu_count(), help="cores shared out among the workers")
    p.add_argument("--repeats", type=int, default=2, help="timed runs per worker count (the best is kept)")
    p.add_argument("--out", type=Path)
    p.add_argument("--worker", nargs=2, type=Path, metavar=("FEATURES", "OUT"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        return worker(*a.worker, a.distance, a.repeats)
    mpiexec = Path(sys.executable).with_name("mpiexec")
    if not mpiexec.is_file():
        raise SystemExit(f"{mpiexec}: missing (the mpich wheel, installed by scripts/setup.sh, provides it)")
    ref, samples = realistic_features(a.ref, a.samples, np.random.default_rng(0))
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        feats = Path(tmp) / "features.npz"
        np.savez(feats, ref=ref, samples=samples)
        for w in a.workers:
            threads = max(1, a.cores // w)
            out = Path(tmp) / f"w{w}.json"
            env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
            subprocess.run([str(mpiexec), "-n", str(w), sys.executable, __file__, "--distance", a.distance,
                            "--repeats", str(a.repeats),
                            "--worker", str(feats), str(out)], env=env, check=True)
            run = json.loads(out.read_text()) | {"threads_per_worker": threads}
            if a.distance == "fp32":
                run["radii_gemm_pairs_per_worker"] = max(gemm_rows_per_worker(a.samples, 2048, w))
            runs.append(run)
    one = runs[0]
    for r in runs:
        r["identical_to_first"] = (r["precision"], r["recall"]) == (one["precision"], one["recall"])
        r["time_vs_first"] = r["seconds"] / one["seconds"]
    write_result({"ref": a.ref, "samples": a.samples, "dim": 2048, "distance": a.distance, "cores": a.cores,
                  "runs": runs}, a.out)


if __name__ == "__main__":
    main()
