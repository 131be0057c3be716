"""The streaming loader: deterministic order, exact resume, world-size independence, corruption, transforms."""

import io
import json
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from data_pipeline.loader import StreamLoader, merge_states
from data_pipeline.sources import read_source
from data_pipeline.transforms import SampleRandom, Transform
from data_pipeline.writer import MANIFEST, write_dataset
from imagenet_fixture import make_imagenet

N = 122  # samples in the fixture's train split


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagenet")
    make_imagenet(root)
    base = tmp_path_factory.mktemp("shards")
    source = read_source(root, "imagenet", "train")
    write_dataset(source, base / "orig", shard_size=8, progress=False)  # 16 shards
    write_dataset(source, base / "crop", shard_size=8, preprocess="center-crop:32", progress=False)
    return root, base


def take(loader, n_batches):
    ids, it = [], iter(loader)
    for _ in range(n_batches):
        ids += next(it)["id"].tolist()
    return ids


def loader(path, **kw):
    args = dict(resolution=32, batch_size=5, num_slots=4, seed=3)
    return StreamLoader(path, **{**args, **kw})


@pytest.mark.parametrize("workers", [0, 2])
def test_order_is_deterministic_and_resume_is_exact(data, workers):
    path = data[1] / "crop"
    full = take(loader(path, num_workers=workers), 20)
    assert full == take(loader(path, num_workers=workers), 20)
    assert full == take(loader(path, num_workers=workers, persistent_workers=True), 20)
    for k in (0, 3, 7):
        first = loader(path, num_workers=workers)
        head = take(first, k)
        state = json.loads(json.dumps(first.state_dict()))  # as saved in a checkpoint
        second = loader(path, num_workers=workers)
        second.load_state_dict(state)
        assert head + take(second, 20 - k) == full, f"resume after {k} batches"


def epoch0(loaders):
    """Consume from every loader until all its slots are past epoch 0; return the epoch-0 ids."""
    ids = []
    for ld in loaders:
        it = iter(ld)
        slots_of_rank = None
        while True:
            b = next(it)
            ids += [i for i, p in zip(b["id"].tolist(), b["pos"].tolist()) if p[1] == 0]
            slots_of_rank = slots_of_rank or {s for s in range(ld.args["num_slots"])
                                              if s % ld.args["world_size"] == ld.args["rank"]}
            if all(ld.slots.get(str(s), {}).get("pos", {}).get("epoch", 0) >= 1 for s in slots_of_rank):
                break
    return ids


def test_the_order_is_a_fresh_uniform_shuffle_for_each_seed_and_epoch(data):
    """data_pipeline.order's promise: each epoch deals every shard once over the slots and reads every sample of a
    shard once, both shuffled anew from (seed, epoch). Checked against what a uniform shuffle must give, not
    against the generator calls: over 800 epochs each of a shard's 8 samples comes first about 1/8 of the time
    and each of 16 shards leads slot 0 about 1/16 of it (bounds of 5 binomial standard deviations); another
    seed is another order, and so is the loader's stream with another seed."""
    from collections import Counter

    from data_pipeline.order import Order

    order, epochs = Order([8] * 16, 4, seed=3), 800
    first_sample, first_shard = Counter(), Counter()
    for e in range(epochs):
        dealt = [order.shards_of(slot, e) for slot in range(4)]
        assert sorted(sum(dealt, [])) == list(range(16)) and {len(d) for d in dealt} == {4}
        for shard in range(16):
            assert sorted(order.sample_order(shard, e).tolist()) == list(range(8))
        first_sample[int(order.sample_order(5, e)[0])] += 1
        first_shard[dealt[0][0]] += 1
    assert all(abs(first_sample[i] - epochs / 8) <= 5 * (epochs * 1 / 8 * 7 / 8) ** 0.5 for i in range(8)), first_sample
    assert all(abs(first_shard[i] - epochs / 16) <= 5 * (epochs * 1 / 16 * 15 / 16) ** 0.5 for i in range(16)), \
        first_shard
    other = Order([8] * 16, 4, seed=4)
    assert [other.shards_of(s, 0) for s in range(4)] != [order.shards_of(s, 0) for s in range(4)]
    assert [other.sample_order(s, 0).tolist() for s in range(16)] != \
        [order.sample_order(s, 0).tolist() for s in range(16)]
    path = data[1] / "crop"
    assert take(loader(path, seed=4), 4) != take(loader(path), 4)


@pytest.mark.parametrize("world", [1, 2, 4])
def test_one_epoch_is_exactly_the_dataset_at_any_world_size(data, world):
    ids = epoch0([loader(data[1] / "crop", rank=r, world_size=world) for r in range(world)])
    assert len(ids) == N and sorted(ids) == list(range(N))


def test_resume_at_another_world_size_neither_repeats_nor_skips(data):
    path = data[1] / "crop"
    before = [loader(path, rank=r, world_size=2) for r in range(2)]
    seen = []
    for ld in before:
        it = iter(ld)
        for _ in range(4):
            b = next(it)
            seen += [i for i, p in zip(b["id"].tolist(), b["pos"].tolist()) if p[1] == 0]
    state = merge_states([ld.state_dict() for ld in before])
    after = [loader(path, rank=r, world_size=4) for r in range(4)]
    for ld in after:
        ld.load_state_dict(state)
    rest = epoch0(after)
    assert len(seen) == 40 and sorted(seen + rest) == list(range(N))


@pytest.mark.parametrize("workers", [0, 2])
def test_resumed_twice_at_the_same_world_size_is_exact(data, workers):
    """Each resume loads the merged state of every rank; the next save must still carry each rank's own,
    current positions (not another rank's copy of them from the last resume), and count skips once."""
    path = data[1] / "crop"
    make = lambda r: loader(path, rank=r, world_size=2, num_slots=8, num_workers=workers)  # noqa: E731
    full = [take(make(r), 12) for r in range(2)]
    got, loaders, state = [[], []], [make(r) for r in range(2)], None
    for n in (3, 4, 5):  # interrupted twice
        for r, ld in enumerate(loaders):
            if state is not None:
                ld.load_state_dict(json.loads(json.dumps(state)))
            got[r] += take(ld, n)
        state = merge_states([ld.state_dict() for ld in loaders])
        loaders = [make(r) for r in range(2)]
    assert got == full and sorted(map(int, state["slots"])) == list(range(8))
    for ld in loaders:
        ld.load_state_dict({**state, "skipped": 5})  # 5 bad samples met by the ranks together so far
    assert merge_states([ld.state_dict() for ld in loaders])["skipped"] == 5


@pytest.mark.parametrize("before", [4, 5])
def test_a_resume_after_a_world_size_change_resumes_exactly_at_that_size(data, before):
    """2 ranks without workers, then 1 rank with 2 workers, interrupted there and resumed at that size: the
    same batches as without the second interruption (the workers' turn restarts at the change of layout, not at
    batch 0), for an odd and an even number of batches before the change."""
    path = data[1] / "crop"
    ranks = [loader(path, rank=r, world_size=2) for r in range(2)]
    for ld in ranks:
        take(ld, before)
    changed = json.loads(json.dumps(merge_states([ld.state_dict() for ld in ranks])))

    def one_rank(state):
        ld = loader(path, num_workers=2)
        ld.load_state_dict(json.loads(json.dumps(state)))
        return ld

    full = take(one_rank(changed), 9)
    first = one_rank(changed)
    head = take(first, 3)
    assert head + take(one_rank(merge_states([first.state_dict()])), 6) == full


def test_state_from_other_settings_is_refused(data):
    ld = loader(data[1] / "crop")
    state = ld.state_dict()
    with pytest.raises(ValueError, match="num_slots"):
        loader(data[1] / "crop", num_slots=8).load_state_dict(state)
    with pytest.raises(ValueError, match="slots do not divide over world size x workers = 3 x 1"):
        loader(data[1] / "crop", world_size=3)  # at construction, before a worker starts
    with pytest.raises(ValueError, match="every slot needs at least one shard"):
        loader(data[1] / "crop", num_slots=32)


def test_corrupt_samples_and_truncated_shards_are_skipped_and_counted(data, tmp_path):
    import shutil
    path = tmp_path / "bad"
    shutil.copytree(data[1] / "orig", path)
    manifest = json.loads((path / MANIFEST).read_text())
    # shard 0: one image replaced by garbage, one by zero bytes, one .cls removed
    name = path / manifest["shards"][0]["name"]
    with tarfile.open(name) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar]
    keys = sorted({m.name.split(".")[0] for m, _ in members})
    broken = {f"{keys[0]}.jpg": b"garbage" * 20, f"{keys[1]}.jpg": b""}
    with tarfile.open(name, "w") as tar:
        for m, payload in members:
            if m.name == f"{keys[2]}.cls":
                continue
            payload = broken.get(m.name, payload)
            m.size = len(payload)
            tar.addfile(m, io.BytesIO(payload))
    # shard 5: truncated in the middle
    t = path / manifest["shards"][5]["name"]
    t.write_bytes(t.read_bytes()[: t.stat().st_size // 2])
    # which samples of the truncated shard survive, read independently with tarfile
    survivors, parts = set(), {}
    try:
        with tarfile.open(t, "r|") as tar:
            for m in tar:
                key, _, ext = m.name.partition(".")
                tar.extractfile(m).read()
                parts.setdefault(key, set()).add(ext)
                if {"jpg", "cls"} <= parts[key]:
                    survivors.add(int(key))
    except tarfile.TarError:
        pass
    first5 = int(manifest["shards"][5]["first_key"])
    lost = set(range(first5, first5 + manifest["shards"][5]["count"])) - survivors
    assert 0 < len(lost) < 8
    ld = loader(path, num_slots=1, batch_size=4)
    ids = epoch0([ld])
    assert sorted(ids) == sorted(set(range(N)) - {int(k) for k in keys[:3]} - lost)
    assert ld.skipped >= 3 + len(lost)
    (path / manifest["shards"][7]["name"]).unlink()
    with pytest.raises(FileNotFoundError, match="missing: shard-000007.tar"):
        loader(path)


def _rewrite_shard(path, edit):
    """Rewrite a tar's members through edit(name, payload) -> payload (None drops the member)."""
    with tarfile.open(path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar]
    with tarfile.open(path, "w") as tar:
        for m, payload in members:
            payload = edit(m.name, payload)
            if payload is not None:
                m.size = len(payload)
                tar.addfile(m, io.BytesIO(payload))


def test_labels_outside_the_class_table_and_damaged_headers_are_skipped_counted_and_said(data, tmp_path, caplog):
    import shutil
    path = tmp_path / "bad"
    shutil.copytree(data[1] / "crop", path)
    manifest = json.loads((path / MANIFEST).read_text())
    k = manifest["num_classes"]
    first = manifest["shards"][0]
    bad_labels = {f"{int(first['first_key']):09d}": str(k), f"{int(first['first_key']) + 1:09d}": "-1"}
    shard0 = path / first["name"]
    _rewrite_shard(shard0, lambda name, payload: bad_labels.get(name.split(".")[0], payload.decode()).encode()
                   if name.endswith(".cls") else payload)
    keys0 = sorted({int(m.split(".")[0]) for m in tarfile.open(shard0).getnames()})
    assert {int(key) for key in bad_labels} <= set(keys0)
    # shard 3: the header of its 4th sample's image flipped: tarfile reads that as the end of the archive
    shard3 = path / manifest["shards"][3]["name"]
    with tarfile.open(shard3) as tar:
        offsets = [m.offset for m in tar]
        keys3 = [int(m.name.split(".")[0]) for m in tar]
    raw = bytearray(shard3.read_bytes())
    raw[offsets[9]:offsets[9] + 100] = bytes(100)  # members: image, cls, json per sample
    shard3.write_bytes(bytes(raw))
    lost3 = set(keys3[9:])
    ld = loader(path, num_slots=1, batch_size=4)
    with caplog.at_level("WARNING", logger="data_pipeline.loader"):
        ids = epoch0([ld])
        labels_seen = set()
        for batch in [next(iter(loader(path, num_slots=1, batch_size=50)))]:
            labels_seen |= set(batch["label"].tolist())
    assert sorted(ids) == sorted(set(range(N)) - {int(key) for key in bad_labels} - lost3)
    assert ld.skipped == len(bad_labels) + len(lost3)
    assert labels_seen <= set(range(k))
    text = caplog.text
    assert f"label {k} outside the {k} classes" in text and "label -1 outside" in text
    assert f"shard {shard3.name} is damaged (the tar ends early): 3 of 8 samples readable" in text


def test_a_reader_whose_every_shard_is_damaged_stops_with_the_reason_instead_of_looping(data, tmp_path):
    import shutil
    path = tmp_path / "dead"
    shutil.copytree(data[1] / "crop", path)
    for shard in json.loads((path / MANIFEST).read_text())["shards"]:
        (path / shard["name"]).write_bytes(b"")
    for workers in (0, 1):
        with pytest.raises(Exception, match="without one usable sample .*every shard of the dataset is damaged"):
            take(loader(path, num_slots=2, num_workers=workers), 1)


def test_a_reader_with_one_shard_an_epoch_skips_a_damaged_shard_and_goes_on(data, tmp_path):
    """A slot per reader (the classifier's validation reads num_slots = world): the reader that draws the
    damaged shard loses its samples, counted, and reads on through the epochs after it."""
    import shutil
    path = tmp_path / "one-bad"
    shutil.copytree(data[1] / "crop", path)
    shards = json.loads((path / MANIFEST).read_text())["shards"]
    (path / shards[2]["name"]).write_bytes(b"")
    lost = set(range(int(shards[2]["first_key"]), int(shards[2]["first_key"]) + shards[2]["count"]))
    world = len(shards)  # 16 readers, one shard each an epoch
    loaders = [loader(path, num_slots=world, rank=r, world_size=world, batch_size=4) for r in range(world)]
    ids = epoch0(loaders)
    assert sorted(ids) == sorted(set(range(N)) - lost)
    for ld in loaders:  # and three epochs more, each reader meeting the damaged shard at random
        it = iter(ld)
        seen = {p[1] for _ in range(12) for p in next(it)["pos"].tolist()}
        assert max(seen) >= 3
    assert sum(ld.skipped for ld in loaders) >= len(lost)


def test_an_image_too_thin_to_crop_within_memory_is_skipped(tmp_path):
    from data_pipeline.preprocess import MAX_SCALED_PIXELS

    src = tmp_path / "src"
    for c in ("a", "b"):
        (src / c).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((20, 24, 3), 40 * i, np.uint8)).save(src / c / f"{i}.png")
    Image.new("RGB", (1, 40_000)).save(src / "a" / "strip.png")  # at 128: 1 x 40000 -> 128 x 5.1M pixels
    assert 40_000 * 128 ** 2 > MAX_SCALED_PIXELS
    write_dataset(read_source(src, "folder"), tmp_path / "d", shard_size=7, progress=False)
    ld = StreamLoader(tmp_path / "d", 128, 6, num_slots=1)
    batch = next(iter(ld))
    assert len(batch["id"]) == 6 and ld.skipped == 1


def test_write_time_crop_equals_load_time_crop_bit_for_bit(data):
    crop = loader(data[1] / "crop", flip=False, jpeg_draft=False)
    orig = loader(data[1] / "orig", flip=False, jpeg_draft=False)
    a, b = next(iter(crop)), next(iter(orig))
    assert a["id"].tolist() == b["id"].tolist()
    assert torch.equal(a["image"], b["image"])


def test_transforms(data):
    gd_data = pytest.importorskip("guided_diffusion.image_datasets")
    root = data[0]
    photo = (root / "train" / "n00000010" / "n00000010_0.JPEG").read_bytes()
    rng = lambda: SampleRandom(0)  # noqa: E731
    exact = Transform(64, flip=False, jpeg_draft=False)(photo, rng())["image"]
    with Image.open(io.BytesIO(photo)) as im:
        ref = gd_data.center_crop_arr(im.convert("RGB"), 64)
    assert exact.dtype == np.uint8 and np.array_equal(exact, ref.transpose(2, 0, 1))
    drafted = Transform(64, flip=False, jpeg_draft=True)(photo, rng())["image"]
    # draft decoding (an opt-in for speed) moves pixels by a few of 255 levels on average on this photograph
    assert 1.0 < np.abs(drafted.astype(float) - exact).mean() < 8.0
    t = Transform(48, crop="random-resized", flip=True, small_size=12)
    a, b = t(photo, SampleRandom(1)), t(photo, SampleRandom(1))
    assert np.array_equal(a["image"], b["image"]) and a["image"].shape == (3, 48, 48)
    assert not np.array_equal(a["image"], t(photo, SampleRandom(2))["image"])
    low = torch.nn.functional.interpolate(torch.from_numpy(a["image"]).float()[None], size=12, mode="area")[0]
    torch.testing.assert_close(torch.from_numpy(a["low_res"]), low, rtol=0, atol=1e-4)
    flips = [Transform(32, flip=True)(photo, SampleRandom(s))["image"] for s in range(40)]
    unflipped = Transform(32, flip=False)(photo, rng())["image"]
    n_flipped = sum(np.array_equal(f, unflipped[:, :, ::-1]) for f in flips)
    assert 8 <= n_flipped <= 32


def test_upsampler_patches_are_aligned_crops_of_the_image_and_its_low_res(data):
    """patch: the crop of the whole image's output at a random multiple of the upsampling factor, its low_res the
    same crop of the whole image's low_res (area averaging at whole low-resolution pixels); every offset occurs."""
    photo = (data[0] / "train" / "n00000010" / "n00000010_0.JPEG").read_bytes()
    whole, patched = Transform(48, flip=True, small_size=12), Transform(48, flip=True, small_size=12, patch=16)
    offsets = set()
    for seed in range(1000):  # fixed seeds; uniform draws would miss one of the 81 offsets with probability < 1e-3
        full, p = whole(photo, SampleRandom(seed)), patched(photo, SampleRandom(seed))  # the same flip draw
        assert p["image"].shape == (3, 16, 16) and p["low_res"].shape == (3, 4, 4)
        windows = np.lib.stride_tricks.sliding_window_view(full["image"], (16, 16), axis=(1, 2))  # (3, 33, 33, 16, 16)
        found = [tuple(int(v) for v in yx) for yx in np.argwhere((windows == p["image"][:, None, None]).all((0, 3, 4)))]
        assert found and all(y % 4 == 0 and x % 4 == 0 for y, x in found), found
        y, x = found[0]
        np.testing.assert_allclose(p["low_res"], full["low_res"][:, y // 4:y // 4 + 4, x // 4:x // 4 + 4],
                                   rtol=0, atol=1e-4)
        offsets.add((y, x))
    assert offsets == {(y, x) for y in range(0, 33, 4) for x in range(0, 33, 4)}  # 81 of them, each reachable
    for kw in (dict(patch=16), dict(small_size=12, patch=18), dict(small_size=12, patch=48)):
        with pytest.raises(ValueError, match=f"patch {kw['patch']}: needs small_size, must be less than resolution 48"):
            Transform(48, **kw)


def test_sample_random_is_uniform_and_keyed():
    draws = np.array([SampleRandom(7, i).random() for i in range(20000)])
    assert abs(draws.mean() - 0.5) < 0.01 and abs(draws.var() - 1 / 12) < 0.003
    assert SampleRandom(1, 2, 3).random() == SampleRandom(1, 2, 3).random() != SampleRandom(1, 2, 4).random()
    ints = [SampleRandom(3, i).integers(5, 9) for i in range(4000)]
    assert set(ints) == {5, 6, 7, 8}


def test_npy_shards_load_like_png_shards(data, tmp_path):
    root = data[0]
    write_dataset(read_source(root, "imagenet", "train"), tmp_path / "npy", shard_size=8,
                  preprocess="center-crop:32", image_format="npy", progress=False)
    a = next(iter(loader(tmp_path / "npy", flip=True)))
    b = next(iter(loader(data[1] / "crop", flip=True)))
    assert a["id"].tolist() == b["id"].tolist() and torch.equal(a["image"], b["image"])
    assert a["image"].min() >= -1 and a["image"].max() <= 1 and a["image"].dtype == torch.float32


def test_a_shard_is_held_once_while_it_is_read(tmp_path):
    """read_shard streams the tar: at its peak it holds the samples and a read buffer, not the file's bytes
    as well (reading the file whole first peaked at twice the shard). The samples equal tarfile's reading."""
    import tracemalloc

    from data_pipeline.loader import read_shard

    rng = np.random.default_rng(0)
    payloads = {f"{i:06d}.{ext}": (rng.bytes(400_000) if ext == "npy" else str(i % 10).encode())
                for i in range(10) for ext in ("npy", "cls")}
    shard = tmp_path / "shard.tar"
    with tarfile.open(shard, "w") as tar:
        for name, data in payloads.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    size = shard.stat().st_size
    tracemalloc.start()
    try:
        samples, error = read_shard(shard)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert error is None
    with tarfile.open(shard) as tar:  # the oracle: the standard library's reader
        expected = {m.name: tar.extractfile(m).read() for m in tar}
    assert {f"{k}.{e}": v for k, parts in samples.items() for e, v in parts.items()} == expected
    assert peak < size + 2 * (1 << 20), f"peak {peak} bytes for a {size}-byte shard"


def test_a_shard_unreadable_for_a_moment_loses_nothing_and_one_gone_for_good_stops_clearly(data, monkeypatch,
                                                                                             capsys):
    """An NFS hiccup (EIO on a shard's reads, at its start and halfway through) is waited out, so no sample
    of the epoch is lost; a shard that stays unreadable stops the stream with an error naming it, instead of
    skipping its samples (the state would move past them) or looping forever over a node's missing data."""
    import errno
    import os
    import time

    from data_pipeline import loader as loader_module
    from data_pipeline import patient_read

    path = data[1] / "orig"
    name = json.loads((path / MANIFEST).read_text())["shards"][3]["name"]
    monkeypatch.setattr(loader_module, "READ_RETRY_DELAYS_S", (0.01,) * 5)
    monkeypatch.setattr(loader_module, "SHARD_READ_BYTES", 4096)  # many reads per shard: some fail midway
    failures = {"left": 2, "reads": 0, "always": False}

    class Flaky:
        """The shard's file: its first read and its fifth fail once each (EIO), or, gone for good, every one."""

        def __init__(self, file):
            self.file = file

        def readinto(self, buffer):
            failures["reads"] += 1
            if failures["left"] > 0 and (failures["reads"] in (1, 5) or failures["always"]):
                failures["left"] -= 1
                raise OSError(errno.EIO, "Input/output error", str(self.file.name))
            return self.file.readinto(buffer)

        def __getattr__(self, attr):
            return getattr(self.file, attr)

    def flaky_open(file, *args, **kwargs):
        opened = open(file, *args, **kwargs)
        return Flaky(opened) if os.path.basename(file) == name else opened

    monkeypatch.setattr(patient_read, "open", flaky_open, raising=False)
    ld = loader(path, num_slots=1, batch_size=4)
    assert sorted(epoch0([ld])) == list(range(N)) and ld.skipped == 0 and failures["left"] == 0
    assert failures["reads"] > 5  # the second failure came partway through the shard, which resumed at its offset
    failures.update(left=10 ** 9, always=True)  # gone for good
    start = time.monotonic()
    with pytest.raises(OSError, match=f"{name}: still unreadable after 6 tries over 0.05 s \\(Input/output error"):
        epoch0([loader(path, num_slots=1, batch_size=4)])
    assert time.monotonic() - start < 30
    from adm.cli import run_guarded
    from data_pipeline.cli import main

    # through a command: one line saying so, no traceback
    assert run_guarded(main, ["bench", str(path), "--resolution", "16", "--seconds", "1"]) == 2
    assert f"{name}: still unreadable after 6 tries" in capsys.readouterr().err.splitlines()[-1]


def test_iterating_again_keeps_no_file_open_and_exit_still_kills_the_workers(data, tmp_path):
    """Each iter() with workers kept two pipe descriptors per worker open until exit (the exit hook held
    the Process objects); a process that exits on an exception with the iterator alive still ends at once
    and leaves no worker behind (the workers ignore SIGTERM, so multiprocessing's own exit would wait)."""
    import gc
    import os
    import subprocess
    import sys
    import time

    ld = loader(data[1] / "crop", num_workers=2)
    for _ in range(2):  # the first iterators open what stays open anyway (imports, the manifest's caches)
        it = iter(ld)
        next(it)
        del it
    gc.collect()
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(8):
        it = iter(ld)
        next(it)
        del it
    gc.collect()
    assert len(os.listdir("/proc/self/fd")) <= before + 2  # was + 32
    script = tmp_path / "dies.py"
    script.write_text(f"""
import os, sys
sys.path.insert(0, {str(__import__("pathlib").Path(__file__).parents[1])!r})
from data_pipeline.loader import StreamLoader
it = iter(StreamLoader({str(data[1] / "crop")!r}, resolution=32, batch_size=5, num_slots=4, seed=3, num_workers=2))
next(it)
print(" ".join(str(w.pid) for w in it.gi_frame.f_locals["batches"]._workers), flush=True)
KEEP = it
raise SystemExit("stopping with the iterator alive")
""")
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "stopping with the iterator alive" in proc.stderr, proc.stderr
    pids = [int(x) for x in proc.stdout.split()]
    assert len(pids) == 2
    time.sleep(0.5)  # (killed before the process ended; init reaps them)
    assert not [pid for pid in pids if os.path.exists(f"/proc/{pid}")
                and "(python" in open(f"/proc/{pid}/stat").read()]


@pytest.mark.parametrize("workers", [0, 2])
def test_a_resume_counts_each_bad_sample_once(data, tmp_path, workers):
    """Bad samples at a shard's end are counted in the next batch, which another slot may fill: its
    consumption now moves their slot past them too. The slot stayed before them, so a resume read and
    counted them again (the skipped count, and TensorBoard's data-pipeline skips, grew with every resume)."""
    import shutil

    path = tmp_path / "bad"
    shutil.copytree(data[1] / "orig", path)
    for shard in sorted(path.glob("shard-*.tar"))[::3]:  # tails cut: their last samples lost
        shard.write_bytes(shard.read_bytes()[: shard.stat().st_size * 2 // 3])
    n = 40  # batches: past the first epoch

    def run(state, batches):
        ld = loader(path, num_workers=workers)
        if state is not None:
            ld.load_state_dict(json.loads(json.dumps(state)))
        it = iter(ld)
        ids = [i for _ in range(batches) for i in next(it)["id"].tolist()]
        return ids, ld

    full_ids, full = run(None, n)
    assert full.skipped > 0
    for k in range(1, n, 3):
        head, first = run(None, k)
        tail, second = run(first.state_dict(), n - k)
        assert head + tail == full_ids
        assert second.skipped == full.skipped, k


def test_another_worker_count_changes_the_order_not_the_epoch(data):
    """Why a resume with another data_workers is not bit-identical (and the trainer says so): each rank's
    batches take turns between its workers' slots, so the worker count orders the batches; the epoch's
    samples, each slot's own stream and 0 against 1 worker do not change."""
    from trainer.loop import order_change

    path = data[1] / "crop"
    one, two, none = (take(loader(path, num_workers=w), 24) for w in (1, 2, 0))
    assert one == none and one != two
    assert sorted(epoch0([loader(path, num_workers=1)])) == sorted(epoch0([loader(path, num_workers=2)])) \
        == list(range(N))
    assert order_change(2, 1, elastic=False).startswith("data_workers 1, was 2: the batches come in another order")
    assert order_change(0, 1, elastic=False) is None and order_change(2, 1, elastic=True) is None


def test_data_bench_with_a_worker_count_that_does_not_divide_64(data, tmp_path):
    """More than 64 shards (every ImageNet write) and 3 workers: the benchmark picks a slot count its loader
    takes (whole slots per worker), instead of 64."""
    from data_pipeline.bench import measure

    root, _ = data
    write_dataset(read_source(root, "imagenet", "train"), tmp_path / "many", shard_size=1, progress=False)  # 122
    result = measure(tmp_path / "many", 32, workers=3, seconds=0.2, batch_size=4, warmup_batches=1)
    assert result["workers"] == 3 and result["images"] > 0


def test_the_manifest_is_read_once_and_kept_without_what_no_reader_uses(data, monkeypatch):
    """ImageNet's manifest lists 1.28M tar offsets (18 MB of JSON, 48 MB of Python objects): the loader reads it
    once for its check and all its iterators, and keeps neither the offsets nor the skipped images' list, in
    the rank nor in the workers it forks. The stream is the same."""
    import data_pipeline.loader as loader_module

    _, base = data
    want = take(loader(base / "orig", num_workers=2), 6)
    reads, real = [], loader_module.read_manifest
    monkeypatch.setattr(loader_module, "read_manifest", lambda d: reads.append(d) or real(d))
    it = loader(base / "orig", num_workers=2)
    assert take(it, 6) == want and take(it, 1) and reads == [base / "orig"]
    assert "skipped" not in it.manifest and not any("offsets" in s for s in it.manifest["shards"])
    assert all(s["offsets"] for s in json.loads((base / "orig" / MANIFEST).read_text())["shards"])  # (on disk)


@pytest.mark.parametrize("workers", [0, 2])
def test_decoding_on_threads_gives_the_same_stream(data, workers):
    """decode_threads decodes a shard's samples on threads (PIL lets go of the GIL), a window at a time, and
    hands them on in order: the same images, labels and positions as one thread, batch for batch; a resume
    from its state goes on alike."""
    _, base = data
    one, threaded = (loader(base / "orig", num_workers=workers, crop="random-resized", decode_threads=t)
                     for t in (0, 3))
    for a, b in zip(iter(one), iter(threaded)):
        for k in ("image", "label", "id", "pos"):
            assert torch.equal(a[k], b[k]), k
        if a["pos"][0, 1] > 0:  # into the second epoch
            break
    state = threaded.state_dict()
    again = loader(base / "orig", num_workers=workers, crop="random-resized", decode_threads=3)
    again.load_state_dict(state)
    assert take(again, 3) == take(one, 3)
