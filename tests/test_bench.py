"""The benchmark scripts run and write the JSON they promise (numbers are not judged here)."""

import json
import subprocess
import sys

from conftest import REPO


def test_models_bench_writes_json(tmp_path):
    out = tmp_path / "models.json"
    proc = subprocess.run([sys.executable, "bench/models.py", "--cases", "tiny-classifier-32", "--iters", "1",
                           "--rounds", "1", "--warmup", "1", "--channels-last", "ours", "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    (row,) = result["rows"]
    assert row["case"] == "tiny-classifier-32" and row["params"] == 563082
    for key in ("ours_train_img_s", "reference_train_img_s", "train_speedup", "forward_speedup",
                "train_gflops_per_img", "forward_gflops_per_img"):
        assert row[key] > 0
    # forward+backward is ~3x the forward FLOPs
    assert 2.0 < row["train_gflops_per_img"] / row["forward_gflops_per_img"] < 3.5


def test_eval_bench_writes_json_and_agrees_with_the_adm_algorithm(tmp_path):
    out = tmp_path / "eval.json"
    proc = subprocess.run([sys.executable, "bench/eval.py", "--ref", "300", "--samples", "700", "--images", "2",
                           "--out", str(out)], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    pr = json.loads(out.read_text())["precision_recall"]
    assert pr["ours_fp32"] == pr["adm_numpy_fp32"]  # the port of ADM's algorithm is an independent check
    assert pr["ours_fp32_s"] > 0 and pr["adm_numpy_fp32_s"] > 0
