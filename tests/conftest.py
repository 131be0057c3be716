import atexit
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

# The suite tests the CPU path (gloo, bit-exact resume, 2 ranks on any machine), on a GPU machine too: there
# `adm train --nproc 2` would need 2 GPUs and bit-exactness does not hold. bench/device_checks.py holds the GPU
# checks. Set before torch initialises CUDA, and inherited by every process the tests start.
os.environ["CUDA_VISIBLE_DEVICES"] = ""
# `adm eval compare/metrics` keep a reference's features between calls (~/.cache/adm): the suite's own cache,
# empty at its start and gone at its end, so no test depends on what an earlier run left there
os.environ["ADM_CACHE"] = tempfile.mkdtemp(prefix="adm-test-cache-")
atexit.register(shutil.rmtree, os.environ["ADM_CACHE"], True)

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
LAYOUTS = Path(__file__).parent / "data" / "adm-state-dict-layouts.json"

# The test suite is CPU-only and small: keep torch from oversubscribing CI's two cores.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


SLOW_LIST = Path(__file__).parent / "slow_in_ci.txt"


def pytest_addoption(parser):
    parser.addoption("--slow", choices=("all", "listed", "none"), default="all",
                     help="which tests marked slow to run: all (plain pytest), those named in tests/slow_in_ci.txt "
                          "(the README's test command, so CI stays within its time), or none")


def listed_slow_tests(path: Path) -> list[str]:
    """Test files or node ids, one per line; '#' starts a comment."""
    return [line.split("#", 1)[0].strip() for line in path.read_text().splitlines() if line.split("#", 1)[0].strip()]


def pytest_collection_modifyitems(config, items):
    mode = config.getoption("--slow")
    if mode == "all":
        return
    path = Path(os.environ.get("ADM_SLOW_LIST", SLOW_LIST))
    listed = listed_slow_tests(path) if mode == "listed" else []
    slow = [item for item in items if item.get_closest_marker("slow")]

    def named(item, entry):
        return item.nodeid == entry or item.nodeid.startswith((entry + "::", entry + "["))

    for entry in listed:
        if not any(named(item, entry) for item in slow):
            raise pytest.UsageError(f"{path}: {entry!r} names no collected test marked slow")
    drop = [item for item in slow if not any(named(item, entry) for entry in listed)]
    if drop:
        config.hook.pytest_deselected(items=drop)
        dropped = set(drop)
        items[:] = [item for item in items if item not in dropped]


@pytest.fixture(scope="session")
def released_layouts() -> dict:
    """Keys, shapes, flags and parameter counts of OpenAI's released ADM checkpoints."""
    return json.loads(LAYOUTS.read_text())


def randomize_(module: torch.nn.Module, seed: int = 0, scale: float = 0.1) -> torch.nn.Module:
    """Overwrite every parameter with seeded noise (zero-initialised layers would hide differences)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype) * scale)
    return module


def run_cli(*args: str, check: bool = True, cwd=None) -> subprocess.CompletedProcess:
    """Run the `adm` command line as a user would, in a fresh interpreter."""
    proc = subprocess.run([sys.executable, "-m", "adm", *args], capture_output=True, text=True,
                          cwd=cwd or REPO, env={**os.environ, "COLUMNS": "200"})
    if check and proc.returncode != 0:
        raise AssertionError(f"adm {' '.join(args)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="session")
def digit_shards(tmp_path_factory) -> Path:
    """Real handwritten digits (+ two photographs), 11 classes, as shards: `train` (center-crop 32,
    402 images), `train64` (center-crop 64) and `val` (30 held-out digits), in one directory."""
    from imagenet_fixture import make_imagenet

    from data_pipeline.sources import read_source
    from data_pipeline.writer import write_dataset

    root = tmp_path_factory.mktemp("digits")
    make_imagenet(root, per_class=40)
    out = tmp_path_factory.mktemp("digit_shards")
    for name, split, size, shard in (("train", "train", 32, 16), ("train64", "train", 64, 16), ("val", "val", 32, 8)):
        write_dataset(read_source(root, "imagenet", split), out / name, shard_size=shard,
                      preprocess=f"center-crop:{size}", image_format="npy", progress=False)
    return out


@pytest.fixture(scope="session")
def slurm_cluster():
    """The real single-node Slurm of slurm/local_cluster.sh, on ports of its own, for the whole session."""
    if os.geteuid() != 0 and subprocess.run(["sudo", "-n", "true"], capture_output=True).returncode != 0:
        pytest.skip("the local Slurm needs root (or passwordless sudo) to install and run its daemons")
    base = "/tmp/adm-slurm-tests"
    env = dict(os.environ, ADM_SLURM_BASE=base, ADM_SLURM_DB_PORT="3317", ADM_SLURM_CTLD_PORT="6827",
               ADM_SLURM_SLURMD_PORT="6828", ADM_SLURM_DBD_PORT="6829")
    subprocess.run(["bash", "slurm/local_cluster.sh", "start"], cwd=REPO, env=env, check=True)
    os.environ["SLURM_CONF"] = f"{base}/slurm.conf"
    yield env
    subprocess.run(["bash", "slurm/local_cluster.sh", "stop"], cwd=REPO, env=env, check=False)
    os.environ.pop("SLURM_CONF", None)


def native_cpu_bf16() -> bool:
    """The CPU's own flags (the kernel's list), independent of torch: AVX512-BF16 or AMX-BF16."""
    flags = next((line.split(":", 1)[1].split() for line in open("/proc/cpuinfo") if line.startswith("flags")), [])
    return "avx512_bf16" in flags or "amx_bf16" in flags
