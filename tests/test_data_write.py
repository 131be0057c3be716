"""`adm data write / verify / info` on a small real dataset in ImageNet's layouts."""

import io
import json
import os
import re
import shutil
import signal
import subprocess
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import run_cli
from data_pipeline.sources import read_source
from data_pipeline.verify import verify
from data_pipeline.writer import MANIFEST, write_dataset, write_shard
from imagenet_fixture import make_imagenet, wnid


@pytest.fixture(scope="module")
def imagenet(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagenet")
    labels = make_imagenet(root)
    return root, labels


@pytest.fixture(scope="module")
def train_shards(imagenet, tmp_path_factory):
    root, _ = imagenet
    out = tmp_path_factory.mktemp("shards") / "train"
    proc = run_cli("data", "write", str(root), str(out), "--layout", "imagenet", "--split", "train",
                   "--shard-size", "16", "--workers", "3", "--quiet")
    assert "wrote 122 samples in 8 shards" in proc.stdout
    return out


def read_with_webdataset(out):
    import webdataset as wds

    manifest = json.loads((out / MANIFEST).read_text())
    urls = [str(out / s["name"]) for s in manifest["shards"]]
    return list(wds.WebDataset(urls, shardshuffle=False).decode("pil"))


def test_written_shards_read_back_with_webdataset_and_tar(imagenet, train_shards):
    root, labels = imagenet
    samples = read_with_webdataset(train_shards)
    assert len(samples) == 122
    for s in samples:
        meta = s["json"]
        assert s["cls"] == labels["train/" + meta["source"]] == meta["class"]  # paths relative to the split
        assert meta["class_id"] == wnid(s["cls"])
        image = s.get("jpg", s.get("png"))
        assert image.size == tuple(meta["original_size"])
    keys = [s["__key__"] for s in samples]
    assert len(set(keys)) == 122
    # class-mixed order: the first shard holds several classes
    assert len({s["cls"] for s in samples[:16]}) >= 5
    names = subprocess.run(["tar", "-tf", str(train_shards / "shard-000000.tar")], capture_output=True,
                           text=True, check=True).stdout.split()
    assert len(names) == 16 * 3 and names[:3] == [f"{keys[0]}.jpg", f"{keys[0]}.cls", f"{keys[0]}.json"]


def test_manifest_and_verify(train_shards):
    manifest = json.loads((train_shards / MANIFEST).read_text())
    assert manifest["num_samples"] == 122 and manifest["num_classes"] == 11
    assert manifest["classes"][3] == {"index": 3, "id": wnid(3), "name": "digit 3"}
    assert [s["count"] for s in manifest["shards"]] == [16] * 7 + [10]
    assert not list(train_shards.glob("*.done.json")) and not list(train_shards.glob("*.partial"))
    # member offsets index every sample's first tar header
    shard = manifest["shards"][2]
    with open(train_shards / shard["name"], "rb") as f:
        f.seek(shard["offsets"][5])
        with tarfile.open(fileobj=f, mode="r|") as tar:
            assert next(iter(tar)).name.startswith(f"{int(shard['first_key']) + 5:09d}.")
    assert run_cli("data", "verify", str(train_shards)).returncode == 0
    info = json.loads(run_cli("data", "info", str(train_shards), "--json").stdout)
    assert info["samples"] == 122 and info["classes"] == 11


def test_val_flat_with_label_file_uses_the_train_class_table(imagenet, tmp_path):
    root, labels = imagenet
    manifest = write_dataset(read_source(root, "imagenet", "val"), tmp_path / "val", shard_size=8, progress=False)
    assert manifest["num_samples"] == 30 and manifest["source"]["layout"] == "imagenet-val"
    assert [c["id"] for c in manifest["classes"]] == [wnid(k) for k in range(11)]
    for s in read_with_webdataset(tmp_path / "val"):
        assert s["cls"] == labels["val/" + s["json"]["source"]]


def test_bad_images_are_skipped_counted_and_listed(imagenet, tmp_path):
    root, _ = imagenet
    bad = tmp_path / "src"
    import shutil
    shutil.copytree(root / "train", bad)
    (bad / wnid(1) / "zero.JPEG").write_bytes(b"")
    (bad / wnid(2) / "garbage.JPEG").write_bytes(b"this is not a jpeg at all" * 10)
    good = (bad / wnid(3) / f"{wnid(3)}_0.JPEG").read_bytes()
    (bad / wnid(3) / "truncated.JPEG").write_bytes(good[: len(good) // 2])
    manifest = write_dataset(read_source(bad, "folder"), tmp_path / "out", shard_size=50, workers=2, progress=False)
    reasons = {s["path"].split("/")[-1]: s["reason"] for s in manifest["skipped"]}
    assert set(reasons) == {"zero.JPEG", "garbage.JPEG", "truncated.JPEG"}
    assert "zero-byte" in reasons["zero.JPEG"] and manifest["skipped_count"] == 3
    assert manifest["num_samples"] == 122
    # the skipped images leave gaps in the keys; the loader serves every written sample once an epoch
    from data_pipeline.loader import StreamLoader

    keys = sorted(int(s["__key__"]) for s in read_with_webdataset(tmp_path / "out"))
    assert len(keys) == 122 and keys[-1] - keys[0] == 124  # the gaps are inside the key range
    loader = StreamLoader(tmp_path / "out", 16, batch_size=1, num_slots=1, flip=False)
    it = iter(loader)
    served = sorted(int(next(it)["id"][0]) for _ in range(122))
    assert served == keys and loader.skipped == 0


def test_the_writer_processes_leave_the_parents_image_list_to_the_parent(imagenet, tmp_path, monkeypatch):
    """Forked writers inherit the parent's objects (ImageNet's image list: about 0.5 GB); a garbage collection
    in a child touching them all would copy every page into each child. They are frozen while the pool runs,
    so a child's collector never looks at them, and thawed after."""
    import gc

    from data_pipeline import writer

    real = writer.write_shard

    def spy(task):  # runs in the forked child
        (tmp_path / f"frozen-{os.getpid()}").write_text(str(gc.get_freeze_count()))
        return real(task)

    spy.__module__, spy.__qualname__ = writer.__name__, "write_shard"  # sent to the pool by that name
    monkeypatch.setattr(writer, "write_shard", spy)
    root, _ = imagenet
    source = read_source(root / "train", "folder")
    assert gc.get_freeze_count() == 0
    write_dataset(source, tmp_path / "out", shard_size=16, workers=2, progress=False)
    frozen = [int(p.read_text()) for p in tmp_path.glob("frozen-*")]
    assert len(frozen) == 2 and min(frozen) > len(source.items)  # (every Item is a tracked object) in both children
    assert gc.get_freeze_count() == 0  # and the parent collects its garbage again


def test_center_crop_at_write_time_equals_adm_reference(imagenet, tmp_path):
    gd_data = pytest.importorskip("guided_diffusion.image_datasets")
    root, _ = imagenet
    manifest = write_dataset(read_source(root, "imagenet", "train"), tmp_path / "c", shard_size=200,
                             preprocess="center-crop:64", progress=False)
    assert manifest["image_format"] == "png"
    compared = 0
    for s in read_with_webdataset(tmp_path / "c"):
        ours = np.asarray(s["png"])
        with Image.open(root / "train" / s["json"]["source"]) as im:
            expected = gd_data.center_crop_arr(im.convert("RGB"), 64)
        assert ours.shape == (64, 64, 3) and np.array_equal(ours, expected)
        compared += 1
    assert compared == 122


def test_interrupted_write_resumes_to_the_same_shards(imagenet, tmp_path, monkeypatch):
    from data_pipeline import writer

    root, _ = imagenet
    source = read_source(root, "imagenet", "train")
    reference = write_dataset(source, tmp_path / "ref", shard_size=16, progress=False)
    real, calls = writer.write_shard, {"n": 0}

    def crash_after_three(task):
        calls["n"] += 1
        if calls["n"] > 3:
            raise KeyboardInterrupt("simulated kill")
        return real(task)

    monkeypatch.setattr(writer, "write_shard", crash_after_three)
    with pytest.raises(KeyboardInterrupt):
        write_dataset(source, tmp_path / "w", shard_size=16, progress=False)
    assert not (tmp_path / "w" / MANIFEST).exists()
    report = verify(tmp_path / "w")
    assert not report["ok"] and "no manifest.json" in report["problems"][0]
    with pytest.raises(ValueError, match="--resume"):
        write_dataset(source, tmp_path / "w", shard_size=16, progress=False)
    with pytest.raises(ValueError, match="different settings"):
        write_dataset(source, tmp_path / "w", shard_size=8, resume=True, progress=False)
    monkeypatch.setattr(writer, "write_shard", real)
    resumed = write_dataset(source, tmp_path / "w", shard_size=16, resume=True, progress=False)
    assert [s["sha256"] for s in resumed["shards"]] == [s["sha256"] for s in reference["shards"]]
    with pytest.raises(ValueError, match="already holds a complete dataset"):
        write_dataset(source, tmp_path / "w", shard_size=16, progress=False)


def killed_at_shard_2(task):  # (module level: the writer processes unpickle these by name)
    if task.index == 2:
        os.kill(os.getpid(), signal.SIGKILL)  # as the OOM killer would
    return write_shard(task)


def disk_full_at_shard_2(task):
    if task.index == 2:
        import errno
        raise OSError(errno.ENOSPC, "No space left on device", str(Path(task.out) / "shard-000002.tar.partial"))
    return write_shard(task)


def ctrl_c_during_shard_3(task):
    if task.index == 3:
        os.kill(os.getppid(), signal.SIGINT)
        time.sleep(60)  # a long shard in flight: stopped, not waited for
    return write_shard(task)


def sigterm_during_shard_3(task):
    if task.index == 3:
        os.kill(os.getppid(), signal.SIGTERM)  # `kill PID`, `timeout`, a job's end
        time.sleep(60)
    return write_shard(task)


def parent_killed_during_shard_3(task):
    if task.index == 3:
        (Path(task.out) / f"worker-{os.getpid()}.pid").touch()
        os.kill(os.getppid(), signal.SIGKILL)
        time.sleep(60)  # an orphan would finish this shard a minute later, beside the --resume
    return write_shard(task)


def _write_with(fake, source, out, results):
    """In a forked process of its own group (a hang is killed from outside): the write with `fake` as the
    shard writer; reports (exception type, message, seconds, writer processes left)."""
    import multiprocessing

    from data_pipeline import writer

    os.setpgid(0, 0)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # as at a terminal (a shell's `&` job ignores it)
    writer.write_shard = fake
    start = time.monotonic()
    try:
        write_dataset(source, out, shard_size=16, workers=2, progress=False)
        outcome = ("finished", "")
    except BaseException as e:  # noqa: BLE001 - KeyboardInterrupt is one of the outcomes
        outcome = (type(e).__name__, str(e))
    results.put((*outcome, time.monotonic() - start, len(multiprocessing.active_children())))


def test_parallel_write_stops_cleanly_when_a_worker_dies_or_on_ctrl_c(imagenet, tmp_path):
    """A writer process killed (the OOM killer), Ctrl-C in the parent or a full disk: the write stops at once with a
    message saying how to go on, leaves no process behind, and --resume completes it to the same shards."""
    import queue
    from multiprocessing import get_context

    root, _ = imagenet
    source = read_source(root, "imagenet", "train")
    reference = write_dataset(source, tmp_path / "ref", shard_size=16, progress=False)
    ctx = get_context("fork")
    for name, fake, error, match in [("killed", killed_at_shard_2, "RuntimeError", "a writer process died"),
                                     ("ctrl-c", ctrl_c_during_shard_3, "KeyboardInterrupt", "shards written to"),
                                     ("sigterm", sigterm_during_shard_3, "KeyboardInterrupt", "shards written to"),
                                     ("full", disk_full_at_shard_2, "RuntimeError", "No space left on device; ")]:
        results = ctx.Queue()
        proc = ctx.Process(target=_write_with, args=(fake, source, tmp_path / name, results))
        proc.start()
        try:
            kind, message, seconds, left = results.get(timeout=120)
        except queue.Empty:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail(f"{name}: the write hangs")
        finally:
            proc.join()
        assert kind == error and match in message and "rerun the same command with --resume" in message, message
        assert seconds < 30 and left == 0 and not (tmp_path / name / MANIFEST).exists()
        resumed = write_dataset(source, tmp_path / name, shard_size=16, workers=2, resume=True, progress=False)
        assert [s["sha256"] for s in resumed["shards"]] == [s["sha256"] for s in reference["shards"]]


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def test_the_workers_of_a_killed_write_end_with_it_and_a_second_write_waits_for_them(imagenet, tmp_path):
    """A write killed outright (SIGKILL): its workers end too rather than finish their shards, orphaned, beside
    the --resume; and a write into an OUT whose lock another write (or its workers) holds is refused."""
    from multiprocessing import get_context

    from data_pipeline.writer import lock_out

    root, _ = imagenet
    source = read_source(root, "imagenet", "train")
    reference = write_dataset(source, tmp_path / "ref", shard_size=16, progress=False)
    out = tmp_path / "killed"
    proc = get_context("fork").Process(target=_write_with, args=(parent_killed_during_shard_3, source, out,
                                                                  get_context("fork").Queue()))
    proc.start()
    proc.join(120)
    assert proc.exitcode == -signal.SIGKILL
    workers = [int(p.stem.split("-")[1]) for p in out.glob("worker-*.pid")]
    assert workers
    deadline = time.monotonic() + 20
    while any(_alive(w) for w in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = [w for w in workers if _alive(w)]
    for w in left:
        os.kill(w, signal.SIGKILL)  # (a failing run must not leave them holding pytest's output)
    assert not left, "the killed write's workers live on"
    for p in out.glob("worker-*.pid"):
        p.unlink()
    held = lock_out(out)  # as a live write's would be
    with pytest.raises(ValueError, match="another `adm data write` is writing here"):
        write_dataset(source, out, shard_size=16, workers=2, resume=True, progress=False)
    os.close(held)
    resumed = write_dataset(source, out, shard_size=16, workers=2, resume=True, progress=False)
    assert [s["sha256"] for s in resumed["shards"]] == [s["sha256"] for s in reference["shards"]]
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST] + [s["name"] for s in resumed["shards"]]


def test_verify_reports_a_truncated_shard(imagenet, tmp_path):
    root, _ = imagenet
    manifest = write_dataset(read_source(root, "imagenet", "train"), tmp_path / "t", shard_size=16, progress=False)
    assert verify(tmp_path / "t", workers=3)["ok"]
    shard = tmp_path / "t" / "shard-000001.tar"
    shard.write_bytes(shard.read_bytes()[:5000])
    flipped = bytearray((tmp_path / "t" / "shard-000004.tar").read_bytes())
    flipped[3000] ^= 1
    (tmp_path / "t" / "shard-000004.tar").write_bytes(bytes(flipped))
    (tmp_path / "t" / "shard-000006.tar").unlink()
    one = verify(tmp_path / "t")
    size = manifest["shards"][1]["bytes"]
    assert one["problems"] == [f"shard-000001.tar: 5000 bytes, manifest says {size} (truncated?)",
                               "shard-000004.tar: sha256 differs from the manifest (corrupt)",
                               "shard-000006.tar: missing"] and one["samples_checked"] == 122 - 48
    assert verify(tmp_path / "t", workers=3) == one  # the same report, in shard order, from any worker count
    proc = run_cli("data", "verify", str(tmp_path / "t"), "--workers", "2", check=False)
    assert proc.returncode == 1 and "shard-000001.tar" in proc.stdout and "truncated" in proc.stdout
    assert "8 shards, 74 samples checked: 3 problem(s)" in proc.stdout


def test_verify_names_each_bad_sample_reading_a_shard_once_as_a_stream(imagenet, tmp_path, monkeypatch):
    """A shard whose bytes match the manifest but whose samples do not hold (a label out of range, an image
    that does not decode, a sample without its label, one sample fewer than listed: a writer's bug, or shards
    and manifest edited together) gets each problem named, in order; the shard is read once, as a stream,
    a sample at a time (never whole into memory: 1 GB shards at 8 workers were 16 GB)."""
    import hashlib

    root, _ = imagenet
    out = tmp_path / "t"
    write_dataset(read_source(root, "imagenet", "train"), out, shard_size=16, progress=False)
    shard = out / "shard-000002.tar"
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar]
    keys = list(dict.fromkeys(m.name.split(".")[0] for m, _ in members))  # in the shard's order
    edited = []
    for m, data in members:
        key, ext = m.name.split(".", 1)
        if key == keys[0] and ext == "cls":
            data = b"77"  # 11 classes here
        elif key == keys[1] and ext == "jpg":
            data = b"not a jpeg"
        elif key == keys[2] and ext == "cls" or key == keys[3]:
            continue  # a sample without its label; a sample gone
        edited.append((m, data))
    with tarfile.open(shard, "w") as tar:
        for m, data in edited:
            m.size = len(data)
            tar.addfile(m, io.BytesIO(data))
    manifest = json.loads((out / MANIFEST).read_text())
    entry = manifest["shards"][2]
    entry.update(bytes=shard.stat().st_size, sha256=hashlib.sha256(shard.read_bytes()).hexdigest())
    (out / MANIFEST).write_text(json.dumps(manifest))
    real = Path.read_bytes
    monkeypatch.setattr(Path, "read_bytes", lambda self: pytest.fail(f"{self} read whole") if self.suffix == ".tar"
                        else real(self))
    report = verify(out, workers=1)
    assert report["problems"] == [
        f"shard-000002.tar: {entry['count'] - 1} samples, manifest says {entry['count']}",
        f"shard-000002.tar/{keys[0]}: label 77 outside 0..{manifest['num_classes'] - 1}",
        f"shard-000002.tar/{keys[1]}: image does not decode (cannot identify image file <_io.BytesIO object at "
        + report["problems"][2].split(" at ", 1)[1],
        f"shard-000002.tar/{keys[2]}: missing image or .cls"]
    assert report["samples_checked"] == 122 - 2  # the sample gone and the one without its label


def test_list_layout_and_input_errors(imagenet, tmp_path):
    root, labels = imagenet
    lst = tmp_path / "list.tsv"
    entries = [(p, k) for p, k in labels.items() if p.startswith("train")][:20]
    lst.write_text("".join(f"{root / p}\t{k}\n" for p, k in entries))
    manifest = write_dataset(read_source(lst, "list"), tmp_path / "l", shard_size=7, progress=False)
    assert manifest["num_samples"] == 20
    (tmp_path / "afile").write_text("")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / MANIFEST).write_text('{"format": ')  # cut short
    one_image = next((root / "train").rglob("*.JPEG"))
    for args, expected in [
        (("data", "write", str(root), str(tmp_path / "x"), "--preprocess", "resize:3"), "expected none, max-side:N"),
        (("data", "write", str(tmp_path / "nope"), str(tmp_path / "x")), "no such file or directory"),
        (("data", "write", str(root / "val"), str(tmp_path / "x"), "--layout", "folder"), "one sub-folder per class"),
        (("data", "write", str(root / "train"), str(tmp_path / "afile"), "--layout", "folder"),
         f"{tmp_path / 'afile'}: OUT is a file"),
        (("data", "write", str(one_image), str(tmp_path / "x"), "--layout", "folder"),
         "--layout folder reads a directory, this is a file"),
        (("data", "write", str(root / "train"), str(tmp_path / "x"), "--layout", "folder", "--image-format", "npy"),
         "--image-format npy stores center-cropped pixels: it needs --preprocess center-crop:R"),
        (("data", "info", str(broken)), f"{broken / MANIFEST}: not valid JSON"),
        (("data", "bench", str(broken), "--resolution", "32"), f"{broken / MANIFEST}: not valid JSON"),
        (("data", "bench", str(tmp_path / "nope"), "--resolution", "32"), "no manifest.json"),
    ]:
        proc = run_cli(*args, check=False)
        assert proc.returncode == 2 and expected in proc.stderr and "Traceback" not in proc.stderr, (expected, proc.stderr)
    assert not (tmp_path / "x").exists()
    proc = run_cli("data", "verify", str(broken), check=False)
    assert proc.returncode == 1 and f"{broken / MANIFEST}: not valid JSON" in proc.stdout
    bad = tmp_path / "bad.tsv"
    bad.write_text("only-a-path\n")
    with pytest.raises(ValueError, match=r"bad.tsv:1: expected 'path<TAB>label'"):
        read_source(bad, "list")


def test_data_bench_json_contract(train_shards):
    proc = run_cli("data", "bench", str(train_shards), "--resolution", "32", "--seconds", "0.5", "--batch-size", "8",
                   "--json")
    result = json.loads(proc.stdout)
    assert result["images_per_s"] > 0 and result["images"] > 0 and result["workers"] == 0


def test_val_in_class_folders_and_max_side(imagenet, tmp_path):
    import shutil
    root, labels = imagenet
    val = tmp_path / "in" / "val"
    for rel, k in labels.items():
        if rel.startswith("val/"):
            (val / wnid(k)).mkdir(parents=True, exist_ok=True)
            shutil.copy(root / rel, val / wnid(k) / rel.split("/")[1])
    manifest = write_dataset(read_source(tmp_path / "in", "imagenet", "val"), tmp_path / "v", shard_size=64,
                             preprocess="max-side:16", progress=False)
    assert manifest["num_samples"] == 30 and manifest["source"]["layout"] == "imagenet-val"
    for s in read_with_webdataset(tmp_path / "v"):
        assert min(s["jpg"].size) == 16 and s["cls"] == labels["val/" + s["json"]["source"].split("/")[1]]


def test_16_bit_greyscale_is_scaled_not_clipped(tmp_path):
    """PIL's convert("RGB") clips 16-bit greyscale (mode I;16 / I) to white above 255; the writer and the
    loader scale it to 8 bits (v / 257), at every preprocessing."""
    from data_pipeline.transforms import Transform

    ramp = (np.arange(64 * 64, dtype=np.uint32).reshape(64, 64) * 16).astype(np.uint16)  # 0 ... 65520
    for k in range(2):
        (tmp_path / "src" / f"c{k}").mkdir(parents=True)
        Image.fromarray(ramp).save(tmp_path / "src" / f"c{k}" / "g.png")
    with Image.open(tmp_path / "src" / "c0" / "g.png") as im:
        assert im.mode in ("I;16", "I") and np.asarray(im).max() == 65520  # really 16-bit on disk
    want = np.round(ramp / 257.0).astype(np.uint8)
    source = read_source(tmp_path / "src", "folder")
    for preprocess in ("center-crop:64", "none"):  # stored as 8-bit RGB / as the original file, decoded by the loader
        out = tmp_path / preprocess.replace(":", "")
        write_dataset(source, out, shard_size=4, preprocess=preprocess, progress=False)
        with tarfile.open(out / "shard-000000.tar") as tar:
            payloads = [tar.extractfile(m).read() for m in tar.getmembers() if m.name.endswith(".png")]
        assert len(payloads) == 2
        for data in payloads:
            got = np.asarray(Transform(64).decode(data))
            assert got.shape == (64, 64, 3) and np.array_equal(got[..., 0], want), preprocess
            assert np.array_equal(got[..., 0], got[..., 2])


def test_data_bench_refuses_to_upscale_preprocessed_shards(tmp_path):
    """Like training and `eval ref`: shards center-cropped below --resolution would be measured upscaled."""
    from data_pipeline.bench import measure

    (tmp_path / "src" / "c0").mkdir(parents=True)
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(tmp_path / "src" / "c0" / "a.png")
    write_dataset(read_source(tmp_path / "src", "folder"), tmp_path / "s", preprocess="center-crop:32", progress=False)
    with pytest.raises(ValueError, match=r"center-cropped to 32x32 \(center-crop:32\), smaller than --resolution=64"):
        measure(tmp_path / "s", 64, seconds=0.1)
    assert measure(tmp_path / "s", 32, seconds=0.1, batch_size=1)["images"] > 0


def _tree(root, classes=("n00000001", "n00000002"), per_class=3, size=(40, 30)):
    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (*size[::-1], 3), dtype=np.uint8)).save(root / c / f"{c}_{i}.JPEG")
    return root


def test_listing_follows_links_and_skips_what_is_not_an_image_as_a_walk_with_a_stat_each_would(tmp_path):
    """The listing reads each directory once (no stat per regular file: on NFS a stat is a round trip);
    it must find exactly what a plain walk that stats and resolves every entry finds."""
    root = _tree(tmp_path / "src", per_class=2)
    outside = _tree(tmp_path / "elsewhere", classes=("x",), per_class=1) / "x" / "x_0.JPEG"
    c1 = root / "n00000001"
    (c1 / "linked.jpg").symlink_to(outside)  # followed to its target
    (c1 / "broken.png").symlink_to(tmp_path / "nowhere.png")  # kept under its own name: the writer skips it
    (c1 / "folder.jpg").mkdir()  # a directory named like an image
    (c1 / "notes.txt").write_text("not an image")
    (c1 / "._n00000001_0.JPEG").write_bytes(b"AppleDouble")
    (c1 / "UPPER.PNG").write_bytes((c1 / "n00000001_0.JPEG").read_bytes())

    def walk(folder):
        return sorted(str(p.resolve() if p.exists() else p.parent.resolve() / p.name) for p in folder.iterdir()
                      if (p.is_file() or p.is_symlink()) and p.suffix.lower() in {".jpg", ".jpeg", ".png"}
                      and not p.name.startswith("."))

    expected = [(path, label) for label, c in enumerate(sorted(root.iterdir())) for path in walk(c)]
    source = read_source(root, "folder")
    assert sorted((i.path, i.label) for i in source.items) == sorted(expected)
    assert str(outside.resolve()) in [i.path for i in source.items] and len(source.items) == 7
    # through a symlinked root: the same resolved paths
    (tmp_path / "link").symlink_to(root)
    assert [i.path for i in read_source(tmp_path / "link", "folder").items] == [i.path for i in source.items]


def _ilsvrc_tars(root, out, prefix=""):
    """ILSVRC2012_img_train.tar (a tar per class inside) and ILSVRC2012_img_val.tar (flat) from the
    extracted tree, as ImageNet's download has them (prefix "./": as `tar cf x.tar .` names members)."""
    out.mkdir()
    with tarfile.open(out / "ILSVRC2012_img_train.tar", "w") as outer:
        for class_dir in sorted((root / "train").iterdir()):
            inner = out / f"{class_dir.name}.tar"
            with tarfile.open(inner, "w") as t:
                for f in sorted(class_dir.iterdir(), reverse=True):  # tar order is not name order
                    t.add(f, arcname=prefix + f.name)
            outer.add(inner, arcname=prefix + inner.name)
            inner.unlink()
    with tarfile.open(out / "ILSVRC2012_img_val.tar", "w") as t:
        if prefix:
            t.add(root / "val", arcname=prefix, recursive=False)  # the directory's own entry, as GNU tar writes
        for f in sorted((root / "val").iterdir()):
            t.add(f, arcname=prefix + f.name)
    return out / "ILSVRC2012_img_train.tar", out / "ILSVRC2012_img_val.tar"


def test_the_ilsvrc_tars_read_in_place_give_the_shards_the_extracted_folders_give(imagenet, tmp_path):
    """ImageNet's own tars need not be extracted (1.28M small files on a shared filesystem): each image is
    read as a byte range of the big file. The shards are byte-identical to those of the extracted folders,
    labels included; damage and wrong files are named."""
    import shutil

    from data_pipeline.writer import source_digest

    imagenet, _ = imagenet
    (tmp_path / "in").mkdir()
    for name in ("LOC_val_solution.csv", "LOC_synset_mapping.txt"):
        shutil.copy(imagenet / name, tmp_path / "in" / name)
    train_tar, val_tar = _ilsvrc_tars(imagenet, tmp_path / "in" / "tars")
    dotted = _ilsvrc_tars(imagenet, tmp_path / "in" / "dotted", prefix="./")
    for split, tar in (("train", train_tar), ("val", val_tar)):
        folder = read_source(imagenet, "imagenet", split)
        packed = read_source(tar, "imagenet", split)
        assert [(i.name, i.label) for i in packed.items] == [
            (os.path.relpath(i.path, imagenet / split), i.label) for i in folder.items]
        assert packed.classes == folder.classes and source_digest(packed) == source_digest(folder)
        assert source_digest(read_source(dotted[split == "val"], "imagenet", split)) == source_digest(folder)
        a = write_dataset(folder, tmp_path / f"{split}-folder", shard_size=8, preprocess="center-crop:16",
                          progress=False)
        b = write_dataset(packed, tmp_path / f"{split}-tar", shard_size=8, preprocess="center-crop:16", workers=2,
                          progress=False)
        assert [s["sha256"] for s in a["shards"]] == [s["sha256"] for s in b["shards"]] and b["skipped_count"] == 0
        assert b["source"]["layout"] == f"imagenet-{split}-tar"
    # through the command, originals kept: each image's bytes are the file's own
    proc = run_cli("data", "write", str(train_tar), str(tmp_path / "cli"), "--layout", "imagenet", "--shard-size", "50")
    assert proc.stderr.startswith(f"listing {train_tar} ...\n")  # said before the tar's headers are read
    with tarfile.open(tmp_path / "cli" / "shard-000000.tar") as shard:
        meta = json.loads(shard.extractfile(next(m for m in shard if m.name.endswith(".json"))).read())
        first = shard.extractfile(next(m for m in shard if m.name.endswith(".jpg"))).read()
    assert first == (imagenet / "train" / meta["source"]).read_bytes()

    # the wrong split, a compressed tar, a tar cut short
    with pytest.raises(ValueError, match="holds per-class tars .*use --split train"):
        read_source(train_tar, "imagenet", "val")
    with pytest.raises(ValueError, match="one <wnid>.tar per class, found ILSVRC2012_val_00000001.JPEG"):
        read_source(val_tar, "imagenet", "train")
    gz = tmp_path / "in" / "train.tar"
    with tarfile.open(gz, "w:gz") as t:
        t.add(train_tar, arcname="x")
    with pytest.raises(ValueError, match=r"train.tar: unreadable tar .*\(an uncompressed tar is expected"):
        read_source(gz, "imagenet", "train")
    # a download cut short, wherever the cut falls (inside an image, on a header): refused before any write
    listed = read_source(val_tar, "imagenet", "val")
    data, cut = val_tar.read_bytes(), tmp_path / "cut" / "ILSVRC2012_img_val.tar"
    cut.parent.mkdir()
    shutil.copy(imagenet / "LOC_val_solution.csv", cut.parent)
    end = listed.items[-1].offset + -(-listed.items[-1].size // 512) * 512  # the last image's data, padded
    for at in (len(data) // 2, listed.items[-1].offset - 512, listed.items[-1].offset + 10, end):  # end: no marker
        cut.write_bytes(data[:at])
        with pytest.raises(ValueError, match="ILSVRC2012_img_val.tar: .*interrupted download"):
            read_source(cut, "imagenet", "val")
    # a class tar inside that is compressed: named, not read as an empty class
    bad = tmp_path / "in" / "bad" / "ILSVRC2012_img_train.tar"
    bad.parent.mkdir()
    with tarfile.open(train_tar) as src, tarfile.open(bad, "w") as dst:
        for m in src:
            payload = src.extractfile(m).read()
            if m.name == "n00000003.tar":
                payload = __import__("gzip").compress(payload)
                m.size = len(payload)
            dst.addfile(m, io.BytesIO(payload))
    with pytest.raises(ValueError, match="ILSVRC2012_img_train.tar: n00000003.tar: .*an uncompressed tar"):
        read_source(bad, "imagenet", "train")
    # a tar cut short after it was listed: the image it cuts is skipped and named
    last = listed.items[-1]
    cut.write_bytes(data[:last.offset + last.size // 2])
    for item in listed.items:
        item.path = str(cut)
    manifest = write_dataset(listed, tmp_path / "cut-out", shard_size=8, progress=False)
    assert manifest["num_samples"] == len(listed.items) - 1
    assert manifest["skipped"] == [{"path": last.name, "reason": f"ValueError: the tar ends inside this image "
                                    f"({last.size // 2} of {last.size} bytes): {cut} is truncated"}]


def test_layout_quirks_real_trees_have(tmp_path):
    """What real copies of ImageNet hold besides images: hidden folders and files, a val split without
    the synset table, Kaggle's top folder, spreadsheet-saved label files; each either works or is named."""
    root = tmp_path / "in"
    _tree(root / "train")
    (root / "train" / ".ipynb_checkpoints").mkdir()
    (root / "train" / "__MACOSX").mkdir()
    (root / "train" / "n00000001" / "._n00000001_0.JPEG").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    train = read_source(root, "imagenet", "train")
    assert [c["id"] for c in train.classes] == ["n00000001", "n00000002"] and len(train.items) == 6
    # val without LOC_synset_mapping.txt: numbered by the train split's classes, not its own folders
    _tree(root / "val", classes=("n00000002",), per_class=2)
    val = read_source(root, "imagenet", "val")
    assert [c["id"] for c in val.classes] == ["n00000001", "n00000002"] and {i.label for i in val.items} == {1}
    _tree(root / "val", classes=("n00000009",), per_class=1)
    with pytest.raises(ValueError, match="classes the train split does not have: n00000009"):
        read_source(root, "imagenet", "val")
    # a flat val folder whose label file came from a spreadsheet (byte-order mark), one id labelled twice
    flat = tmp_path / "flat"
    _tree(tmp_path / "flatsrc", classes=("val",), per_class=2)
    (flat / "val").mkdir(parents=True)
    for i, p in enumerate(sorted((tmp_path / "flatsrc" / "val").iterdir())):
        p.rename(flat / "val" / f"ILSVRC2012_val_{i:08d}.JPEG")
    csv_rows = ["ImageId,PredictionString", "ILSVRC2012_val_00000000,n00000001 1 2 3 4",
                "ILSVRC2012_val_00000001,n00000002 1 2 3 4"]
    (flat / "LOC_val_solution.csv").write_bytes(("\ufeff" + "\r\n".join(csv_rows) + "\r\n").encode())
    assert sorted(i.label for i in read_source(flat, "imagenet", "val").items) == [0, 1]
    (flat / "LOC_val_solution.csv").write_text("\n".join([*csv_rows, "ILSVRC2012_val_00000000,n00000002 1 2 3 4"]))
    with pytest.raises(ValueError, match=r"LOC_val_solution.csv:4: ILSVRC2012_val_00000000 labelled again"):
        read_source(flat, "imagenet", "val")
    kaggle = tmp_path / "kaggle"
    (kaggle / "ILSVRC" / "Data" / "CLS-LOC").mkdir(parents=True)
    (root / "train").rename(kaggle / "ILSVRC" / "Data" / "CLS-LOC" / "train")
    with pytest.raises(ValueError, match=r"Kaggle's download: give its ILSVRC/ folder"):
        read_source(kaggle, "imagenet", "train")
    assert len(read_source(kaggle / "ILSVRC", "imagenet", "train").items) == 6
    lst = tmp_path / "l.tsv"
    lst.write_bytes(f"{kaggle}/ILSVRC/Data/CLS-LOC/train/n00000001/n00000001_1.JPEG\t1\ncaf\xe9.jpg\t2\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"l.tsv: not UTF-8 text"):
        read_source(lst, "list")
    lst.write_text("a.jpg\t2\nb.jpg\t10\nc.jpg\tcat\n")
    with pytest.raises(ValueError, match=r"l.tsv: labels mix integers and names \(entry 3: 'cat'\)"):
        read_source(lst, "list")
    lst.write_text("a.jpg\t2\nb.jpg\t1\na.jpg\t2\n")  # trained on twice an epoch, silently: refused
    with pytest.raises(ValueError, match=r"l.tsv: entry 3 lists a.jpg again \(entry 1\)"):
        read_source(lst, "list")
    lst.write_text("a.jpg\t\nb.jpg\t\n")  # no labels at all: an unlabelled source
    unlabelled = read_source(lst, "list")
    assert [i.label for i in unlabelled.items] == [-1, -1] and unlabelled.classes == []


def test_a_synset_table_names_wnids_it_lacks_and_a_half_sorted_split_is_refused(tmp_path):
    """With LOC_synset_mapping.txt, a WNID outside it (a misspelt folder, a label file's) would be a class of
    its own shifting every later number in one split and not the other; images loose beside class folders
    (a val split half sorted) would be left out silently. Both are refused, named."""
    root = tmp_path / "in"
    (root / "LOC_synset_mapping.txt").parent.mkdir(parents=True)
    (root / "LOC_synset_mapping.txt").write_text("n00000001 one\nn00000002 two\nn00000003 three\n")
    _tree(root / "train", classes=("n00000001", "n00000003"))
    _tree(root / "val", classes=("n00000001", "n00000002", "n00000003"), per_class=1)
    train, val = read_source(root, "imagenet", "train"), read_source(root, "imagenet", "val")
    assert train.classes == val.classes and [c["id"] for c in train.classes] == ["n00000001", "n00000002",
                                                                                   "n00000003"]
    _tree(root / "train", classes=("n00000004",), per_class=1)  # a typo of n00000003, say
    with pytest.raises(ValueError, match=r"train: classes not in LOC_synset_mapping.txt \(3 classes\): n00000004"):
        read_source(root, "imagenet", "train")
    # the flat val layout: a label naming a WNID the table lacks
    flat = tmp_path / "flat"
    (flat / "val").mkdir(parents=True)
    shutil.copy(root / "LOC_synset_mapping.txt", flat)
    for i in range(3):
        shutil.copy(next((root / "val" / "n00000001").iterdir()), flat / "val" / f"ILSVRC2012_val_{i:08d}.JPEG")
    rows = ["ImageId,PredictionString"] + [f"ILSVRC2012_val_{i:08d},n0000000{i + 1} 1 2 3 4" for i in range(3)]
    (flat / "LOC_val_solution.csv").write_text("\n".join(rows) + "\n")
    assert sorted(i.label for i in read_source(flat, "imagenet", "val").items) == [0, 1, 2]
    (flat / "LOC_val_solution.csv").write_text("\n".join(rows).replace("n00000003", "n00000009") + "\n")
    with pytest.raises(ValueError, match=r"LOC_val_solution.csv: classes not in LOC_synset_mapping.txt .*n00000009"):
        read_source(flat, "imagenet", "val")
    # val half sorted: 3 images sorted into n00000001/, the rest still flat beside it
    (flat / "LOC_val_solution.csv").write_text("\n".join(rows) + "\n")
    (flat / "val" / "n00000001").mkdir()
    (flat / "val" / "ILSVRC2012_val_00000000.JPEG").rename(flat / "val" / "n00000001" / "ILSVRC2012_val_00000000.JPEG")
    with pytest.raises(ValueError, match=r"val: 2 images lie directly in it \(ILSVRC2012_val_00000001.JPEG, "
                                         r"ILSVRC2012_val_00000002.JPEG\) beside its 1 class folders"):
        read_source(flat, "imagenet", "val")


def test_a_camera_jpeg_with_a_preview_picture_is_stored_whole(tmp_path):
    """Cameras and phones append a preview to their JPEGs (PIL reads them as MPO): stored as they are, at full
    size, not re-encoded from the reduced-scale decode that checks them."""
    src = tmp_path / "src" / "c0"
    src.mkdir(parents=True)
    photo = Image.fromarray(np.random.default_rng(0).integers(0, 255, (120, 160, 3), dtype=np.uint8))
    photo.save(src / "photo.jpg", format="MPO", save_all=True, append_images=[photo.resize((40, 30))])
    assert Image.open(src / "photo.jpg").format == "MPO"
    for preprocess in ("none", "max-side:200"):
        out = tmp_path / preprocess.replace(":", "")
        write_dataset(read_source(src.parent, "folder"), out, preprocess=preprocess, progress=False)
        (image,) = [m for m in read_with_webdataset(out)]
        assert image["jpg"].size == (160, 120)
        with tarfile.open(out / "shard-000000.tar") as tar:  # the file's own bytes
            assert tar.extractfile("000000000.jpg").read() == (src / "photo.jpg").read_bytes()


def test_write_refusals_and_outcomes_users_meet(tmp_path):
    src = _tree(tmp_path / "src")
    for args, expected in [  # refused before the source is read (minutes on ImageNet): even a missing one
        ((str(tmp_path / "nope"), str(tmp_path / "o"), "--shard-size", "0"), "--shard-size and --workers must be positive"),
        ((str(tmp_path / "nope"), str(tmp_path / "o"), "--preprocess", "max-side"), "expected none, max-side:N"),
    ]:
        proc = run_cli("data", "write", *args, "--layout", "folder", check=False)
        assert proc.returncode == 2 and expected in proc.stderr, proc.stderr
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "notes.txt").write_text("mine")
    for resume in (False, True):  # a directory of someone else's files is never written into
        with pytest.raises(ValueError, match="is not empty and holds no write of ours"):
            write_dataset(read_source(src, "folder"), tmp_path / "notes", resume=resume, progress=False)
    # no image readable at all: an error, and no manifest (readers of an empty dataset would wait forever)
    bad = tmp_path / "bad" / "c0"
    bad.mkdir(parents=True)
    for name in ("a.JPEG", "b.JPEG"):
        (bad / name).write_bytes(b"<html>not an image</html>")
    for _ in range(2):  # nothing left behind that a rerun would take for work done
        with pytest.raises(ValueError, match=r"none of its 2 images could be read \(first: c0/a.JPEG: "
                                             r"UnidentifiedImageError: cannot identify image file it\)"):
            write_dataset(read_source(bad.parent, "folder"), tmp_path / "empty", progress=False)
        assert not any((tmp_path / "empty").iterdir())
    # a strip too long to center-crop (its short side would be scaled up first): skipped, named
    Image.fromarray(np.zeros((1, 100000, 3), np.uint8)).save(src / "n00000001" / "strip.png")
    manifest = write_dataset(read_source(src, "folder"), tmp_path / "c", preprocess="center-crop:64", progress=False)
    assert manifest["num_samples"] == 6 and "aspect ratio of 100000x1" in manifest["skipped"][0]["reason"]
    # the same images through a symlinked root: the same shards
    (tmp_path / "link").symlink_to(src)
    again = write_dataset(read_source(tmp_path / "link", "folder"), tmp_path / "c2", preprocess="center-crop:64",
                          progress=False)
    assert [s["sha256"] for s in again["shards"]] == [s["sha256"] for s in manifest["shards"]]
    (src / "n00000002" / "gone.JPEG").symlink_to(tmp_path / "nowhere.JPEG")  # a broken link: skipped, counted
    manifest = write_dataset(read_source(src, "folder"), tmp_path / "g", progress=False)
    reasons = {s["path"]: s["reason"] for s in manifest["skipped"]}
    assert manifest["num_samples"] == 7 and reasons["n00000002/gone.JPEG"].startswith("FileNotFoundError")


def test_folder_layout_takes_images_in_sub_folders_as_imagefolder_does(tmp_path):
    src = _tree(tmp_path / "src", classes=("a", "b"), per_class=2)
    (src / "a" / "more" / "deeper").mkdir(parents=True)
    for name in ("more/x.JPEG", "more/deeper/y.JPEG"):
        (src / "a" / name).write_bytes((src / "a" / "a_0.JPEG").read_bytes())
    (src / "a" / "linked").symlink_to(src / "b", target_is_directory=True)  # a folder link: not entered (loops)
    source = read_source(src, "folder")
    names = sorted(os.path.relpath(i.path, src) for i in source.items)
    assert names == ["a/a_0.JPEG", "a/a_1.JPEG", "a/more/deeper/y.JPEG", "a/more/x.JPEG", "b/b_0.JPEG", "b/b_1.JPEG"]
    assert [i.label for i in sorted(source.items, key=lambda i: i.path)] == [0, 0, 0, 0, 1, 1]
    proc = run_cli("data", "write", str(src), str(tmp_path / "o"), "--layout", "folder", "--split", "val",
                   check=False)
    assert proc.returncode == 2 and "--split is for --layout imagenet" in proc.stderr, proc.stderr
    (tmp_path / "l.tsv").write_text(f"{src / 'a' / 'a_0.JPEG'}\t0\n{src / 'b' / 'b_0.JPEG'}\t-1\n")
    proc = run_cli("data", "write", str(tmp_path / "l.tsv"), str(tmp_path / "o"), "--layout", "list", check=False)
    assert proc.returncode == 2 and "l.tsv: entry 2 has label -1; integer labels count from 0" in proc.stderr
    proc = run_cli("data", "write", str(src), str(tmp_path / "o"), "--labels", str(tmp_path / "nope.csv"),
                   check=False)
    assert proc.returncode == 2 and "nope.csv: no such file" in proc.stderr, proc.stderr


def test_source_and_bench_mistakes_are_named(tmp_path, train_shards):
    inet = tmp_path / "inet" / "train"
    _tree(inet)
    (inet / "cats").mkdir()  # a stray class folder in ImageNet's train split
    proc = run_cli("data", "write", str(tmp_path / "inet"), str(tmp_path / "o1"), check=False)
    assert proc.returncode == 2 and "has folders that are not WNIDs (n + 8 digits): cats" in proc.stderr, proc.stderr
    val = _tree(tmp_path / "val", classes=("flat",)) / "flat"
    (tmp_path / "labels.csv").write_bytes(b"\xff\xfeI\x00m\x00")  # UTF-16, as a spreadsheet may save it
    proc = run_cli("data", "write", str(val), str(tmp_path / "o2"), "--split", "val", "--labels",
                   str(tmp_path / "labels.csv"), check=False)
    assert proc.returncode == 2 and "labels.csv: not UTF-8 text" in proc.stderr, proc.stderr
    shards = len(json.loads((train_shards / MANIFEST).read_text())["shards"])
    for args, expected in [(("--workers", str(shards + 1)), f"use --workers {shards} or fewer"),
                           (("--seconds", "0"), "--seconds must be positive")]:
        proc = run_cli("data", "bench", str(train_shards), "--resolution", "16", *args, check=False)
        assert proc.returncode == 2 and expected in proc.stderr, proc.stderr


def test_class_folders_as_imagenet_copies_leave_them(tmp_path):
    """What real copies of ImageNet hold: a class folder linked to a disk not mounted (refused, naming the link:
    left out, it would renumber every later class), a LOC_synset_mapping.txt saved with a byte-order mark
    (read), a class folder left empty by an interrupted extraction (written, with a warning naming it), and a
    list file naming one image twice through two spellings (refused)."""
    train = _tree(tmp_path / "in" / "train", classes=("n00000001", "n00000002", "n00000004"))
    (train / "n00000003").symlink_to(tmp_path / "disk2" / "n00000003")
    proc = run_cli("data", "write", str(tmp_path / "in"), str(tmp_path / "o"), check=False)
    assert proc.returncode == 2 and f"{train / 'n00000003'}: a link to {tmp_path / 'disk2' / 'n00000003'}, " \
        "which does not exist; mount what it points to, or remove the link" in proc.stderr, proc.stderr
    assert not (tmp_path / "o").exists()
    (train / "n00000003").unlink()
    (train / "n00000003").mkdir()  # empty
    for name in ("x.ppm", "y.pgm", "z.jfif"):  # torchvision's ImageFolder reads these (.jfif: a JPEG)
        Image.new("RGB", (40, 30), (200, 10, 10)).save(train / "n00000004" / name,
                                                        format={"ppm": "PPM", "pgm": "PPM", "jfif": "JPEG"}[name[2:]])
    names = "".join(f"n0000000{k} class {k}\n" for k in range(1, 5))
    (tmp_path / "in" / "LOC_synset_mapping.txt").write_bytes(b"\xef\xbb\xbf" + names.encode())
    proc = run_cli("data", "write", str(tmp_path / "in"), str(tmp_path / "o"), "--quiet")
    assert "warning: 1 of 4 classes have no images here (n00000003); they keep their class numbers" in proc.stderr
    manifest = json.loads((tmp_path / "o" / MANIFEST).read_text())
    assert [(c["id"], c["name"]) for c in manifest["classes"]] == [(f"n0000000{k}", f"class {k}") for k in range(1, 5)]
    assert manifest["num_samples"] == 12 and manifest["skipped_count"] == 0
    lines = ["train/n00000001/n00000001_0.JPEG\t0", "train/n00000001/n00000001_1.JPEG\t0",
             "./train/n00000002/../n00000001/n00000001_0.JPEG\t0"]
    (tmp_path / "in" / "list.tsv").write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"list.tsv: entry 3 lists \./train/n00000002/\.\./n00000001/n00000001_0"
                                         r"\.JPEG again \(entry 1, as train/n00000001/n00000001_0\.JPEG\)"):
        read_source(tmp_path / "in" / "list.tsv", "list")


def test_resume_needs_the_same_source(tmp_path, monkeypatch):
    from data_pipeline import writer

    a, b = _tree(tmp_path / "a"), _tree(tmp_path / "b", size=(30, 40))  # same names and count, other images

    def stop(task):
        raise KeyboardInterrupt

    monkeypatch.setattr(writer, "write_shard", stop)
    with pytest.raises(KeyboardInterrupt):
        write_dataset(read_source(a, "folder"), tmp_path / "w", shard_size=2, progress=False)
    monkeypatch.undo()
    with pytest.raises(ValueError, match="--resume with another source than the interrupted write"):
        write_dataset(read_source(b, "folder"), tmp_path / "w", shard_size=2, resume=True, progress=False)
    (a / "n00000001" / "n00000001_0.JPEG").rename(a / "n00000001" / "other.JPEG")
    with pytest.raises(ValueError, match="--resume with another source than the interrupted write"):
        write_dataset(read_source(a, "folder"), tmp_path / "w", shard_size=2, resume=True, progress=False)
    (a / "n00000001" / "other.JPEG").rename(a / "n00000001" / "n00000001_0.JPEG")
    # settings the source does not decide: refused before the source is listed (minutes on ImageNet)
    from data_pipeline import cli, sources
    monkeypatch.setattr(sources, "read_source", lambda *a, **k: pytest.fail("the source was listed"))
    for flags, said in ((["--shard-size", "3"], "shard_size: 2 then, 3 now"), (["--seed", "7"], "seed: 0 then, 7 now"),
                        (["--shard-size", "2", "--preprocess", "max-side:64"], "preprocess: 'none' then, "
                                                                                "'max-side:64' now")):
        with pytest.raises(ValueError, match=f"--resume with different settings than the interrupted write \\({said}"):
            cli.main(["write", str(a), str(tmp_path / "w"), "--layout", "folder", "--resume", *flags])
    with pytest.raises(ValueError, match=r"a/n00000001/n00000001_0.JPEG/out: cannot be created in .*not a directory"):
        cli.main(["write", str(a), str(a / "n00000001" / "n00000001_0.JPEG" / "out"), "--layout", "folder"])
    monkeypatch.undo()
    assert write_dataset(read_source(a, "folder"), tmp_path / "w", shard_size=2, resume=True,
                         progress=False)["num_samples"] == 6


def test_a_source_image_unreadable_for_a_moment_is_waited_for_and_one_gone_for_good_stops_the_write(tmp_path,
                                                                                                   monkeypatch):
    """An I/O error reading a source image (NFS, a mount that blinks) is not a bad image: the read is tried
    again and the image written; a file that keeps failing stops the write, its shard not marked done, and
    --resume completes it into the same dataset as an undisturbed write, or, with --skip-unreadable, leaves
    the file out and lists it. A file removed from its directory
    is skipped and counted as before (asking again would not bring it back)."""
    import errno
    import pathlib

    from data_pipeline import writer

    src = _tree(tmp_path / "src")
    clean = write_dataset(read_source(src, "folder"), tmp_path / "clean", shard_size=2, progress=False)
    monkeypatch.setattr(writer, "READ_RETRY_DELAYS_S", (0.01,) * 3)
    real, failures = pathlib.Path.read_bytes, {"left": 2, "calls": 0}
    flaky_name = "n00000002_1.JPEG"

    def flaky(self):
        if self.name == flaky_name:
            failures["calls"] += 1
            if failures["left"] > 0:
                failures["left"] -= 1
                raise OSError(errno.EIO, "Input/output error", str(self))
        return real(self)

    monkeypatch.setattr(pathlib.Path, "read_bytes", flaky)
    waited = write_dataset(read_source(src, "folder"), tmp_path / "waited", shard_size=2, progress=False)
    assert failures == {"left": 0, "calls": 3} and waited["skipped_count"] == 0
    assert [s["sha256"] for s in waited["shards"]] == [s["sha256"] for s in clean["shards"]]

    failures["left"] = 10 ** 9  # gone for good
    out = tmp_path / "stopped"
    with pytest.raises(RuntimeError, match=rf"{flaky_name}: still unreadable after 4 tries over 0.03 s \(Input/"
                                           r"output error\); the write stops: \d of 3 shards written to .*stopped"):
        write_dataset(read_source(src, "folder"), out, shard_size=2, workers=2, progress=False)  # via the pool
    assert not (out / MANIFEST).exists()
    plan = writer.plan_shards(read_source(src, "folder"), 2, 0)
    bad = next(i for i, entries in enumerate(plan) if any(item.path.endswith(flaky_name) for _, item in entries))
    assert not (out / writer.shard_name(bad)).exists() and (out / (writer.shard_name(bad) + ".partial")).exists()
    dead = tmp_path / "dead-sector"  # the file will never read again: the user leaves it out on --resume
    shutil.copytree(out, dead)
    with pytest.raises(RuntimeError, match="once the source reads again \\(add --skip-unreadable"):
        write_dataset(read_source(src, "folder"), dead, shard_size=2, resume=True, progress=False)
    left_out = write_dataset(read_source(src, "folder"), dead, shard_size=2, resume=True, skip_unreadable=True,
                             progress=False)
    assert left_out["num_samples"] == 5 and left_out["skipped"] == [
        {"path": f"n00000002/{flaky_name}", "reason": "I/O error on every try over 0.03 s (Input/output error)"}]
    assert verify(dead)["ok"]
    others = [s["sha256"] for i, s in enumerate(left_out["shards"]) if i != bad]  # only its own shard changed
    assert others == [s["sha256"] for i, s in enumerate(clean["shards"]) if i != bad]
    failures["left"] = 0  # the mount is back
    resumed = write_dataset(read_source(src, "folder"), out, shard_size=2, resume=True, progress=False)
    assert [s["sha256"] for s in resumed["shards"]] == [s["sha256"] for s in clean["shards"]]
    assert verify(out)["ok"]

    listed = read_source(src, "folder")  # listed, then removed before the write reads it: skipped, counted
    (src / "n00000001" / "n00000001_2.JPEG").unlink()
    gone = write_dataset(listed, tmp_path / "gone", shard_size=2, progress=False)
    assert gone["num_samples"] == 5 and gone["skipped"][0]["reason"].startswith("FileNotFoundError")
    (src / "n00000001" / "loop.jpg").symlink_to("loop.jpg")  # a link to itself (ELOOP): no use asking again
    looped = write_dataset(read_source(src, "folder"), tmp_path / "loop", shard_size=2, progress=False)
    assert [(s["path"], s["reason"].split(":")[0]) for s in looped["skipped"]] == [("n00000001/loop.jpg", "OSError")]


def test_manifest_damage_is_named(tmp_path):
    src = _tree(tmp_path / "src")
    write_dataset(read_source(src, "folder"), tmp_path / "d", shard_size=4, progress=False)
    manifest = json.loads((tmp_path / "d" / MANIFEST).read_text())
    (tmp_path / "d" / MANIFEST).write_text(json.dumps({**manifest, "num_samples": 999}))
    report = verify(tmp_path / "d")
    assert not report["ok"] and "manifest: num_samples 999, its shards count 6" in report["problems"]
    del manifest["num_classes"]
    (tmp_path / "d" / MANIFEST).write_text(json.dumps(manifest))
    proc = run_cli("data", "info", str(tmp_path / "d"), check=False)
    assert proc.returncode == 2 and "manifest.json: lacks num_classes" in proc.stderr, proc.stderr
    from data_pipeline.loader import StreamLoader

    (tmp_path / "d" / MANIFEST).write_text(json.dumps({**manifest, "num_classes": 2, "num_samples": 0}))
    with pytest.raises(ValueError, match="a dataset of 0 samples"):
        StreamLoader(tmp_path / "d", 16, 4)
    for edit, expected in [  # fields a reader relies on, edited: named, not a KeyError later
        ({"shards": []}, "shards is [], expected a non-empty list"),
        ({"shards": [{k: v for k, v in manifest["shards"][0].items() if k != "count"}]},
         "shards[0].count is null, expected a non-negative integer"),
        ({"shards": [{**manifest["shards"][0], "name": "../x/shard-000000.tar"}]},
         "shards[0].name is \"../x/shard-000000.tar\", expected a file name in the dataset's directory"),
        ({"num_classes": "2"}, "num_classes is \"2\", expected a count")]:
        (tmp_path / "d" / MANIFEST).write_text(json.dumps({**manifest, "num_classes": 2, **edit}))
        for command in (["info"], ["verify", "--quiet"]):
            proc = run_cli("data", *command, str(tmp_path / "d"), check=False)
            assert proc.returncode in (1, 2) and expected in proc.stdout + proc.stderr, proc.stdout + proc.stderr
        with pytest.raises(ValueError, match=re.escape(expected)):
            StreamLoader(tmp_path / "d", 16, 4)
