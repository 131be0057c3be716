"""Evaluation throughput: Inception features/s, precision/recall time (ours, fp32 and fp16 modes,
against a NumPy port of ADM's evaluator's ManifoldEstimator on the same features and machine, and,
with --adm-evaluator, against ADM's own evaluator code in TensorFlow), FID time and agreement, and the
time to merge per-shard statistics.

    .venv/bin/python bench/eval.py --out bench/results/eval-cpu.json
    .venv/bin/python bench/eval.py --ref 10000 --samples 50000 --device cuda   # the real sizes, on a GPU
    .venv/bin/python bench/eval.py --adm-evaluator evaluator.py --adm-python tfvenv/bin/python   # vs ADM's code

ADM's evaluator (evaluations/evaluator.py of openai/guided-diffusion) is not shipped here: give a copy,
and an interpreter with TensorFlow, numpy and scipy (for example a venv with `pip install tensorflow-cpu
scipy`); bench/adm_evaluator_runner.py runs its ManifoldEstimator and FIDStatistics on our features.
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import save_partial, write_result  # noqa: E402
from bench.pr_workers import realistic_features  # noqa: E402
from eval.inception import extract  # noqa: E402
from eval.precision_recall import precision_recall  # noqa: E402
from eval.stats import Statistics, frechet_distance  # noqa: E402


def adm_style_pr(ref: np.ndarray, samples: np.ndarray, k: int = 3, batch: int = 10000):
    """ADM's ManifoldEstimator algorithm (row x column batches of 10k, squared distances clamped at 0,
    k-th value by partition, one distance matrix shared by precision and recall), in NumPy float32:
    the CPU fallback of its fp16 TensorFlow arithmetic."""

    def dist(u, v):
        return np.maximum((u * u).sum(1)[:, None] - 2 * u @ v.T + (v * v).sum(1)[None, :], 0)

    def radii(f):
        out = np.empty(len(f), np.float32)
        for s in range(0, len(f), batch):
            d = np.concatenate([dist(f[s:s + batch], f[t:t + batch]) for t in range(0, len(f), batch)], axis=1)
            out[s:s + batch] = np.partition(d, k, axis=1)[:, k]
        return out

    r_ref, r_sam = radii(ref), radii(samples)
    ref_in = np.zeros(len(ref), bool)  # reference points inside the sample manifold (recall)
    sam_in = np.zeros(len(samples), bool)  # samples inside the reference manifold (precision)
    for s in range(0, len(ref), batch):
        for t in range(0, len(samples), batch):
            d = dist(ref[s:s + batch], samples[t:t + batch])
            ref_in[s:s + batch] |= (d <= r_sam[None, t:t + batch]).any(1)
            sam_in[t:t + batch] |= (d <= r_ref[s:s + batch, None]).any(0)
    return float(sam_in.mean()), float(ref_in.mean())


def timed(fn, repeats=1):
    best, out = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ref", type=int, default=2000, help="reference points for precision/recall (ADM: 10000)")
    p.add_argument("--samples", type=int, default=10000, help="sample points (ADM: 50000)")
    p.add_argument("--images", type=int, default=32, help="images for the features/s measurement")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--adm-evaluator", type=Path, help="a copy of ADM's evaluations/evaluator.py, to compare with")
    p.add_argument("--adm-python", default=sys.executable, help="an interpreter with TensorFlow for it")
    p.add_argument("--pr-rounds", type=int, default=0, help="with --adm-evaluator: this many more rounds of ADM's "
                   "precision/recall then ours (exact), back to back, each round's ratio reported (a shared machine's "
                   "speed drifts between the stages of one run)")
    p.add_argument("--out", type=Path)
    a = p.parse_args()
    if a.adm_evaluator and not a.adm_evaluator.is_file():
        raise SystemExit(f"--adm-evaluator {a.adm_evaluator}: no such file")
    rng = np.random.default_rng(0)
    images = (rng.random((a.images, 64, 64, 3)) * 255).astype(np.uint8)
    extract(images[:2], device=a.device)  # load the network once
    t_feat, feats = timed(lambda: extract(images, device=a.device))
    t_script = _torchscript_as_shipped(images, a.device)
    result = {"device": a.device, "threads": torch.get_num_threads(),
              "features_per_s": a.images / t_feat,
              "features_torchscript_as_shipped_per_s": a.images / t_script,  # the wheel's module, its own forward
              "features_speedup_vs_torchscript": t_script / t_feat}
    save_partial(result, a.out)  # each stage's numbers kept if a time limit stops the next
    ref, samples = realistic_features(a.ref, a.samples, rng)
    t_ours32, pr32 = timed(lambda: precision_recall(ref, samples, device=a.device))
    t_ours16, pr16 = timed(lambda: precision_recall(ref, samples, distance="fp16", device=a.device))
    pr = result["precision_recall"] = {"ref": a.ref, "samples": a.samples, "dim": 2048,
                                       "ours_fp32_s": t_ours32, "ours_fp16_s": t_ours16,
                                       "ours_fp32": pr32, "ours_fp16": pr16}
    save_partial(result, a.out)
    t_fid, fid = timed(lambda: _fid(ref, samples))
    result["fid"] = {"ours": fid, "ours_s": t_fid}
    shards = [Statistics.of(samples[i::50]) for i in range(50)]
    result["merge_50_shards_s"] = timed(lambda: _merge_all(shards), repeats=3)[0]
    save_partial(result, a.out)
    t_adm, pr_adm = timed(lambda: adm_style_pr(ref, samples))  # the slowest stage last
    pr |= {"adm_numpy_fp32_s": t_adm, "speedup_fp32_vs_adm": t_adm / t_ours32, "speedup_fp16_vs_adm": t_adm / t_ours16,
           "adm_numpy_fp32": pr_adm}
    adm = _run_adm(a, ref, samples) if a.adm_evaluator else None
    if adm:
        result["adm_evaluator"] = adm | {
            "pr_speedup_fp32": adm["pr_s"] / t_ours32, "pr_speedup_fp16": adm["pr_s"] / t_ours16,
            "pr_fp16_identical": list(pr16) == [adm["precision"], adm["recall"]],
            "pr_fp16_difference": [pr16[0] - adm["precision"], pr16[1] - adm["recall"]],
            "fid_relative_difference": abs(fid - adm["fid"]) / abs(adm["fid"]), "fid_speedup": adm["fid_s"] / t_fid}
        rounds = []
        for _ in range(a.pr_rounds):
            adm_s = _run_adm(a, ref, samples)["pr_s"]
            ours_s = timed(lambda: precision_recall(ref, samples, device=a.device))[0]
            rounds.append({"adm_pr_s": adm_s, "ours_fp32_s": ours_s, "speedup": adm_s / ours_s})
        if rounds:
            median = float(np.median([r["speedup"] for r in rounds]))
            result["adm_evaluator"] |= {"pr_rounds": rounds, "pr_speedup_fp32_median_of_rounds": median}
    write_result(result, a.out)


def _torchscript_as_shipped(images: np.ndarray, device) -> float:
    """Seconds for pool_3 through the wheel's TorchScript module called whole (unfolded batch norms,
    contiguous branches), after the same resize, in batches of the same size as extract()'s."""
    import warnings

    from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x

    from eval.inception import default_batch_size, weights_path

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        whole = torch.jit.load(str(weights_path()), map_location=device).eval()
    bs = default_batch_size(device)

    from eval.strict_fp32 import strict_fp32

    def run():  # TF32 off, as extract() runs ours (cuDNN's TF32, on by default, would flatter the shipped module)
        with torch.no_grad(), strict_fp32():
            for s in range(0, len(images), bs):
                x = torch.from_numpy(images[s:s + bs]).to(device).permute(0, 3, 1, 2).float()
                x = (interpolate_bilinear_2d_like_tensorflow1x(x, size=(299, 299), align_corners=False) - 128) / 128
                whole(x).cpu()

    run()  # warm-up, as extract() was
    return timed(run)[0]


def _fid(ref, samples) -> float:
    s1, s2 = Statistics.of(ref), Statistics.of(samples)
    return frechet_distance(s1.mu, s1.sigma, s2.mu, s2.sigma)


def _run_adm(a, ref, samples) -> dict:
    """ADM's own ManifoldEstimator and FIDStatistics on the same features (a separate interpreter: TensorFlow)."""
    with tempfile.TemporaryDirectory() as tmp:
        feats, out = Path(tmp) / "features.npz", Path(tmp) / "adm.json"
        np.savez(feats, ref=ref, samples=samples)
        runner = Path(__file__).with_name("adm_evaluator_runner.py")
        proc = subprocess.run([a.adm_python, str(runner), str(a.adm_evaluator), str(feats), str(out)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"ADM's evaluator failed ({a.adm_python} {runner}):\n{proc.stderr[-3000:]}")
        return json.loads(out.read_text())


def _merge_all(shards):
    out = shards[0]
    for s in shards[1:]:
        out = out.merge(s)
    return out


if __name__ == "__main__":
    main()
