"""Runs ADM's own evaluator code on given features, for bench/eval.py's comparison: precision/recall through
its ManifoldEstimator (TensorFlow, fp16 distances) and FID through its FIDStatistics (scipy's sqrtm), timed.

    PYTHON_WITH_TENSORFLOW bench/adm_evaluator_runner.py EVALUATOR.py FEATURES.npz OUT.json

EVALUATOR.py is evaluations/evaluator.py of openai/guided-diffusion (not shipped here: bring your copy);
FEATURES.npz holds `ref` and `samples` (float32, N x 2048). Only numpy, scipy and TensorFlow are needed.
"""

import importlib.util
import json
import sys
import time

import numpy as np


def main(evaluator_path: str, features: str, out: str) -> None:
    spec = importlib.util.spec_from_file_location("adm_evaluator", evaluator_path)
    adm = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(adm)
    tf = adm.tf
    data = np.load(features)
    ref, samples = data["ref"], data["samples"]
    session = tf.Session(config=tf.ConfigProto(allow_soft_placement=True))
    estimator = adm.ManifoldEstimator(session)
    estimator.warmup()
    start = time.perf_counter()  # what Evaluator.compute_prec_recall does
    radii_ref = estimator.manifold_radii(ref)
    radii_samples = estimator.manifold_radii(samples)
    pr = estimator.evaluate_pr(ref, radii_ref, samples, radii_samples)
    pr_s = time.perf_counter() - start
    start = time.perf_counter()  # what Evaluator.compute_statistics + frechet_distance do
    stats = [adm.FIDStatistics(np.mean(x, axis=0), np.cov(x, rowvar=False)) for x in (ref, samples)]
    fid = float(stats[1].frechet_distance(stats[0]))
    fid_s = time.perf_counter() - start
    with open(out, "w") as f:
        json.dump({"precision": float(pr[0][0]), "recall": float(pr[1][0]), "pr_s": pr_s, "fid": fid,
                   "fid_s": fid_s, "tensorflow": tf.__version__, "threads": len(__import__("os").sched_getaffinity(0))},
                  f)


if __name__ == "__main__":
    main(*sys.argv[1:4])
