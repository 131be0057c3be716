"""The evaluation farm on this machine: reference batches from shards, feature workers, the exact
reducer at 1-3 workers (MPI and torch.distributed), the registry and scheduler (exactly once, with
racing schedulers and a killed evaluation), Inception Score, reports."""

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import zipfile

import numpy as np
import pytest
import torch

from conftest import REPO, randomize_, run_cli
from models.config import build_model
from models.presets import get_preset
from models.snapshot import save_snapshot

SETTING = ["--name", "fast", "--steps", "ddim2", "--num", "6", "--shard-size", "4", "--batch-size", "4"]


def make_run(root, kimgs=(1, 2, 3)):
    """A run directory with snapshots of increasingly trained-looking (here: differently seeded) tiny models."""
    preset = get_preset("tiny-32")
    cfg = preset.config()
    for i, k in enumerate(kimgs):
        model = randomize_(build_model(cfg), seed=10 + i, scale=0.05)
        save_snapshot(root / "snapshots" / f"img{k * 1000:012d}", model.state_dict(), cfg,
                      meta={"task": "diffusion", "images": k * 1000, "diffusion": preset.diffusion})
    (root / "training_options.json").write_text(json.dumps({"task": "diffusion", "model": preset.model}))
    return root


def make_upsampler(path):
    """A snapshot of a (random) tiny upsampler 32 -> 64, for cascades of make_run's models."""
    preset = get_preset("tiny-upsampler-32-64")
    save_snapshot(path, randomize_(build_model(preset.config()), seed=3, scale=0.05).state_dict(), preset.config(),
                  meta={"task": "upsampler", "diffusion": preset.diffusion})
    return path


def statistics_ref(path):
    """A reference holding statistics only (no images: no precision/recall), for tests of the bookkeeping."""
    np.savez(path, mu=np.zeros(2048), sigma=np.eye(2048), mu_s=np.zeros(2023), sigma_s=np.eye(2023))
    return path


def one_registered_evaluation(tmp_path):
    """A run with one snapshot and a setting `x` registered against a statistics-only reference."""
    from eval.farm import prepare
    from eval.settings import EvalSetting

    run = make_run(tmp_path / "run", kimgs=(1,))
    snap = next((run / "snapshots").iterdir())
    ref = statistics_ref(tmp_path / "ref.npz")
    setting = EvalSetting(name="x", steps="ddim2", num=4)
    return run, snap, ref, setting, prepare(run, snap, setting, ref)


@pytest.fixture(scope="module")
def reference(digit_shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "ref.npz"
    proc = run_cli("eval", "ref", str(digit_shards / "val"), "--out", str(out), "--resolution", "32",
                   "--pr-num", "20")
    assert "statistics of 30 images" in proc.stdout
    return out


def test_reference_batch_from_shards(reference, digit_shards):
    from data_pipeline.loader import StreamLoader
    from eval.inception import extract

    ref = np.load(reference)
    meta = json.loads(str(ref["meta"]))
    assert meta["resolution"] == 32 and meta["num_images"] == 30 and meta["num_pr"] == 20
    assert ref["arr_0"].shape == (20, 32, 32, 3) and ref["arr_0"].dtype == np.uint8
    # an independent pass: every image of the split read by the loader, features of all of them at once
    batch = next(iter(StreamLoader(digit_shards / "val", 32, 30, flip=False, num_slots=1)))
    images = ((batch["image"] + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    feats = extract(images, batch_size=30, device="cpu")
    np.testing.assert_allclose(ref["mu"], feats["pool"].astype(np.float64).mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ref["sigma"], np.cov(feats["pool"].astype(np.float64), rowvar=False), rtol=1e-4,
                               atol=1e-6)
    np.testing.assert_allclose(ref["mu_s"], feats["spatial"].astype(np.float64).mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(ref["arr_0"], images[:20])  # the subset: the first images of the order
    np.testing.assert_allclose(ref["pool"], feats["pool"][:20], rtol=1e-5, atol=1e-5)  # the subset's features


def test_a_reference_with_its_own_features_is_not_featurized_again(reference, tmp_path, monkeypatch):
    """`adm eval ref` stores arr_0's pool_3 features (tagged with the network's SHA-1): loading uses them
    without running Inception. Without the tag (another network, or a file edited by hand) or without
    the features (ADM's own reference batches), they are computed from arr_0, as before."""
    import eval.metrics as metrics

    ref = dict(np.load(reference))
    meta = json.loads(str(ref["meta"]))
    calls = []
    real_extract = metrics.extract
    monkeypatch.setattr(metrics, "extract", lambda *a, **k: calls.append(1) or real_extract(*a, **k))
    read = []
    real_getitem = np.lib.npyio.NpzFile.__getitem__
    monkeypatch.setattr(np.lib.npyio.NpzFile, "__getitem__", lambda self, k: read.append(k) or real_getitem(self, k))
    loaded = metrics.load_reference(reference)
    assert calls == [] and loaded["resolution"] == 32
    assert "arr_0" not in read  # its shape comes from the .npy header: the images are not read at all
    with np.load(reference) as data:
        assert metrics.stored_shape(data, "arr_0") == ref["arr_0"].shape
        assert metrics.stored_shape(data, "pool") == ref["pool"].shape
        assert metrics.stored_shape(data, "meta") == ()
    np.testing.assert_array_equal(loaded["pool"], ref["pool"])
    np.testing.assert_array_equal(loaded["sigma"], ref["sigma"])  # the whole split's statistics, not arr_0's
    for name, changed in (("other-net", dict(meta=np.array(json.dumps({**meta, "pool_features": "0" * 40})))),
                          ("adm-format", {})):
        path = tmp_path / f"{name}.npz"
        np.savez(path, **{**{k: v for k, v in ref.items() if name != "adm-format" or k not in ("pool", "meta")},
                          **changed})
        again = metrics.load_reference(path)
        np.testing.assert_allclose(again["pool"], ref["pool"], rtol=1e-5, atol=1e-5)
    assert len(calls) == 2



def test_an_adm_reference_is_featurized_by_the_first_feature_task_not_the_metrics_job(reference, tmp_path,
                                                                                     monkeypatch):
    """ADM's reference batches carry 10k images and no features. The first feature task (a GPU job) puts
    them through Inception into the run's cache; the metrics job (CPUs only) then reads that cache and runs
    no Inception, and gets the numbers that featurizing the reference itself gives."""
    import eval.metrics as metrics
    from eval.farm import feature_task, metrics_task, prepare, sample_task
    from eval.settings import EvalSetting

    adm = tmp_path / "adm-ref.npz"
    with np.load(reference) as ref:
        np.savez(adm, **{k: ref[k] for k in ref.files if k not in ("pool", "meta")})
    run = make_run(tmp_path / "run", kimgs=(1,))
    key_dir = prepare(run, next((run / "snapshots").iterdir()), EvalSetting(name="x", steps="ddim2", num=8,
                                                                             shard_size=4), adm)
    calls, real_extract = [], metrics.extract
    monkeypatch.setattr(metrics, "extract", lambda images, *a, **k: calls.append(len(images)) or
                        real_extract(images, *a, **k))
    for i in (0, 1):
        sample_task(str(key_dir), i)
    feature_task(str(key_dir), 1)
    assert calls == [] and not list((run / "eval" / "ref-cache").glob("ref-*.npz"))  # (task 1 leaves it to task 0)
    feature_task(str(key_dir), 0)
    assert calls == [20] and len(list((run / "eval" / "ref-cache").glob("ref-*[0-9].npz"))) == 1
    got = metrics_task(str(key_dir), backend="single")["metrics"]
    assert calls == [20]  # the metrics job ran no Inception
    monkeypatch.setattr(metrics, "extract", real_extract)
    from eval.features import load_features

    want = metrics.reduce(load_features(key_dir / "features", expected=8), metrics.load_reference(adm), str(adm))
    assert got == want


def test_compare_keeps_an_adm_references_features_between_calls(reference, tmp_path, monkeypatch):
    """`adm eval compare` against ADM's reference batch (10k images, no features) put its images through
    Inception on every call; it now keeps them by the file's content in --cache-dir ($ADM_CACHE, else
    ~/.cache/adm), and the next call reads them: seen here by doctoring the kept features, which moves
    precision and recall. --no-cache keeps nothing and reads nothing."""
    adm = tmp_path / "adm-ref.npz"
    with np.load(reference) as ref:
        np.savez(adm, **{k: ref[k] for k in ref.files if k not in ("pool", "meta")})
        np.savez(tmp_path / "sample.npz", arr_0=ref["arr_0"][::-1][:12])
    cache = tmp_path / "cache"

    def compare(*extra):
        out = run_cli("eval", "compare", str(adm), str(tmp_path / "sample.npz"), *extra).stdout
        return {k: float(v) for k, v in re.findall(r"^(\w+): ([\d.]+)$", out, re.M)}

    first = compare("--cache-dir", str(cache))
    [kept] = cache.glob("ref-*[0-9].npz")
    assert compare("--cache-dir", str(cache)) == first  # read back: the same numbers
    with np.load(kept) as k:
        doctored = {name: k[name] for name in k.files}
    doctored["pool"] = doctored["pool"] + 100.0  # far from every sample: no sample falls in their radii
    np.savez(kept, **doctored)
    again = compare("--cache-dir", str(cache))
    assert again["fid"] == first["fid"] and again["precision"] == 0 != first["precision"]
    default = tmp_path / "default"
    monkeypatch.setenv("ADM_CACHE", str(default))
    assert compare("--no-cache") == first and compare("--cache-dir", str(cache), "--no-cache") == first
    assert not default.exists()
    assert compare() == first and len(list(default.glob("ref-*[0-9].npz"))) == 1  # $ADM_CACHE by default


def test_a_reference_is_hashed_once_per_version_of_the_file(reference, tmp_path, monkeypatch):
    """The feature cache is keyed by the reference's sha256; the digest is remembered per (path, size,
    mtime, inode), so the next metrics job does not hash the file again, and a rewritten file is hashed
    (and featurized) anew."""
    import hashlib

    import eval.digest as digest
    import eval.metrics as metrics

    hashed = []
    real_digest, real_extract = digest.file_digest, metrics.extract
    monkeypatch.setattr(digest, "file_digest", lambda p: hashed.append(p) or real_digest(p))
    ref = dict(np.load(reference))
    path, cache = tmp_path / "adm-format.npz", tmp_path / "cache"
    np.savez(path, arr_0=ref["arr_0"])  # ADM's format: images only, so features are cached by digest

    def sha(p):
        return hashlib.sha256(p.read_bytes()).hexdigest()[:16]

    first = metrics.load_reference(path, cache_dir=cache)
    again = metrics.load_reference(path, cache_dir=cache)
    from eval.settings import EVALUATOR_VERSION
    assert len(hashed) == 1 and (cache / f"ref-{sha(path)}.{EVALUATOR_VERSION}.npz").is_file()
    np.testing.assert_array_equal(again["pool"], first["pool"])
    os.utime(path, ns=(1, 1))  # touched: hashed again, same digest, so the cached features are used
    monkeypatch.setattr(metrics, "extract", lambda *a, **k: pytest.fail("features recomputed for the same content"))
    np.testing.assert_array_equal(metrics.load_reference(path, cache_dir=cache)["pool"], first["pool"])
    assert len(hashed) == 2
    monkeypatch.undo()
    np.savez(path, arr_0=ref["arr_0"][::-1].copy())  # rewritten with other content: new digest, new features
    changed = metrics.load_reference(path, cache_dir=cache)
    assert (cache / f"ref-{sha(path)}.{EVALUATOR_VERSION}.npz").is_file()
    assert len(list(cache.glob(f"ref-*.{EVALUATOR_VERSION}.npz"))) == 2
    monkeypatch.setattr(metrics, "EVALUATOR_VERSION", "adm-eval-next")  # a new version: featurized anew
    monkeypatch.setattr(metrics, "extract", lambda *a, **k: hashed.append("extract") or real_extract(*a, **k))
    metrics.load_reference(path, cache_dir=cache)
    assert hashed[-1] == "extract" and (cache / f"ref-{sha(path)}.adm-eval-next.npz").is_file()
    monkeypatch.undo()
    np.testing.assert_allclose(changed["pool"], first["pool"][::-1], rtol=1e-5, atol=1e-5)
    assert not list(cache.glob("*partial*"))

@pytest.fixture(scope="module")
def evaluated(reference, tmp_path_factory):
    """Three snapshots evaluated by the scheduler: one scheduler killed mid-evaluation, then two started
    at the same instant."""
    run = make_run(tmp_path_factory.mktemp("farm") / "run")
    cmd = [sys.executable, "-m", "adm", "eval", "schedule", str(run), "--ref", str(reference), "--once",
           "--cluster", "local", *SETTING]
    victim = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline, killed_key = time.time() + 120, None

    def unpublished():
        return next((c.parent.name for c in (run / "eval").glob("*/attempt-1.json")
                     if not (c.parent / "metrics.json").exists()), None)

    while killed_key is None:
        assert victim.poll() is None and time.time() < deadline, "the first scheduler never claimed an evaluation"
        if unpublished():
            victim.send_signal(signal.SIGSTOP)  # frozen, then looked at again: it cannot publish before the kill
            killed_key = unpublished()
            if killed_key is None:
                victim.send_signal(signal.SIGCONT)
        time.sleep(0.02)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    racers = [subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
              for _ in range(2)]
    outs = [r.communicate(timeout=900) for r in racers]
    for r, (out, err) in zip(racers, outs):
        assert r.returncode == 0, out + err
    return run, killed_key, outs


def test_scheduler_evaluates_each_snapshot_exactly_once(evaluated):
    run, killed_key, outs = evaluated
    keys = sorted(p.name for p in (run / "eval").iterdir() if p.name != "ref-cache")
    assert len(keys) == 3
    for key in keys:
        attempts = sorted(p.name for p in (run / "eval" / key).glob("attempt-*.json"))
        assert (run / "eval" / key / "metrics.json").is_file()
        # the killed evaluation was retried once (attempt 2); the others ran once
        assert attempts == (["attempt-1.json", "attempt-2.json"] if key == killed_key else ["attempt-1.json"])
        # published exactly once: one TensorBoard events file per evaluation
        assert len(list((run / "tensorboard").glob(f"*.eval-{key}"))) == 1
    log = "".join(o for o, _ in outs)
    assert f"{killed_key}: attempt 1 did not finish" in log
    now = [int(n) for n in re.findall(r" done \((\d+) in this pass\)", log)]
    assert len(now) == 2 and sum(now) == 3  # each evaluation run by one of the two racing schedulers
    results = json.loads(run_cli("eval", "results", str(run), "--json", str(run / "r.json")).stdout and
                         (run / "r.json").read_text())
    assert sorted(r["images"] for r in results) == [1000, 2000, 3000]
    for r in results:
        assert r["metrics"]["num_samples"] == 6 and set(r["metrics"]) >= {"fid", "sfid", "precision", "recall"}


def test_farm_result_equals_a_single_process_evaluation(evaluated, reference):
    """The farm (shards, per-shard statistics, merge) gives ADM's evaluator's numbers on the merged file."""
    run, _, _ = evaluated
    from eval.compare import compare

    for key_dir in sorted(p for p in (run / "eval").iterdir() if (p / "metrics.json").is_file()):
        got = json.loads((key_dir / "metrics.json").read_text())["metrics"]
        shards = sorted((key_dir / "samples").glob("samples-*.npz"))
        merged = key_dir.parent.parent / f"merged-{key_dir.name}.npz"
        np.savez(merged, arr_0=np.concatenate([np.load(s)["arr_0"] for s in shards]))
        want = compare(str(reference), str(merged))
        assert got["fid"] == pytest.approx(want["fid"], rel=1e-6)
        assert got["sfid"] == pytest.approx(want["sfid"], rel=1e-6)
        assert (got["precision"], got["recall"]) == (want["precision"], want["recall"])
    # the farm took the reference's covariance roots from its cache, computed once: roots of those covariances
    from eval.metrics import load_reference

    [cached] = (run / "eval" / "ref-cache").glob("*-sqrt.npz")
    roots, ref = np.load(cached), load_reference(reference)
    for k in ("sigma", "sigma_s"):
        np.testing.assert_allclose(roots[f"sqrt_{k}"] @ roots[f"sqrt_{k}"], ref[k], rtol=0,
                                   atol=1e-9 * np.abs(ref[k]).max())


def test_a_published_evaluation_keeps_one_merged_features_file(evaluated):
    """The per-shard float64 sums of outer products go once the metrics are out; what is left (all pool
    features and the merged statistics) still gives the published numbers."""
    from eval.stats import Statistics

    run, _, _ = evaluated
    for key_dir in sorted(p for p in (run / "eval").iterdir() if (p / "metrics.json").is_file()):
        assert sorted(p.name for p in (key_dir / "features").iterdir()) == ["features-merged.npz"]
        d = np.load(key_dir / "features" / "features-merged.npz")
        pool = d["pool"].astype(np.float64)
        assert pool.shape == (6, 2048) and d["labels"].shape == (6,)
        stats = Statistics.from_npz({k[5:]: d[k] for k in d.files if k.startswith("pool_")})
        np.testing.assert_allclose(stats.mu, pool.mean(0), rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(stats.sigma, np.cov(pool, rowvar=False), rtol=1e-8, atol=1e-10)
        spec = json.loads((key_dir / "setting.json").read_text())
        out = key_dir / "again.json"
        run_cli("eval", "metrics", str(key_dir / "features"), "--ref", spec["ref"], "--json", str(out))
        published = json.loads((key_dir / "metrics.json").read_text())["metrics"]
        again = json.loads(out.read_text())
        for k in ("fid", "sfid", "precision", "recall"):
            assert again[k] == pytest.approx(published[k], rel=1e-12, abs=1e-12), k


def test_a_requeued_metrics_job_reuses_the_published_numbers_and_clears_stale_temporaries(evaluated, monkeypatch):
    """A metrics job run again after publishing (a requeue, a duplicate) returns the published record without
    computing FID and precision/recall again, and finishing removes what killed tasks left (temporary sample
    and feature files, 64 MB each at scale) unless one is fresh enough to be a late duplicate's, still written."""
    import eval.farm
    import eval.metrics

    run, _, _ = evaluated
    key_dir = sorted(p for p in (run / "eval").iterdir() if (p / "metrics.json").is_file())[1]
    old = [key_dir / "samples" / "samples-00000000-00000003.npz.partial-node1-77-0a1b2c3d.npz",
           key_dir / "features" / "features-00000000-00000003.npz.partial-node1-78-0a1b2c3e.npz"]
    fresh = key_dir / "features" / "features-00000004-00000005.npz.partial-node2-79-0a1b2c3f.npz"
    for p in [*old, fresh]:
        p.write_bytes(b"\0" * 1000)
    old.append(key_dir / "tensorboard.partial-k2j4x9")  # a TensorBoard point's folder, its writer killed
    old[-1].mkdir()
    (old[-1] / "events.out.tfevents.1.node1.eval-x").write_bytes(b"\0" * 10)
    for p in old:
        os.utime(p, (time.time() - 3600,) * 2)
    published = (key_dir / "metrics.json").read_text()
    monkeypatch.setattr(eval.metrics, "reduce", lambda *a, **k: pytest.fail("computed again"))
    try:
        assert eval.farm.metrics_task(str(key_dir), backend="single") == json.loads(published)
        assert (key_dir / "metrics.json").read_text() == published
        assert not any(p.exists() for p in old) and fresh.exists()
    finally:
        fresh.unlink(missing_ok=True)


def test_a_damaged_setting_json_is_said_and_written_again(tmp_path, capsys):
    """setting.json is always written whole; emptied or garbled on disk it stopped every pass of the run with a
    bare JSON error naming no file. It is made again from the inputs that name its key, saying so."""
    from eval.farm import prepare

    run, snap, ref, setting, key_dir = one_registered_evaluation(tmp_path)
    good = json.loads((key_dir / "setting.json").read_text())
    for damage, said in ((b"", "JSONDecodeError"), (b'{"key": "a', "JSONDecodeError"), (b"[1, 2]", "not an evaluation"),
                         (b"\xff\xfe", "UnicodeDecodeError")):
        (key_dir / "setting.json").write_bytes(damage)
        assert prepare(run, snap, setting, ref) == key_dir
        assert json.loads((key_dir / "setting.json").read_text()) == good
        assert f"[eval] {key_dir / 'setting.json'}: unreadable ({said}" in capsys.readouterr().err


def test_a_pass_finishes_what_a_task_left_after_publishing(evaluated, reference):
    """A metrics task killed (or failing: an unwritable tensorboard/) after publishing metrics.json left its
    TensorBoard point unwritten and its per-shard features uncompacted, for good: the next pass, finding
    the evaluation done, writes the point (once) and compacts."""
    import eval.schedule
    from eval.settings import EvalSetting

    run, _, _ = evaluated
    key_dir = sorted(p for p in (run / "eval").iterdir() if (p / "metrics.json").is_file())[0]
    [events] = (run / "tensorboard").glob(f"*.eval-{key_dir.name}")
    events.unlink()
    merged = key_dir / "features" / "features-merged.npz"
    leftover = key_dir / "features" / "features-00000000-00000003.npz"  # as if killed while deleting shards
    leftover.write_bytes(merged.read_bytes())
    setting = EvalSetting(**{k: v for k, v in json.loads((key_dir / "setting.json").read_text())["setting"].items()})
    log = []
    counts = eval.schedule.schedule_pass(run, [setting], reference, eval.schedule.LocalBackend(), log=log.append)
    assert counts["done"] == 3 and counts["now"] == 0, (counts, log)
    assert len(list((run / "tensorboard").glob(f"*.eval-{key_dir.name}"))) == 1 and not leftover.exists()
    eval.schedule.schedule_pass(run, [setting], reference, eval.schedule.LocalBackend(), log=log.append)
    assert len(list((run / "tensorboard").glob(f"*.eval-{key_dir.name}"))) == 1  # not written twice
    # Inception Score asked for after these were evaluated: said, not silently missing
    eval.schedule.schedule_pass(run, [setting], reference, eval.schedule.LocalBackend(), log=log.append,
                                inception_weights="weights.pth")
    assert any("3 evaluation(s) finished before --inception-weights was given have no Inception Score" in line
               for line in log), log


def test_tensorboard_and_report(evaluated):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run, _, _ = evaluated
    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    fid = acc.Scalars("eval/fast/fid")
    assert sorted(e.step for e in fid) == [1000, 2000, 3000]
    run_cli("report", str(run))
    html = (run / "report.html").read_text()
    for k in (1, 2, 3):
        assert f"img{k * 1000:012d}" in html
    assert "Progressive decoding" in html and "data:image/png;base64," in html
    assert "http://" not in html and "https://" not in html  # opens offline
    md = (run / "report.md").read_text()
    assert md.count("| fast |") == 3
    from test_report_parts import report_figures

    from eval.features import sample_shards
    shown = report_figures(html)  # each evaluation's first 16 images, in seed order, pixel for pixel
    for key_dir in sorted(p for p in (run / "eval").iterdir() if p.name != "ref-cache"):
        with np.load(sample_shards(key_dir / "samples")[0]) as data:
            first, labels = data["arr_0"][:16], data["arr_1"][:16] if "arr_1" in data.files else None
        caption = next(c for c in shown if c.startswith(key_dir.name.split("--")[0]))
        assert [t for t, _, _ in shown[caption]] == [f"seed {i}" for i in range(len(first))]
        np.testing.assert_array_equal(np.stack([im for _, im, _ in shown[caption]]), first)
        assert [c for _, _, c in shown[caption]] == ([None] * 16 if labels is None else [f"class {k}" for k in labels])
    assert len(json.loads((run / "report.json").read_text())["rows"]) == 3


def test_report_escapes_every_value(tmp_path):
    from eval.report import write_report
    from eval.settings import EVALUATOR_VERSION

    run = tmp_path / "run"
    (run / "eval" / "k").mkdir(parents=True)
    (run / "eval" / "k" / "failed.json").write_text(json.dumps(
        {"key": "k", "snapshot": "s", "snapshot_name": "<script>alert(1)</script>", "images": 0,
         "setting": {"name": "x"}, "attempts": 3, "last_error": "<b>boom</b>", "evaluator": EVALUATOR_VERSION}))
    (run / "eval" / "old").mkdir(parents=True)  # an older evaluator's failure: evaluated again, not news
    (run / "eval" / "old" / "setting.json").write_text(json.dumps({"evaluator": "adm-eval-1"}))
    (run / "eval" / "old" / "failed.json").write_text(json.dumps(
        {"key": "old", "snapshot": "s", "snapshot_name": "img-old", "images": 0, "setting": {"name": "x"},
         "attempts": 3, "last_error": "stale"}))
    html = write_report(run).read_text()
    assert "img-old" not in html and "stale" not in html
    assert "<script>alert" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "&lt;b&gt;boom&lt;/b&gt;" in html
    md = (run / "report.md").read_text()  # Markdown viewers render HTML too
    assert "<script>" not in md and "<b>" not in md and "&lt;script&gt;alert(1)&lt;/script&gt;" in md


def _metrics(evaluated, launcher):
    run, _, _ = evaluated
    key_dir = sorted(p for p in (run / "eval").iterdir() if (p / "metrics.json").is_file())[0]
    spec = json.loads((key_dir / "setting.json").read_text())
    out = key_dir / f"m-{abs(hash(tuple(launcher)))}.json"
    cmd = [*(launcher or [sys.executable]), "-m", "eval", "metrics", str(key_dir / "features"), "--ref", spec["ref"],
           "--json", str(out)]
    with tempfile.TemporaryDirectory() as tmp:  # (torchrun leaves a torchelastic_* folder of its logs in TMPDIR)
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600,
                              env={**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": tmp})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(out.read_text())


def test_reducer_is_identical_at_1_2_and_3_workers(evaluated):
    mpiexec = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    one = _metrics(evaluated, [])
    assert one["workers"] == 1
    results = [_metrics(evaluated, [mpiexec, "-n", str(n), sys.executable]) for n in (2, 3)]
    results.append(_metrics(evaluated, [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]))
    assert [r["workers"] for r in results] == [2, 3, 2]
    for r in results:
        assert {k: r[k] for k in ("fid", "sfid", "precision", "recall")} == \
               {k: one[k] for k in ("fid", "sfid", "precision", "recall")}


def test_inception_score_matches_torch_fidelity_and_reads_its_weights_file(evaluated, tmp_path):
    from torch_fidelity.metric_isc import isc_features_to_metric

    from eval.inception import logits_weight
    from eval.metrics import inception_score

    rng = np.random.default_rng(5)
    logits = rng.normal(size=(300, 1008)) * 3
    # ADM's splits are consecutive runs of split_size samples in order; torch-fidelity's, N // splits
    ours = inception_score(logits, split_size=100)
    theirs = isc_features_to_metric(torch.from_numpy(logits), splits=3, shuffle=False)["inception_score_mean"]
    assert ours == pytest.approx(theirs, rel=1e-10)
    uniform = inception_score(np.zeros((10, 1008)))
    assert uniform == pytest.approx(1.0)
    # torch-fidelity's weights file format: a state dict whose fc.weight gives the unbiased logits
    w = torch.from_numpy(rng.normal(size=(1008, 2048)).astype(np.float32) * 0.01)
    torch.save({"fc.weight": w, "fc.bias": torch.zeros(1008)}, tmp_path / "weights.pth")
    np.testing.assert_array_equal(logits_weight(tmp_path / "weights.pth"), w.double().numpy())
    run, _, _ = evaluated
    key_dir = sorted(p for p in (run / "eval").iterdir() if (p / "metrics.json").is_file())[0]
    spec = json.loads((key_dir / "setting.json").read_text())
    out = run_cli("eval", "metrics", str(key_dir / "features"), "--ref", spec["ref"], "--inception-weights",
                  str(tmp_path / "weights.pth")).stdout
    pool = np.concatenate([np.load(p)["pool"] for p in sorted((key_dir / "features").glob("features-*.npz"))])
    expected = inception_score(pool.astype(np.float64) @ w.double().numpy().T)
    assert f"inception_score: {expected:.6f}" in out
    torch.save({"something": torch.zeros(3)}, tmp_path / "bad.pth")
    bad = run_cli("eval", "metrics", str(key_dir / "features"), "--ref", spec["ref"], "--inception-weights",
                  str(tmp_path / "bad.pth"), check=False)
    assert bad.returncode == 2 and "fc.weight" in bad.stderr


def test_failed_evaluations_are_retried_then_reported(reference, tmp_path):
    """A setting that cannot run fails every attempt; after --max-attempts the registry says so and the
    report shows it. (What the files' headers show, a classifier that is a diffusion model say, is
    refused before any attempt: test_bad_input_is_named. Here the classifier's weights file is damaged
    inside, at its full size, which only its sha256, checked when sampling loads it, reveals.)"""
    run = make_run(tmp_path / "run", kimgs=(1,))
    cfg = get_preset("tiny-classifier-32").config()
    clf = save_snapshot(tmp_path / "clf", build_model(cfg).state_dict(), cfg, meta={"task": "classifier"})
    good = (clf / "model.safetensors").read_bytes()
    weights = bytearray(good)
    weights[8:12] = b"\xff\xff\xff\xff"  # the JSON header's first bytes: no longer UTF-8
    (clf / "model.safetensors").write_bytes(bytes(weights))
    common = ["--ref", str(reference), "--cluster", "local", *SETTING, "--scale", "1", "--classifier", str(clf),
              "--max-attempts", "2"]
    snap = str(next((run / "snapshots").iterdir()))
    first = run_cli("eval", "run", snap, *common, check=False)
    assert first.returncode == 1 and "fast: attempt 1 of 2 failed: " in first.stdout, first.stdout
    for _ in range(2):
        run_cli("eval", "schedule", str(run), "--once", *common, check=False)
    last = run_cli("eval", "run", snap, *common, check=False)
    assert last.returncode == 1 and "fast: FAILED after 2 attempt(s): " in last.stdout and "submitted" not in last.stdout
    key_dir = next(p for p in (run / "eval").iterdir() if p.name != "ref-cache")
    assert sorted(p.name for p in key_dir.glob("attempt-*.json")) == ["attempt-1.json", "attempt-2.json"]
    failed = json.loads((key_dir / "failed.json").read_text())
    assert failed["attempts"] == 2 and "model.safetensors: sha256 differs from the manifest (corrupt)" in failed["last_error"]
    assert "FAILED" in run_cli("eval", "results", str(run)).stdout
    assert "sha256 differs from the manifest (corrupt)" in (run / "report.html").read_text()
    assert "--retry-failed tries again" in last.stdout
    # the cause fixed, --retry-failed gives it --max-attempts more (the failure is kept, renamed)
    (clf / "model.safetensors").write_bytes(good)
    fixed = run_cli("eval", "run", snap, *common, "--retry-failed")
    assert "fast: num_samples 6" in fixed.stdout and (key_dir / "metrics.json").is_file()
    assert (key_dir / "failed-after-2.json").is_file() and not (key_dir / "failed.json").exists()
    assert "FAILED" not in run_cli("eval", "results", str(run)).stdout


def test_the_same_setting_under_another_name_is_the_same_evaluation(tmp_path):
    from eval.farm import prepare
    from eval.settings import EvalSetting

    run = make_run(tmp_path / "run", kimgs=(1,))
    snap = next((run / "snapshots").iterdir())
    ref = tmp_path / "ref.npz"
    np.savez(ref, mu=np.zeros(2048), sigma=np.eye(2048))
    first = prepare(run, snap, EvalSetting(name="ddim5", steps="ddim5", num=4), ref)
    assert prepare(run, snap, EvalSetting(name="tiny", steps="ddim5", num=4), ref) == first
    assert prepare(run, snap, EvalSetting(name="tiny", steps="ddim6", num=4), ref) != first
    # the batch size changes no image (not in the key): a lower one, after an out-of-memory failure, is the
    # one the next attempt's tasks read (the first registration's stayed)
    from eval.farm import load_spec

    assert prepare(run, snap, EvalSetting(name="ddim5", steps="ddim5", num=4, batch_size=2), ref) == first
    assert load_spec(first)[1].batch_size == 2


def test_a_refused_submission_is_not_an_attempt(tmp_path, monkeypatch, capsys):
    """sbatch refusing the plan (a flag this cluster does not take, a submit limit): nothing runs, so the
    claim is withdrawn and the pass goes on (the next one submits it again), instead of using up an attempt
    per pass; `adm eval run` says so and exits 1. A scheduled pass does not hand --retry-failed on."""
    import eval.cli
    from eval.farm import prepare
    from eval.schedule import NotSubmitted, schedule_pass
    from eval.settings import EvalSetting

    run = make_run(tmp_path / "run", kimgs=(1, 2))
    ref = tmp_path / "ref.npz"
    statistics_ref(ref)
    setting = EvalSetting(name="x", steps="ddim2", num=4)
    submitted = []

    class Refusing:
        name = "slurm"

        def start(self, key_dir, attempt):
            raise NotSubmitted("Slurm refused the sampling array: Invalid generic resource (gres) specification")

        def schedule_passes(self, run_dir):
            return []

        def submit_schedule(self, argv, every, run_dir, chain=None):
            submitted.append(argv)
            return "42"

    logged = []
    for _ in range(4):
        counts = schedule_pass(run, [setting], ref, Refusing(), 3, log=logged.append)
        assert counts["refused"] == 2 and counts["failed"] == 0  # both snapshots tried, every pass
    assert "Invalid generic resource (gres) specification; not counted as an attempt" in logged[-1]
    key_dirs = [prepare(run, snap, setting, ref) for snap in sorted((run / "snapshots").iterdir())]
    assert not [p for d in key_dirs for p in d.glob("attempt-*.json")] and not (key_dirs[0] / "failed.json").exists()
    monkeypatch.setattr(eval.cli, "backend_for", lambda a: Refusing())
    snap = str(sorted((run / "snapshots").iterdir())[0])
    common = ["--ref", str(ref), "--name", "x", "--steps", "ddim2", "--num", "4"]
    assert eval.cli.main(["run", snap, *common]) == 1
    assert "x: not submitted: Slurm refused it (above); no attempt counted" in capsys.readouterr().out
    assert eval.cli.main(["schedule", str(run), *common, "--retry-failed", "--every", "1h"]) == 0
    assert submitted and "--retry-failed" not in submitted[0] and "--every" in submitted[0]


def test_a_scheduled_pass_that_fails_still_submits_the_next(tmp_path, monkeypatch, capsys):
    """The recurring schedule is a chain of Slurm jobs: a pass that raises (a report it cannot draw, a file
    it cannot read) must still submit the next one, or evaluation stops for good without a word. Curve
    labels are shown as written: a setting or reference name holding `$` is not parsed as math. The next
    pass asks for Slurm by name: `auto` would run it here, in the scheduler's small job, if sinfo blinked."""
    import eval.cli
    import eval.report
    import eval.schedule

    run = make_run(tmp_path / "run", kimgs=(1,))
    ref = tmp_path / "ref$\\frac{a$.npz"
    statistics_ref(ref)
    submitted = []

    class Slurm:
        name = "slurm"

        def schedule_passes(self, run_dir):
            return []

        def submit_schedule(self, argv, every, run_dir, chain=None):
            submitted.append(argv)
            return "43"

    monkeypatch.setattr(eval.cli, "backend_for", lambda a: Slurm())
    monkeypatch.setattr(eval.schedule, "schedule_pass", lambda *a, **k: (_ for _ in ()).throw(
        OSError(5, "Input/output error", "registry")))
    common = [str(run), "--ref", str(ref), "--name", "x", "--steps", "ddim2", "--num", "4", "--every", "1h"]
    assert eval.cli.main(["schedule", *common, "--cluster=auto"]) == 0 and len(submitted) == 1
    assert submitted[0][-2:] == ["--cluster", "slurm"] and "--cluster=auto" not in submitted[0]  # pinned
    assert "this pass failed (OSError: [Errno 5] Input/output error: 'registry'); the next pass tries again" in \
        capsys.readouterr().err
    with pytest.raises(OSError):  # --once (cron): the failure is the command's
        eval.cli.main(["schedule", *common, "--once"])
    rows = [{"metrics": {"fid": 30.0 - i}, "snapshot_name": f"img{i}", "images": 1000 * i,
             "label": f"x ({ref.name})"} for i in (1, 2)]
    assert eval.report._metric_curves(rows, {"ADM $x$ \\bad{": {"fid": 2.0}})["png"].startswith("iVBOR")  # a PNG


def test_a_claim_from_another_host_is_alive_while_its_heartbeat_is(tmp_path, monkeypatch):
    """A claim without Slurm jobs from another host (a scheduler pass or a local evaluation there), whose pid
    cannot be checked here: running while its file's mtime (the heartbeat) is under STALE_S old, retried once
    it is older (its process died before it recorded anything); the new attempt's claim beats while the
    backend starts it. On this host the pid decides, whatever the mtime."""
    import socket
    import threading

    from eval import registry
    from eval.farm import prepare
    from eval.schedule import LocalBackend, schedule_pass
    from eval.settings import EvalSetting

    monkeypatch.setattr(registry, "HEARTBEAT_S", 0.05)
    run = make_run(tmp_path / "run", kimgs=(1,))
    ref = tmp_path / "ref.npz"
    statistics_ref(ref)
    setting = EvalSetting(name="x", steps="ddim2", num=4)
    key_dir = prepare(run, next((run / "snapshots").iterdir()), setting, ref)
    claim = key_dir / "attempt-1.json"
    # claimed an hour ago on another host: only the file's mtime tells whether it still beats
    registry.update_claim(key_dir, 1, {"host": "not-" + socket.gethostname(), "pid": os.getpid(),
                                       "time": time.time() - 3600})
    beats = []

    class Starting(LocalBackend):  # LocalBackend's liveness, without running an evaluation
        def start(self, key_dir, attempt):
            new = key_dir / f"attempt-{attempt}.json"
            os.utime(new, (time.time() - 3600,) * 2)
            deadline = time.time() + 10
            while time.time() < deadline and new.stat().st_mtime < time.time() - 60:
                time.sleep(0.01)
            beats.append(time.time() - new.stat().st_mtime)
            return {"cluster": "test", "jobs": [1], "state": "submitted"}

    logged = []
    counts = schedule_pass(run, [setting], ref, Starting(), 3, log=logged.append)
    assert counts["running"] == 1 and counts["started"] == 0 and not beats
    assert registry.local_alive(registry.read_claim(key_dir, 1))
    stale = time.time() - registry.STALE_S - 60
    os.utime(claim, (stale, stale))
    assert not registry.local_alive(registry.read_claim(key_dir, 1))
    counts = schedule_pass(run, [setting], ref, Starting(), 3, log=logged.append)
    assert counts["started"] == 1 and counts["running"] == 0, counts
    assert f"[eval] {key_dir.name}: attempt 1 did not finish (owner gone); retrying" in logged
    assert registry.attempts(key_dir) == [1, 2] and registry.read_claim(key_dir, 2)["jobs"] == [1]
    assert len(beats) == 1 and beats[0] < 60  # attempt 2's claim was touched while its backend started it
    assert not [t for t in threading.enumerate() if t.name.startswith("heartbeat")]  # stopped after
    assert "_mtime" not in json.loads((key_dir / "attempt-2.json").read_text())
    # this host's claims: the pid decides, not the mtime
    registry.update_claim(key_dir, 1, {**registry.local_owner(), "pid": os.getpid()})
    os.utime(claim, (stale, stale))
    assert registry.local_alive(registry.read_claim(key_dir, 1))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    registry.update_claim(key_dir, 1, {**registry.local_owner(), "pid": int(dead.stdout)})
    assert not registry.local_alive(registry.read_claim(key_dir, 1))
    # a pid reused by a process started after the claim (here: this one, claimed "an hour ago") is not it
    registry.update_claim(key_dir, 1, {**registry.local_owner(), "pid": os.getpid(), "time": time.time() - 3600})
    assert not registry.local_alive(registry.read_claim(key_dir, 1))


def test_a_held_claim_beats_until_it_is_let_go(tmp_path, monkeypatch):
    """registry.heartbeat touches the claim every HEARTBEAT_S while held, and no more once left."""
    import socket

    from eval import registry

    monkeypatch.setattr(registry, "HEARTBEAT_S", 0.05)
    assert registry.try_claim(tmp_path, 1)
    claim = tmp_path / "attempt-1.json"
    registry.update_claim(tmp_path, 1, {"host": "not-" + socket.gethostname(), "pid": 1, "time": time.time()})
    stale = time.time() - registry.STALE_S - 60
    os.utime(claim, (stale, stale))
    assert not registry.local_alive(registry.read_claim(tmp_path, 1))
    seen = []
    with registry.heartbeat(tmp_path, 1):
        deadline = time.time() + 10
        while time.time() < deadline and len(seen) < 3:  # three beats, each moving the mtime forward
            mtime = claim.stat().st_mtime
            if mtime > (seen[-1] if seen else stale):
                seen.append(mtime)
            time.sleep(0.01)
        assert len(seen) == 3 and seen[0] > time.time() - 60, seen
        assert registry.local_alive(registry.read_claim(tmp_path, 1))
    os.utime(claim, (stale, stale))
    time.sleep(0.5)  # ten beats' time
    assert claim.stat().st_mtime == stale and not registry.local_alive(registry.read_claim(tmp_path, 1))


def test_cascade_keys_carry_the_sampler_revision(tmp_path):
    """Cascades sample differently since the upsampler reads uint8 base pixels: their keys moved (computed
    here the old way), other settings' keys did not."""
    import hashlib
    from dataclasses import asdict

    from eval.settings import EVALUATOR_VERSION, EvalSetting, _digest, eval_key

    run = make_run(tmp_path / "run", kimgs=(1,))
    snap = next((run / "snapshots").iterdir())
    ref = tmp_path / "ref.npz"
    np.savez(ref, mu=np.zeros(2))

    def old_key(setting):
        later = ("every_kimg", "keep_samples")  # fields that came later, never part of a key
        ident = {k: v for k, v in asdict(setting).items()
                 if k not in ("name", "shard_size", "batch_size", "precision", *later)}
        ident.update(classifier=_digest(setting.classifier), upsampler=_digest(setting.upsampler),
                     snapshot=_digest(str(snap)), ref=_digest(str(ref)), evaluator=EVALUATOR_VERSION)
        return f"{snap.name}--{setting.name}--{hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:10]}"

    plain, cascade = EvalSetting(name="p", num=4), EvalSetting(name="c", num=4, upsampler=str(snap))
    assert eval_key(snap, plain, ref) == old_key(plain)
    assert eval_key(snap, cascade, ref) != old_key(cascade)


def test_bad_input_is_named(reference, digit_shards, tmp_path):
    run = make_run(tmp_path / "run", kimgs=(1,))
    snap = str(next((run / "snapshots").iterdir()))
    (tmp_path / "empty").mkdir()
    cases = [
        (["eval", "ref", str(digit_shards / "val"), "--out", str(tmp_path / "r.npz"), "--resolution", "64"],
         "(center-crop:32), smaller than --resolution=64"),
        (["eval", "ref", str(digit_shards / "val"), "--out", str(tmp_path / "r.npz"), "--resolution", "32",
          "--pr-num", "-1"], "argument --pr-num: must be at least 4, got -1"),
        (["report", str(tmp_path / "empty")], "not a run directory (no training_options.json, snapshots/ or eval/"),
        (["eval", "results", str(tmp_path / "empty")], "not a run directory (no eval/, snapshots/ or training_options"),
        (["report", str(run), "--out", str(tmp_path / "settings.yaml")], "settings.yaml: a file; expected a directory"),
        (["eval", "run", snap, "--ref", str(tmp_path / "nope.npz")], "nope.npz: no such file"),
        (["eval", "run", snap, "--ref", str(reference), "--num", "1"], "num must be >= 2"),
        (["eval", "run", snap, "--ref", str(reference), "--seed-start", "-5"], "seed_start must be 0 or more, got -5"),
        (["eval", "ref", str(digit_shards / "val"), "--out", str(tmp_path / "r.npz"), "--resolution", "32",
          "--limit", "3"], "3 image(s) for precision/recall (of 30, --limit 3); k=3 needs more than 3"),
        (["eval", "run", snap, "--ref", str(reference), "--scale", "2"], "needs a classifier"),
        (["eval", "schedule", str(tmp_path), "--ref", str(reference)], "no snapshots/"),
        (["eval", "schedule", str(run), "--ref", str(reference), "--every", "soon"], "--every 'soon'"),
        (["eval", "run", snap, "--ref", str(reference), "--upsampler-steps", "ddim5"],
         "upsampler_steps 'ddim5' needs an upsampler snapshot"),
        (["eval", "features", str(tmp_path / "nope"), "--out", str(tmp_path / "f")],
         "nope: no samples-*.npz shards there"),
        # --out problems found before the features are computed, not after
        (["eval", "ref", str(digit_shards / "val"), "--out", str(tmp_path / "empty"), "--resolution", "32"],
         f"--out {tmp_path / 'empty'}: a directory; give a file name"),
        (["eval", "ref", str(digit_shards / "val"), "--out", str(reference / "x.npz"), "--resolution", "32"],
         f"{reference} is a file, not a folder"),
        (["eval", "ref", str(digit_shards / "val"), "--out", str(reference), "--resolution", "32"],
         f"--out {reference} exists; pass --overwrite to replace it"),
    ]
    np.savez(tmp_path / "float.npz", arr_0=np.zeros((4, 8, 8, 3), np.float32))
    np.savez(tmp_path / "nokeys.npz", x=np.zeros(3))
    np.savez(tmp_path / "img64.npz", arr_0=np.zeros((4, 64, 64, 3), np.uint8))
    (tmp_path / "settings.yaml").write_text("- name: a\n  stepz: ddim2\n")
    cases += [
        (["eval", "compare", str(reference), str(tmp_path / "float.npz")], "float.npz: arr_0 must be uint8"),
        (["eval", "compare", str(reference), str(tmp_path / "nokeys.npz")], "nokeys.npz: expected arr_0"),
        (["eval", "compare", str(reference), str(tmp_path / "img64.npz")], "compare at the same resolution"),
        (["eval", "run", snap, "--ref", str(reference), "--settings", str(tmp_path / "settings.yaml")],
         "unknown key(s) ['stepz']"),
        # refused before anything is claimed or sampled (the run's eval/ directory stays empty)
        (["eval", "run", snap, "--ref", str(reference), "--steps", "ddim0"],
         "setting 'ddim0': steps 'ddim0' does not fit the snapshot's 1000-step diffusion"),
        (["eval", "run", snap, "--ref", str(reference), "--weights", "bogus"], "has no weights 'bogus'; it has ema"),
        (["eval", "run", snap, "--ref", str(reference), "--upsampler", snap], "a unet snapshot, expected an upsampler"),
        (["eval", "run", snap, "--ref", str(reference), "--num", "3"], "precision/recall against"),
        (["eval", "run", snap, "--ref", str(tmp_path / "img64.npz")],
         "a reference of 64x64 images, but setting 'ddim25' samples 32x32"),
        (["eval", "run", snap, "--ref", str(reference), "--settings", str(tmp_path / "typed.yaml")],
         "setting 'a': num must be an integer, got 'many'"),
        (["eval", "run", snap, "--ref", str(reference), "--settings", str(tmp_path / "broken.yaml")],
         "broken.yaml: not a readable YAML settings file"),
        (["eval", "schedule", str(run), "--ref", str(reference), "--every", "0m"], "between 1m and 365d"),
        (["eval", "results", str(tmp_path / "nope")], "nope: no such run directory"),
        (["eval", "results", str(run), "--json", str(tmp_path / "settings.yaml" / "r.json")],
         "settings.yaml is a file, not a directory"),
    ]
    (tmp_path / "typed.yaml").write_text("- name: a\n  num: many\n")
    (tmp_path / "broken.yaml").write_text("- name: [a\n")
    for args, message in cases:
        proc = run_cli(*args, check=False)
        assert proc.returncode == 2 and message in proc.stderr, (args, proc.stderr)
    assert not (tmp_path / "r.npz").exists() and not list((tmp_path / "empty").iterdir())
    assert not (run / "eval").exists()

def test_compare_refuses_bad_files_before_featurizing_anything(reference, tmp_path, monkeypatch, capsys):
    """Every mistake that the files' headers show is refused, naming the file and key, before Inception
    runs on either file (the reference is featurized first, and a real one takes minutes to hours)."""
    import eval.metrics as metrics
    from adm.cli import main as adm

    monkeypatch.setattr(metrics, "extract", lambda *a, **k: pytest.fail("featurized before checking the files"))
    rng = np.random.default_rng(0)

    def images(n, h=32, w=32):
        return rng.integers(0, 256, (n, h, w, 3), dtype=np.uint8)

    t = tmp_path
    np.savez(t / "a.npz", arr_0=images(20))  # ADM's format, featurized when loaded
    with open(t / "npy.npz", "wb") as f:
        np.save(f, images(4))
    (t / "text.npz").write_text("mu, sigma\n")
    np.savez(t / "one.npz", arr_0=images(1))
    np.savez(t / "two.npz", arr_0=images(2))
    np.savez(t / "rect.npz", arr_0=images(20, 32, 16))
    np.savez(t / "mu100.npz", mu=np.zeros(100), sigma=np.eye(2048))
    np.savez(t / "stats100.npz", mu=np.zeros(100), sigma=np.eye(100))
    np.savez(t / "onlymu.npz", mu=np.zeros(2048))
    np.savez(t / "meta.npz", arr_0=images(4), meta=np.array("{not json"))
    np.savez(t / "objects.npz", arr_0=np.array([1, "a"], dtype=object))
    cases = [
        ("npy.npz", "a single .npy array, not an npz archive"),
        ("text.npz", "not an npz file (not a zip archive)"),
        ("one.npz", "arr_0 holds 1 image(s); a covariance needs at least 2"),
        ("two.npz", "arr_0 holds 2 images; precision/recall (k=3) needs more than 3 in each file"),
        ("rect.npz", "(compare at the same resolution)"),
        ("mu100.npz", "mu is (100,) and sigma is (2048, 2048); expected mu (d,) and sigma (d, d)"),
        ("stats100.npz", "dimensions (ADM's statistics: mu 2048, mu_s 2023)"),
        ("onlymu.npz", "mu and sigma come together; it has only mu"),
        ("meta.npz", "meta is not JSON"),
        ("objects.npz", "arr_0 holds Python objects"),
    ]
    for name, message in cases:
        for pair in ((t / "a.npz", t / name), (t / name, t / "a.npz")):
            assert adm(["eval", "compare", *map(str, pair)]) == 2
            err = capsys.readouterr().err
            assert message in err and "Traceback" not in err, (name, err)
            assert str(t / name) in err
    raw = bytearray((t / "a.npz").read_bytes())
    raw[5000:5100] = bytes(b ^ 0xFF for b in raw[5000:5100])  # inside arr_0's data: found when it is read
    (t / "crc.npz").write_bytes(bytes(raw))
    assert adm(["eval", "compare", str(t / "crc.npz"), str(reference)]) == 2
    assert f"{t / 'crc.npz'}: damaged npz (BadZipFile: Bad CRC-32" in capsys.readouterr().err
    assert adm(["eval", "compare", str(reference), str(t / "a.npz"), "--json", str(t)]) == 2
    assert "a directory; give a file name" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        adm(["eval", "compare", str(reference), str(t / "a.npz"), "--batch-size", "-4"])
    assert "argument --batch-size: must be at least 1, got -4" in capsys.readouterr().err


def test_stored_statistics_must_be_finite_covariances(tmp_path):
    """Statistics files are checked once read (cheap next to featurizing): NaN or a matrix that is not a
    covariance would give FID nan or 0 without a word."""
    from eval.metrics import load_reference

    good = np.cov(np.random.default_rng(0).standard_normal((50, 8)), rowvar=False)
    for name, mu, sigma, message in [("nan", np.full(8, np.nan), good, "mu has non-finite values"),
                                     ("neg", np.zeros(8), -np.eye(8), "sigma is not a covariance matrix"),
                                     ("asym", np.zeros(8), good + np.triu(np.ones((8, 8)), 1), "sigma is not a covariance")]:
        np.savez(tmp_path / f"{name}.npz", mu=mu, sigma=sigma)
        with pytest.raises(ValueError, match=f"{name}.npz: {message}"):
            load_reference(tmp_path / f"{name}.npz")
    np.savez(tmp_path / "ok.npz", mu=np.zeros(8), sigma=good)
    np.testing.assert_array_equal(load_reference(tmp_path / "ok.npz")["sigma"], good)
    for name, mu, sigma, message in [("complex", np.zeros(8, complex), good, "mu holds complex128; expected real"),
                                     ("text", np.zeros(8), good.astype(str), "sigma holds <U"),
                                     ("flag", np.zeros(8, bool), good, "mu holds bool; expected real numbers")]:
        np.savez(tmp_path / f"{name}.npz", mu=mu, sigma=sigma)
        with pytest.raises(ValueError, match=f"{name}.npz: {message}"):
            load_reference(tmp_path / f"{name}.npz")


def test_images_are_read_from_the_archive_a_batch_at_a_time(tmp_path):
    """arr_0 is streamed from the npz (stored or compressed) in the order Inception takes it, never read
    whole: the batches equal the array, and damage is found by a read-through before the first batch."""
    from eval.npzfile import StreamedArray, images_of

    x = np.random.default_rng(0).integers(0, 256, (37, 6, 5, 3), dtype=np.uint8)
    for save in (np.savez, np.savez_compressed):
        save(tmp_path / "a.npz", arr_0=x)
        with np.load(tmp_path / "a.npz") as data:
            a = images_of(data)
            assert isinstance(a, StreamedArray) and a.shape == x.shape and a.dtype == np.uint8 and len(a) == 37
            batches = [a[s:s + 8] for s in range(0, len(a), 8)]
            assert [len(b) for b in batches] == [8, 8, 8, 8, 5] and all(b.flags.writeable for b in batches)
            np.testing.assert_array_equal(np.concatenate(batches), x)
            np.testing.assert_array_equal(a[2:4], x[2:4])  # out of order: read again from the start
            np.testing.assert_array_equal(a[30:33], x[30:33])  # a jump forward (a resumed sampling's base rows)
    import tracemalloc

    big = np.random.default_rng(1).integers(0, 256, (4000, 32, 32, 3), dtype=np.uint8)  # 12 MiB
    np.savez(tmp_path / "big.npz", arr_0=big)
    with np.load(tmp_path / "big.npz") as data:
        a = StreamedArray(data, "arr_0")
        tracemalloc.start()
        got = a[3990:3992]
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        np.testing.assert_array_equal(got, big[3990:3992])
        assert peak < 4 * 2**20, peak  # the 3,990 rows skipped (12 MiB) are not held
    np.savez(tmp_path / "a.npz", arr_0=x)
    raw = bytearray((tmp_path / "a.npz").read_bytes())
    raw[3000] ^= 0xFF  # in the last rows' bytes
    (tmp_path / "bad.npz").write_bytes(bytes(raw))
    with np.load(tmp_path / "bad.npz") as data, pytest.raises(zipfile.BadZipFile, match="Bad CRC-32"):
        images_of(data)


def test_bad_stored_statistics_are_refused_before_any_image_is_featurized(tmp_path, monkeypatch):
    """`adm eval compare REF SAMPLES`: a NaN in the sample file's sigma (or the reference's) is found before
    the reference's images go through Inception (hours for ADM's 10k + 50k), not after."""
    import eval.metrics
    from eval.compare import compare

    monkeypatch.setattr(eval.metrics, "extract", lambda *a, **k: pytest.fail("featurized before the check"))
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (6, 16, 16, 3), dtype=np.uint8)
    good = np.cov(rng.standard_normal((50, 2048)), rowvar=False)
    bad = good.copy()
    bad[3, 5] = np.nan
    np.savez(tmp_path / "ref.npz", arr_0=images, mu=np.zeros(2048), sigma=good)
    np.savez(tmp_path / "samples.npz", arr_0=images, mu=np.zeros(2048), sigma=bad)
    np.savez(tmp_path / "ref-bad.npz", arr_0=images, mu=np.zeros(2048), sigma=bad)
    with pytest.raises(ValueError, match="samples.npz: sigma has non-finite values"):
        compare(str(tmp_path / "ref.npz"), str(tmp_path / "samples.npz"))
    with pytest.raises(ValueError, match="ref-bad.npz: sigma has non-finite values"):
        compare(str(tmp_path / "ref-bad.npz"), str(tmp_path / "ref.npz"))
    # damage inside the second file's images: found by a read-through before the first file's Inception pass
    np.savez(tmp_path / "plain.npz", arr_0=rng.integers(0, 256, (40, 16, 16, 3), dtype=np.uint8))
    raw = bytearray((tmp_path / "plain.npz").read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    (tmp_path / "dmg.npz").write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=r"dmg.npz: damaged npz \(BadZipFile: Bad CRC-32"):
        compare(str(tmp_path / "plain.npz"), str(tmp_path / "dmg.npz"))


def test_an_evaluation_refuses_a_reference_whose_statistics_or_size_would_fail_its_metrics(tmp_path):
    """`adm eval run|schedule` check the reference before claiming or sampling anything: statistics that are
    not a covariance, or too few images for precision/recall, would otherwise fail the metrics task after
    every shard was sampled and featurized (GPU-hours at 50k), using up an attempt."""
    from eval.preflight import check
    from eval.settings import EvalSetting

    preset = get_preset("tiny-32")
    cfg = preset.config()
    snap = save_snapshot(tmp_path / "run" / "snapshots" / "img000000001000", build_model(cfg).state_dict(), cfg,
                         meta={"task": "diffusion", "diffusion": preset.diffusion, "images": 1000})
    settings = [EvalSetting(name="fast", steps="ddim2", num=6, shard_size=4, batch_size=4)]
    images = np.random.default_rng(0).integers(0, 256, (20, 32, 32, 3), dtype=np.uint8)
    sigma = np.eye(2048)
    sigma[0, 1] = 5.0  # not symmetric: no covariance
    np.savez(tmp_path / "asym.npz", arr_0=images, mu=np.zeros(2048), sigma=sigma)
    with pytest.raises(ValueError, match="asym.npz: sigma is not a covariance matrix"):
        check(snap, settings, tmp_path / "asym.npz")
    np.savez(tmp_path / "three.npz", arr_0=images[:3], mu=np.zeros(2048), sigma=np.eye(2048))
    with pytest.raises(ValueError, match=r"three.npz: arr_0 holds 3 images; precision/recall \(k=3\) needs more"):
        check(snap, settings, tmp_path / "three.npz")
    np.savez(tmp_path / "ok.npz", arr_0=images, mu=np.zeros(2048), sigma=np.eye(2048))
    check(snap, settings, tmp_path / "ok.npz")

def test_shipped_settings_files_load():
    from eval.settings import load_settings

    for path in sorted((REPO / "configs" / "eval").glob("*.yaml")):
        settings = load_settings(path)
        assert settings and all(s.num >= 2 for s in settings), path


def test_cluster_slurm_without_a_slurm_is_refused(monkeypatch):
    """--cluster slurm where no Slurm answers: one clear error before any claim (each failed sbatch used to
    cost an attempt); auto falls back to this machine."""
    import argparse
    import shutil

    from eval.cli import backend_for

    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(ValueError, match="--cluster slurm: no Slurm answers here"):
        backend_for(argparse.Namespace(cluster="slurm"))
    assert backend_for(argparse.Namespace(cluster="auto")).name == "local"


def test_an_evaluation_is_keyed_by_the_reference_content(tmp_path):
    """A copied or touched reference is the same reference (its sha256, remembered per file version): the
    evaluation keeps its key; another content gets another; a key named the older way (the reference
    by name, size and mtime) keeps its directory."""
    import shutil

    from eval.farm import prepare
    from eval.settings import EvalSetting, eval_key

    run = make_run(tmp_path / "run", kimgs=(1,))
    snap = run / "snapshots" / "img000000001000"
    ref = tmp_path / "ref.npz"
    np.savez(ref, mu=np.zeros(4))
    setting = EvalSetting(name="fast", steps="ddim2", num=6)
    first = prepare(run, snap, setting, ref)
    copy = tmp_path / "elsewhere" / "copy.npz"
    copy.parent.mkdir()
    shutil.copy(ref, copy)
    os.utime(ref, (time.time() + 100, time.time() + 100))
    assert prepare(run, snap, setting, copy) == first == prepare(run, snap, setting, ref)
    np.savez(copy, mu=np.ones(4))
    assert prepare(run, snap, setting, copy) != first
    older = run / "eval" / eval_key(snap, setting, ref)  # as keys were named before
    older.mkdir()
    (older / "setting.json").write_text("{}")
    shutil.rmtree(first)
    assert prepare(run, snap, setting, ref) == older


def test_results_are_current_distinct_and_labelled(tmp_path):
    """`adm eval results` and the report list this evaluator version's results only, one per (snapshot,
    setting, reference), labelled apart when one setting name met two references or two samplers, and not
    when two evaluations differ only in how the work was cut (shard and batch sizes: no number changes)."""
    from eval.report import build
    from eval.settings import EVALUATOR_VERSION, EvalSetting
    from dataclasses import asdict

    run = tmp_path / "run"
    fast, slower = asdict(EvalSetting(name="fast", steps="ddim2", num=6)), asdict(EvalSetting(name="fast", num=6))

    def record(key, setting, ref, fid, evaluator=EVALUATOR_VERSION, age=0.0):
        d = run / "eval" / key
        d.mkdir(parents=True)
        (d / "metrics.json").write_text(json.dumps({
            "key": key, "snapshot": "s", "snapshot_name": "img000000001000", "images": 1000, "setting": setting,
            "ref": f"/refs/{ref}", "evaluator": evaluator, "metrics": {"fid": fid, "num_samples": 6}}))
        os.utime(d / "metrics.json", (time.time() - age, time.time() - age))

    record("a-new", fast, "val.npz", 10.0)
    record("a-old", fast, "val.npz", 99.0, age=60)  # the same evaluation under an older key: the newer counts
    record("b", fast, "other.npz", 20.0)
    record("c", slower, "val.npz", 30.0)
    record("d", fast, "val.npz", 40.0, evaluator="adm-eval-1")  # evaluated again by this version, not mixed
    record("e", asdict(EvalSetting(name="cascade", num=6)), "val32.npz", 50.0)  # its own reference: no suffix
    cut = asdict(EvalSetting(name="cascade", num=6, shard_size=2, batch_size=3,  # the work cut otherwise and
                             keep_samples="first"))  # other samples kept:
    record("f", cut, "val32.npz", 51.0)  # at another snapshot: no number changes, so no series of its own
    (run / "eval" / "f" / "metrics.json").write_text((run / "eval" / "f" / "metrics.json").read_text().replace(
        '"img000000001000"', '"img000000002000"').replace('"images": 1000', '"images": 2000'))
    rows = build(run)["rows"]
    labels = {(r["label"], r["images"]): r["metrics"]["fid"] for r in rows}

    def h(setting):
        kept = {k: v for k, v in setting.items() if k not in ("shard_size", "batch_size", "keep_samples")}
        return __import__("hashlib").sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()[:6]

    assert labels == {(f"fast vs val.npz [{h(fast)}]", 1000): 10.0, ("fast vs other.npz", 1000): 20.0,
                      (f"fast vs val.npz [{h(slower)}]", 1000): 30.0, ("cascade", 1000): 50.0,
                      ("cascade", 2000): 51.0}
    out = run_cli("eval", "results", str(run)).stdout
    assert "fast vs other.npz" in out and "99.0000" not in out and "40.0000" not in out and out.count("\n") == 6


def test_posthoc_snapshots_are_series_of_their_own():
    """A post-hoc EMA (`adm posthoc`) sits at its training snapshot's image count: its points form a series per
    width in the report's curves instead of a vertical jump in the setting's line."""
    from eval.report import curve_series

    rows = [{"label": "fast", "snapshot_name": name, "images": images, "metrics": {"fid": fid}}
            for name, images, fid in [("img000000002000", 2000, 30.0), ("img000000001000", 1000, 50.0),
                                      ("img000000002000-posthoc-0.070", 2000, 25.0),
                                      ("img000000002000-posthoc-0.100", 2000, 27.0)]]
    assert curve_series(rows, "fid") == {
        "fast": ([(1.0, 50.0), (2.0, 30.0)], False),
        "fast (post-hoc EMA, sigma_rel 0.070)": ([(2.0, 25.0)], True),
        "fast (post-hoc EMA, sigma_rel 0.100)": ([(2.0, 27.0)], True)}
    assert curve_series(rows, "sfid") == {}


def test_a_setting_can_evaluate_every_nth_snapshot(tmp_path):
    """every_kimg: a costly setting (50k ancestral samples) evaluates the first snapshot at or past each multiple,
    beside a cheap one that takes them all; the choice does not change what an evaluation is (its key), and
    `adm eval run` on one snapshot is not filtered."""
    from eval.farm import prepare
    from eval.schedule import schedule_pass
    from eval.settings import EvalSetting

    run = make_run(tmp_path / "run", kimgs=(1, 2, 3, 5, 6, 9))
    ref = tmp_path / "ref.npz"
    statistics_ref(ref)
    cheap, costly = EvalSetting(name="cheap", steps="ddim2", num=4), EvalSetting(name="costly", steps="ddim3",
                                                                                   num=4, every_kimg=3)
    started = []

    class Recording:
        name = "slurm"

        def start(self, key_dir, attempt):
            started.append(key_dir.name.rsplit("--", 1)[0])
            return {"cluster": "slurm", "jobs": [1], "state": "submitted"}

        def alive(self, owner):
            return True

    counts = schedule_pass(run, [cheap, costly], ref, Recording(), 3, log=lambda *a: None)
    costly_snaps = sorted(s.split("--")[0] for s in started if s.endswith("--costly"))
    # multiples of 3 kimg: 0 -> 1 kimg (the first), 3 -> 3, 6 -> 6, 9 -> 9; 2 and 5 fall inside a stride
    assert costly_snaps == [f"img{k * 1000:012d}" for k in (1, 3, 6, 9)]
    assert sum(s.endswith("--cheap") for s in started) == 6 and counts["started"] == 10
    snap = run / "snapshots" / f"img{2000:012d}"
    assert prepare(run, snap, costly, ref) == prepare(run, snap, EvalSetting(name="costly", steps="ddim3", num=4), ref)
    assert "every_kimg" not in json.loads((prepare(run, snap, costly, ref) / "setting.json").read_text())["setting"]
    started.clear()
    schedule_pass(run, [costly], ref, Recording(), 3, log=lambda *a: None, only=[snap])
    assert started == [f"img{2000:012d}--costly"]
    with pytest.raises(ValueError, match="every_kimg must be 0"):
        EvalSetting(steps="ddim2", every_kimg=-1)


def test_a_local_pass_asks_slurm_about_claims_of_slurm_jobs(tmp_path, monkeypatch):
    """`--cluster local` after an earlier `--cluster slurm` pass: a claim held by Slurm jobs is asked of Slurm
    where one answers (gone jobs: the evaluation is retried here), and where none answers it is left to
    its jobs, said once, instead of silently waited on forever."""
    import argparse

    from eval import registry
    from eval.cli import backend_for
    from eval.farm import prepare
    from eval.schedule import LocalBackend, schedule_pass
    from eval.settings import EvalSetting
    from slurm import eval_jobs

    run = make_run(tmp_path / "run", kimgs=(1,))
    ref = tmp_path / "ref.npz"
    statistics_ref(ref)
    setting = EvalSetting(name="x", steps="ddim2", num=4)
    key_dir = prepare(run, next((run / "snapshots").iterdir()), setting, ref)
    held = {**registry.local_owner(), "cluster": "slurm", "jobs": [41, 42, 43], "state": "submitted",
            "time": time.time() - 3600}
    registry.update_claim(key_dir, 1, held)

    class Recording(LocalBackend):  # LocalBackend's liveness; starting is recorded, not run
        def start(self, key_dir, attempt):
            return {**registry.local_owner(), "state": "done"}

    # a fake Slurm: sbatch, sinfo answering, sacct saying what became of jobs 41-43
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    sacct_rows = bin_dir / "sacct-rows"
    for name, body in [("sbatch", "exit 0"), ("sinfo", "echo debug up"), ("squeue", "exit 0"),
                       ("sacct", f"cat {sacct_rows}")]:
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(0o755)
    backend = backend_for(argparse.Namespace(cluster="local"))
    assert isinstance(backend, LocalBackend) and backend.jobs_alive is eval_jobs.jobs_alive
    sacct_rows.write_text("41|COMPLETED|00:01:00\n42|RUNNING|00:00:30\n43|PENDING|00:00:00\n")
    logged = []
    counts = schedule_pass(run, [setting], ref, Recording(jobs_alive=backend.jobs_alive), 3, log=logged.append)
    assert counts["running"] == 1 and registry.attempts(key_dir) == [1]
    sacct_rows.write_text("41|COMPLETED|00:01:00\n42|CANCELLED by 0|00:00:30\n43|CANCELLED by 0|00:00:00\n")
    counts = schedule_pass(run, [setting], ref, Recording(jobs_alive=backend.jobs_alive), 3, log=logged.append)
    assert counts["started"] == 1 and registry.attempts(key_dir) == [1, 2], counts
    assert f"[eval] {key_dir.name}: attempt 1 did not finish (owner gone); retrying" in logged

    # no Slurm answering here: the jobs' claim is left to them, and the pass says so once
    (bin_dir / "sinfo").write_text("#!/bin/sh\necho 'Unable to contact slurm controller' >&2; exit 1\n")
    backend = backend_for(argparse.Namespace(cluster="local"))
    assert backend.jobs_alive is None
    told = []
    quiet = Recording(log=told.append)
    assert quiet.alive(held) and quiet.alive(held)
    assert told == ["[eval] Slurm job(s) 41,42,43 hold an evaluation and no Slurm answers here to say whether they "
                    "still run: it is left to them (run this where sinfo works to retry it if they are gone)"]
    assert not quiet.alive({**registry.local_owner(), "pid": 2 ** 22 + 1})  # a claim without jobs: its pid


def test_post_hoc_snapshots_are_left_out_of_settings_for_weights_they_lack(tmp_path):
    """A post-hoc EMA snapshot holds only its reconstruction (ema): a setting of `weights: raw` neither
    refuses the whole schedule up front (the settings are checked against the newest snapshot the training
    wrote, not the post-hoc one sorting after it) nor fails three attempts on it: it is not that setting's.
    The main EMA also answers to its rate's name."""
    from eval import registry
    from eval.preflight import check
    from eval.schedule import LocalBackend, find_snapshots, newest_trained, schedule_pass
    from eval.settings import EvalSetting

    preset = get_preset("tiny-32")
    cfg = preset.config()
    model = randomize_(build_model(cfg), seed=3, scale=0.05)
    run = tmp_path / "run"
    base = {"task": "diffusion", "diffusion": preset.diffusion}
    trained = save_snapshot(run / "snapshots" / "img000000001000", model.state_dict(), cfg,
                            meta={**base, "images": 1000, "ema_rate": 0.9999}, extra_weights={"raw": model.state_dict()})
    posthoc = save_snapshot(run / "snapshots" / "img000000001000-posthoc-0.070", model.state_dict(), cfg,
                            meta={**base, "images": 1000, "ema_rate": 0.9999,  # copied from its training snapshot
                                  "posthoc": {"sigma_rel": 0.07}, "weights": "posthoc-0.070"})
    ref = tmp_path / "ref.npz"
    statistics_ref(ref)
    settings = [EvalSetting(name="d2", steps="ddim2", num=4), EvalSetting(name="d2-raw", steps="ddim2", num=4,
                                                                          weights="raw")]
    snaps = find_snapshots(run)
    assert snaps == [trained, posthoc] and newest_trained(snaps) == trained
    check(newest_trained(snaps), settings, ref)  # passes: the training's snapshot has raw weights
    with pytest.raises(ValueError, match="setting 'd2-raw': .*posthoc-0.070 has no weights 'raw'; it has ema"):
        check(posthoc, settings, ref)

    class Recording(LocalBackend):
        started = []

        def start(self, key_dir, attempt):
            self.started.append(key_dir)
            return {**registry.local_owner(), "state": "done"}

    counts = schedule_pass(run, settings, ref, Recording(), 3, log=lambda line: None)
    assert counts["started"] == 3 and counts["failed"] == counts["retrying"] == 0  # not 4: posthoc x raw left out
    started = {json.loads((k / "setting.json").read_text())["setting"]["weights"] for k in Recording.started}
    assert started == {"ema", "raw"}
    check(trained, [EvalSetting(name="r", steps="ddim2", num=4, weights="ema_0.9999")], ref)  # = ema
    with pytest.raises(ValueError, match=r"has no weights 'ema_0.999'; it has ema, raw \(ema is the EMA at 0.9999\)"):
        check(trained, [EvalSetting(name="r", steps="ddim2", num=4, weights="ema_0.999")], ref)
    # a post-hoc snapshot's ema is its reconstruction, not the EMA at the rate its training snapshot records
    with pytest.raises(ValueError, match=r"has no weights 'ema_0.9999'; it has ema \(ema is the post-hoc EMA at "
                                         r"sigma_rel 0.07\)"):
        check(posthoc, [EvalSetting(name="r", steps="ddim2", num=4, weights="ema_0.9999")], ref)


def test_an_unreadable_registry_record_is_left_out_by_name_not_fatal(tmp_path, capsys):
    from eval import registry
    from eval.settings import EVALUATOR_VERSION

    root = registry.eval_root(tmp_path)
    good = {"key": "a", "snapshot_name": "img000000001000", "setting": {"name": "fast"}, "ref": "/r.npz",
            "evaluator": EVALUATOR_VERSION, "metrics": {"fid": 1.5, "num_samples": 4}}  # as metrics_task writes
    for key, text in [("a", json.dumps(good)), ("b", '{"snapshot_name": "img0000000020'), ("c", "[1, 2]")]:
        (root / key).mkdir(parents=True)
        (root / key / registry.METRICS).write_text(text)
    (root / "b" / registry.FAILED).write_text("{not json")
    rows = registry.results(tmp_path)
    assert [r["snapshot_name"] for r in rows] == ["img000000001000"] and registry.failures(tmp_path) == []
    err = capsys.readouterr().err
    for bad in (root / "b" / registry.METRICS, root / "c" / registry.METRICS, root / "b" / registry.FAILED):
        assert f"{bad}: unreadable (" in err and "left out" in err


def test_scheduling_a_classifier_run_says_what_evaluates_it(tmp_path):
    """A run of the noisy classifier (or the upsampler) has nothing to sample on its own: scheduling it is
    refused with the way such snapshots are evaluated, instead of recurring passes that report "0 done"."""
    import eval.cli
    import eval.schedule

    cfg = get_preset("tiny-32").config()
    run = tmp_path / "clf"
    save_snapshot(run / "snapshots" / "img000000001000", build_model(cfg).state_dict(), cfg,
                  meta={"task": "classifier", "images": 1000})
    ref = tmp_path / "ref.npz"
    statistics_ref(ref)
    with pytest.raises(ValueError, match=r"its snapshots are classifier snapshots, which are not sampled on their "
                                         r"own \(a classifier's snapshots are evaluated through a diffusion run's "
                                         r"setting: classifier=SNAPSHOT \(--classifier\)"):
        eval.cli.main(["schedule", str(run), "--ref", str(ref), "--once", "--cluster", "local"])
    # a diffusion run without a snapshot yet is not refused: its first pass finds nothing, the next may
    (tmp_path / "new" / "snapshots").mkdir(parents=True)
    assert eval.schedule.not_evaluated_here(tmp_path / "new") is None
    assert eval.schedule.not_evaluated_here(make_run(tmp_path / "diff", kimgs=(1,))) is None


def test_a_pass_of_the_chain_whose_checks_fail_still_submits_the_next(tmp_path, monkeypatch, capsys):
    """A snapshot damaged after it was evaluated failed the preflight of every later pass before the pass's
    own error handling, ending the recurring chain for good; typed by a user, the same check still refuses.
    Two chains (two schedules started at once, or a pass requeued after it queued the next) meet at their next
    passes: the younger chain ends, the older goes on, so exactly one survives; chains are named by their
    first job, so the rule settles at the first meeting whatever job ids later passes get."""
    import eval.cli
    import eval.preflight
    import eval.schedule

    run = make_run(tmp_path / "run", kimgs=(1,))
    ref = tmp_path / "ref.npz"
    statistics_ref(ref)
    submitted, others = [], []

    class Slurm:
        name = "slurm"

        def schedule_passes(self, run_dir):
            return list(others)

        def submit_schedule(self, argv, every, run_dir, chain=None):
            submitted.append((argv, chain))
            return "43"

    def damaged(*a, **k):
        raise eval.preflight.SnapshotError("model.safetensors: size 1000 != 5512920 in the manifest (truncated?)")

    monkeypatch.setattr(eval.cli, "backend_for", lambda a: Slurm())
    monkeypatch.setattr(eval.preflight, "check", damaged)
    common = [str(run), "--ref", str(ref), "--name", "x", "--steps", "ddim2", "--num", "4", "--every", "1h"]
    with pytest.raises(Exception, match="truncated"):  # a user's command: refused up front
        eval.cli.main(["schedule", *common])
    assert not submitted
    monkeypatch.setenv(eval.cli.SCHEDULED_PASS, "1")
    monkeypatch.setenv(eval.cli.SCHEDULE_CHAIN, "30")  # this chain began with job 30; this pass is job 40
    monkeypatch.setenv("SLURM_JOB_ID", "40")
    assert eval.cli.main(["schedule", *common]) == 0 and submitted[-1][1] == "30"  # the next pass keeps the name
    assert "this pass failed (SnapshotError: model.safetensors: size 1000" in capsys.readouterr().err
    monkeypatch.setattr(eval.preflight, "check", lambda *a, **k: None)
    monkeypatch.setattr(eval.schedule, "schedule_pass", lambda *a, **k: {"done": 0, "now": 0, "failed": 0})
    for passes, ends in [([{"job": "39", "chain": "25"}], "39 is an older schedule's pass (chain 25, this one 30)"),
                         ([{"job": "45", "chain": "25"}], "45 is an older schedule's pass"),  # whatever its job id
                         ([{"job": "41", "chain": "30"}], "41 is this schedule's next pass, queued already"),
                         ([{"job": "41", "chain": "35"}], None),  # a younger chain: that one ends when it meets this
                         ([{"job": "38", "chain": "30"}], None),  # this chain's previous pass, still ending
                         ([{"job": "38", "chain": "30"}, {"job": "44", "chain": "35"}], None)]:
        others[:] = passes
        n = len(submitted)
        assert eval.cli.main(["schedule", *common]) == 0
        out = capsys.readouterr().out
        if ends:
            assert f"job {ends}" in out and "this pass ends, that one goes on" in out and len(submitted) == n
        else:
            assert len(submitted) == n + 1 and submitted[-1][1] == "30" and "this pass ends" not in out
    others[:] = [{"job": "44", "chain": "35"}]  # typed by a user while a schedule runs: refused
    monkeypatch.delenv(eval.cli.SCHEDULED_PASS)
    with pytest.raises(ValueError, match="is already scheduled: job 44 is its next pass"):
        eval.cli.main(["schedule", *common])


def test_run_wait_waits_for_an_attempt_another_pass_submitted(tmp_path, monkeypatch, capsys):
    """`adm eval run --wait` on an evaluation the schedule already submitted: it waits for that attempt's jobs
    (it said "ended without a result" while they ran, exiting 1), then prints the metrics they published."""
    import eval.cli
    import eval.preflight
    from eval import registry

    run, snap, ref, setting, key_dir = one_registered_evaluation(tmp_path)
    assert registry.try_claim(key_dir, 1)  # the schedule's pass, in another process
    registry.update_claim(key_dir, 1, {"host": "node7", "pid": 1, "time": 0, "jobs": ["80", "81", "82"],
                                       "state": "submitted"})
    polls = []

    class Slurm:
        name = "slurm"

        def alive(self, owner):
            polls.append(owner["jobs"])
            if len(polls) == 3:  # the metrics job publishes, then its jobs are over
                registry.publish(key_dir, {"key": key_dir.name, "metrics": {"num_samples": 4, "fid": 12.5}})
            return len(polls) < 3

        def start(self, key_dir, attempt):
            raise AssertionError("a second attempt beside the running one")

        def wait_all(self):
            pass

    monkeypatch.setattr(eval.cli, "backend_for", lambda a: Slurm())
    monkeypatch.setattr(eval.cli, "WAIT_POLL_S", 0)
    monkeypatch.setattr(eval.preflight, "check", lambda *a, **k: None)
    common = [str(snap), "--ref", str(ref), "--name", "x", "--steps", "ddim2", "--num", "4"]
    assert eval.cli.main(["run", *common, "--wait"]) == 0
    out = capsys.readouterr().out
    assert f"{snap.name} x: attempt 1 is running (Slurm jobs 80, 81, 82, submitted by another pass); waiting" in out
    assert f"{snap.name} x: num_samples 4  fid 12.5000" in out and "ended without a result" not in out
    assert polls == [["80", "81", "82"]] * 3


def test_a_slurm_attempt_that_ended_without_a_result_says_why(tmp_path, monkeypatch, capsys):
    """The backend's account of how the jobs ended (sacct's stage, the task's error) is what failed.json
    records and what `adm eval run --wait` prints, exiting 1 (it said "submitted" and exited 0)."""
    import eval.cli
    import eval.preflight

    run = make_run(tmp_path / "run", kimgs=(1,))
    snap = next((run / "snapshots").iterdir())
    ref = tmp_path / "ref.npz"
    statistics_ref(ref)

    class Slurm:
        name = "slurm"

        def start(self, key_dir, attempt):
            return {"jobs": ["70", "71", "72"], "state": "submitted", "time": 0}

        def alive(self, owner):
            return False

        def wait_all(self):
            pass

        def ended_how(self, owner, key_dir):
            return "Slurm: FAILED(sampling); 70_1: SnapshotError: corrupt"

    monkeypatch.setattr(eval.cli, "backend_for", lambda a: Slurm())
    monkeypatch.setattr(eval.preflight, "check", lambda *a, **k: None)
    common = [str(snap), "--ref", str(ref), "--name", "x", "--steps", "ddim2", "--num", "4", "--max-attempts", "1"]
    assert eval.cli.main(["run", *common, "--wait"]) == 1
    assert "x: attempt 1 of 1 ended without a result (Slurm: FAILED(sampling); 70_1: SnapshotError: corrupt)" in \
        capsys.readouterr().out
    assert eval.cli.main(["run", *common]) == 1  # the next pass gives up, recording why
    [failed] = (run / "eval").glob("*/failed.json")
    assert json.loads(failed.read_text())["last_error"] == "Slurm: FAILED(sampling); 70_1: SnapshotError: corrupt"


def test_a_cascade_reuses_the_base_images_another_evaluation_sampled(tmp_path, capsys, monkeypatch):
    """A cascade whose base images a plain evaluation of the snapshot sampled already (same steps, guidance,
    weights, precision: its samples/images-of.json) runs only the upsampler, and its shards are byte for byte
    those of the same cascade sampling its base itself; one whose record differs is not reused."""
    import eval.farm
    import models.sampling
    from eval.farm import prepare, sample_task
    from eval.settings import EvalSetting

    run = make_run(tmp_path / "run", kimgs=(1,))
    snap = next((run / "snapshots").iterdir())
    make_upsampler(tmp_path / "up")
    common = dict(steps="ddim3", num=5, shard_size=3, batch_size=3)
    cascade = EvalSetting(name="c", upsampler=str(tmp_path / "up"), upsampler_steps="ddim3", **common)
    refs = []  # one key per reference (by its content)
    for i in range(4):
        refs.append(tmp_path / f"ref{i}.npz")
        np.savez(refs[-1], mu=np.full(2048, float(i)), sigma=np.eye(2048), mu_s=np.zeros(2023), sigma_s=np.eye(2023))
    base_seeds = []
    real = models.sampling.sample_images

    def counted(model, diffusion, seeds, *args, **kwargs):  # the base model's work, in seeds
        base_seeds.extend(seeds)
        return real(model, diffusion, seeds, *args, **kwargs)

    def sample_all(key_dir):
        eval.farm._sampler.cache_clear()
        base_seeds.clear()
        for i in range(2):
            sample_task(str(key_dir), i)
        return [np.load(p) for p in sorted((key_dir / "samples").glob("samples-*.npz"))]

    monkeypatch.setattr(models.sampling, "sample_images", counted)
    alone_dir = prepare(run, snap, cascade, refs[0])
    alone = sample_all(alone_dir)  # no plain evaluation yet: the base model runs
    assert sorted(base_seeds) == [0, 1, 2, 3, 4]
    plain = prepare(run, snap, EvalSetting(name="p", **common), refs[1])
    sample_all(plain)
    reused_dir = prepare(run, snap, cascade, refs[2])
    reused = sample_all(reused_dir)
    assert base_seeds == [0, 1, 2]  # the progressive decoding's frames alone: the first shard's 3 seeds
    for a, b in zip(alone, reused, strict=True):
        np.testing.assert_array_equal(a["arr_0"], b["arr_0"])
        np.testing.assert_array_equal(a["arr_1"], b["arr_1"])
    assert len(alone) == 2 and alone[0]["arr_0"].shape == (3, 64, 64, 3)
    first = np.load(alone_dir / "progressive.npz")["arr_0"]
    assert np.abs(np.load(reused_dir / "progressive.npz")["arr_0"].astype(int) - first).max() <= 1
    # its last frame is the base model's samples of the first seeds (the report's cascade stages show it): those
    # of the plain evaluation
    plain_first = np.load(sorted((plain / "samples").glob("samples-*.npz"))[0])["arr_0"]
    assert first.shape[1:] == (3, 32, 32, 3) and np.abs(first[-1].astype(int) - plain_first).max() <= 1
    assert capsys.readouterr().err.count(f"from {plain.name}: only the upsampler runs") == 2

    record = plain / "samples" / "images-of.json"  # another precision's samples are other images
    assert json.loads(record.read_text())["device"] == "cpu"  # (and another device's: its generators differ)
    assert json.loads(record.read_text())["layout"] == "channels_last"  # (the networks' memory layout: rounding)
    record.write_text(record.read_text().replace('"fp32"', '"bf16"'))
    sample_all(prepare(run, snap, cascade, refs[3]))
    assert sorted(base_seeds) == [0, 1, 2, 3, 4] and "only the upsampler runs" not in capsys.readouterr().err

    # a shard to sample on another kind of device than the evaluation's others: refused before any model loads
    record.write_text(record.read_text().replace('"cpu"', '"cuda"'))
    sorted((plain / "samples").glob("samples-*.npz"))[-1].unlink()
    eval.farm._sampler.cache_clear()
    with pytest.raises(RuntimeError, match="samples were drawn on cuda and this task runs on cpu"):
        sample_task(str(plain), 1)
    assert eval.farm._sampler.cache_info().currsize == 0
    sample_task(str(plain), 0)  # a finished shard: nothing to draw, nothing refused


def test_a_setting_that_keeps_its_first_samples_drops_the_rest_once_its_cascades_are_done(tmp_path, capsys):
    """keep_samples: first keeps, once the metrics are out, only the first shard (the report's samples).
    A cascade of the snapshot still to run may take the shards as its base images, so they stay until it is
    done, and the next pass's finish drops them. The field changes no number: not in the key, and changed on
    a registered evaluation it applies to the next pass."""
    from eval.farm import finish, prepare, run_local, samples_to_drop
    from eval.settings import EvalSetting

    run = make_run(tmp_path / "run", kimgs=(1,))
    snap = next((run / "snapshots").iterdir())
    make_upsampler(tmp_path / "up")
    ref = statistics_ref(tmp_path / "ref.npz")
    common = dict(steps="ddim2", num=6, shard_size=3, batch_size=3)
    plain = prepare(run, snap, EvalSetting(name="p", keep_samples="first", **common), ref)
    assert prepare(run, snap, EvalSetting(name="p", **common), ref) == plain  # the same evaluation
    assert json.loads((plain / "setting.json").read_text())["setting"]["keep_samples"] == "all"  # as asked last
    prepare(run, snap, EvalSetting(name="p", keep_samples="first", **common), ref)
    cascade = prepare(run, snap, EvalSetting(name="c", upsampler=str(tmp_path / "up"), upsampler_steps="ddim2",
                                             **common), ref)
    shards = ["samples-00000000-00000002.npz", "samples-00000003-00000005.npz"]
    first = run_local(plain)
    assert sorted(p.name for p in (plain / "samples").glob("samples-*")) == shards  # the cascade may take them
    assert [p.name for p in samples_to_drop(plain)] == shards[1:]
    capsys.readouterr()
    run_local(cascade)
    assert capsys.readouterr().err.count(f"from {plain.name}: only the upsampler runs") == 2  # both shards taken
    finish(plain)  # what the next pass does for a published evaluation with work left
    assert sorted(p.name for p in (plain / "samples").glob("samples-*")) == shards[:1] and not samples_to_drop(plain)
    assert json.loads((plain / "metrics.json").read_text()) == first  # the numbers as published
    assert len(list((cascade / "samples").glob("samples-*"))) == 2  # (the cascade keeps all: its default)
    with pytest.raises(ValueError, match="keep_samples must be all or first, got 'none'"):
        EvalSetting(keep_samples="none")


def test_a_setting_may_name_its_own_reference(tmp_path):
    """A settings file's entry may carry `ref:` (a cascade's reference is at the upsampler's size), used instead
    of --ref for that setting alone, with the same key as when given by --ref; a setting with neither is
    refused, naming it, before anything is claimed."""
    import yaml

    import eval.cli
    from eval.farm import prepare
    from eval.settings import EvalSetting, load_settings

    run = make_run(tmp_path / "run", kimgs=(1,))
    snap = next((run / "snapshots").iterdir())
    make_upsampler(tmp_path / "up")
    small, large = statistics_ref(tmp_path / "ref32.npz"), tmp_path / "ref64.npz"
    np.savez(large, mu=np.ones(2048), sigma=np.eye(2048), mu_s=np.zeros(2023), sigma_s=np.eye(2023))
    common = dict(steps="ddim2", num=4, shard_size=4, batch_size=4)
    entries = [dict(name="p", **common),
               dict(name="c", upsampler=str(tmp_path / "up"), upsampler_steps="ddim2", ref=str(large), **common)]
    (tmp_path / "s.yaml").write_text(yaml.safe_dump({"settings": entries}))
    plain, cascade = load_settings(tmp_path / "s.yaml")
    assert cascade.ref == str(large) and "ref" not in cascade.identity() and plain.ref is None
    assert eval.cli.main(["run", str(snap), "--settings", str(tmp_path / "s.yaml"), "--ref", str(small),
                          "--cluster", "local"]) == 0
    c_dir = prepare(run, snap, EvalSetting(**{k: v for k, v in entries[1].items() if k != "ref"}), large)
    p_dir = prepare(run, snap, EvalSetting(**entries[0]), small)  # the keys of --ref runs: the same evaluations
    assert json.loads((c_dir / "metrics.json").read_text())["ref"] == str(large.resolve())
    assert json.loads((p_dir / "metrics.json").read_text())["ref"] == str(small.resolve())
    assert len([d for d in (run / "eval").iterdir() if (d / "setting.json").is_file()]) == 2
    assert "ref" not in json.loads((c_dir / "setting.json").read_text())["setting"]

    (tmp_path / "bad.yaml").write_text(yaml.safe_dump({"settings": [entries[1], dict(name="q", **common)]}))
    with pytest.raises(ValueError, match="setting 'q' has no reference: give --ref REF.npz, or `ref:` in its entry"):
        eval.cli.main(["run", str(snap), "--settings", str(tmp_path / "bad.yaml"), "--cluster", "local"])
    (tmp_path / "gone.yaml").write_text(yaml.safe_dump({"settings": [{**entries[1], "ref": "nope.npz"}]}))
    with pytest.raises(FileNotFoundError, match="setting 'c': ref nope.npz: no such file"):
        eval.cli.main(["run", str(snap), "--settings", str(tmp_path / "gone.yaml"), "--ref", str(small),
                       "--cluster", "local"])
    assert not list((run / "eval").glob("*--q--*"))
