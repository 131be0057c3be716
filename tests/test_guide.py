"""docs/GUIDE.md and the README cannot drift from the tool: every `adm` command line in them names a real
subcommand, every option it passes is one that subcommand accepts (read from its own --help), and every
training config they show builds."""

import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, run_cli
from slurm.submit import queued_jobs


def guide_commands(doc: str = "docs/GUIDE.md") -> list[list[str]]:
    text = (REPO / doc).read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, re.S)
    lines = [line.split("#")[0].strip() for block in blocks for line in block.replace("\\\n", " ").splitlines()]
    return [shlex.split(line)[1:] for line in lines if line.startswith("adm ")]


def help_for(args: list[str]) -> str:
    """The --help of the deepest subcommand the line names."""
    if len(args) > 1 and not args[1].startswith("-") and "=" not in args[1]:
        proc = run_cli(args[0], args[1], "--help", check=False)
        if proc.returncode == 0 and f"{args[1]}" in proc.stdout.splitlines()[0]:
            return proc.stdout
    proc = run_cli(args[0], "--help", check=False)
    assert proc.returncode == 0, f"adm {args[0]}: not a command ({proc.stderr})"
    return proc.stdout


def test_guide_has_commands():
    assert len(guide_commands()) >= 20
    assert len(guide_commands("README.md")) >= 30
    assert ["sample", "runs/t/snapshots/img000000002048", "--num", "50000", "--seed-start", "0", "--steps", "250",
            "--classifier", "runs/clf/snapshots/img...", "--scale", "1.0", "--out", "samples/t",
            "--merge"] in guide_commands("README.md")  # a command continued over lines is read whole


@pytest.mark.parametrize("args", guide_commands() + guide_commands("README.md"), ids=lambda a: " ".join(a[:2]))
def test_guide_command_is_accepted(args):
    """(The README's command lines too: a renamed option would leave them wrong without a test failing.)"""
    text = help_for(args)
    for token in args:
        if token.startswith("--"):
            option = token.split("=")[0]  # a whole option of the help, not a prefix of one (--mer of --merge)
            assert re.search(rf"(?<![\w-]){re.escape(option)}(?![\w-])", text), \
                f"adm {' '.join(args)}: {token} is not an option"


def test_the_training_configs_the_docs_show_build():
    """The `key=value` overrides (and YAML files) of every documented `adm train` / `adm submit train` line
    build a training config: a renamed or removed key would otherwise break only the reader who types it."""
    from trainer.config import load_train_config

    lines = [a for doc in ("docs/GUIDE.md", "README.md") for a in guide_commands(doc)
             if a[0] == "train" or a[:2] == ["submit", "train"]]
    assert len(lines) >= 8
    for args in lines:
        rest = args[1:] if args[0] == "train" else args[2:]
        config = next((a for a in rest if a.endswith((".yaml", ".yml"))), None)
        overrides = [a for a in rest if "=" in a and not a.startswith("-")]
        cfg = load_train_config(str(REPO / config) if config else None, overrides)
        for key, value in (o.split("=", 1) for o in overrides if o.split("=")[0] in ("run_dir", "data", "zero_stage")):
            assert str(getattr(cfg, key)) == value, (args, key)


def test_the_readme_python_examples_call_what_exists():
    """Each ```python example of the README imports names that exist and calls them with arguments their
    signatures accept (positional count, keyword names): a renamed function or keyword breaks this test."""
    import ast
    import importlib
    import inspect
    import textwrap

    blocks = re.findall(r"^ *```python\n(.*?)^ *```", (REPO / "README.md").read_text(), re.S | re.M)
    assert len(blocks) >= 3
    checked = 0
    for block in blocks:
        tree = ast.parse(textwrap.dedent(block))
        names = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                for alias in node.names:  # a submodule (from models import adm_compat) or a name in the module
                    try:
                        names[alias.asname or alias.name] = importlib.import_module(f"{node.module}.{alias.name}")
                    except ModuleNotFoundError:
                        names[alias.asname or alias.name] = getattr(importlib.import_module(node.module), alias.name)
            elif isinstance(node, ast.Import):
                names.update({a.asname or a.name: importlib.import_module(a.name) for a in node.names})
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            if isinstance(func, ast.Name) and func.id in names:
                target = names[func.id]
            elif isinstance(func, ast.Attribute) and inspect.ismodule(names.get(getattr(func.value, "id", None))):
                target = getattr(names[func.value.id], func.attr)  # AttributeError: the module lacks it
            else:
                continue  # a method of an object the example made
            inspect.signature(target).bind_partial(*node.args, **{k.arg: k.value for k in node.keywords if k.arg})
            checked += 1
    assert checked >= 7


def test_the_guide_site_file_is_read_as_shown(tmp_path, monkeypatch):
    """The site file the guide shows is accepted by the code that reads site files and names every key it
    knows (so a key added there is documented)."""
    from slurm.submit import SITE_KEYS, site_defaults

    (block,) = re.findall(r"```yaml\n(.*?)```", (REPO / "docs" / "GUIDE.md").read_text(), re.S)
    (tmp_path / "site.yaml").write_text(block)
    monkeypatch.setenv("ADM_SITE", str(tmp_path / "site.yaml"))
    site = site_defaults()
    assert set(site) == set(SITE_KEYS) and site["setup"][0] == "module load cuda/12.4"


# ---------------------------------------------------------------------------------------------------
# The guide, run: every `adm` line of docs/GUIDE.md in order, on the real local Slurm, with the
# ImageNet-sized settings swapped for tiny ones. Each swap is listed here (what the guide says, what
# runs instead) and must match some line, so this table cannot rot either.

TINY_TRAIN = ("preset=tiny-32 model.num_classes=11 batch=16 num_slots=4 data_workers=1 precision=fp32 "
              "total_kimg=0.384 status_kimg=0.032 checkpoint_kimg=0.064 snapshot_kimg=0.192 grid=false")
TINY_CLASSIFIER = ("preset=tiny-classifier-32 model.num_classes=11 batch=16 num_slots=4 data_workers=1 "
                   "precision=fp32 total_kimg=0.064 status_kimg=0.032 checkpoint_kimg=0.064 snapshot_kimg=0.064")
TINY_EVAL = "settings:\n  - {name: tiny, steps: ddim5, num: 8, shard_size: 4, batch_size: 4}\n"
SWAPS = [
    ("/data/imagenet", "imagenet"),  # the digits in ImageNet's layout (tests/imagenet_fixture.py)
    ("center-crop:64", "center-crop:32"),
    ("max-side:80", "max-side:40"),
    ("--workers 32", "--workers 1 --shard-size 8"),  # shards enough for 4 slots of tiny data
    ("--workers 4", "--workers 1 --seconds 2"),
    ("--resolution 64", "--resolution 32"),
    ("configs/train/adm-64.yaml", f"configs/train/adm-64.yaml {TINY_TRAIN}"),
    ("configs/train/classifier-64.yaml", f"configs/train/classifier-64.yaml {TINY_CLASSIFIER}"),
    ("--nodes 4 --gpus-per-node 8 --time 24:00:00", "--nodes 1 --gpus-per-node 2 --cpu --time 00:10:00"),
    ("--nodes 1 --gpus-per-node 8", "--nodes 1 --gpus-per-node 2 --cpu --time 00:10:00"),
    ("123456", "{train_job}"),  # the job the submit line above started
    ("configs/eval/adm.yaml", "eval-tiny.yaml"),  # TINY_EVAL
    ("--partition gpu", "--partition debug --cpus-per-task 1"),
    ("img000100001792", "{last_snapshot}"),  # the run's newest snapshot
    ("--num 10000", "--num 8 --shard-size 4 --batch-size 4"),
    ("--num 50000 --steps 250", "--num 8 --steps ddim5"),
    ("VIRTUAL_imagenet64_labeled.npz", "ref/in64-val.npz"),
]


class GuideRun:
    """State and waits between the guide's lines: what a user would do by looking (wait for a job to
    run or end) or by downloading (OpenAI's checkpoints: here ADM-layout .pt files exported from the
    tiny runs the guide trained, with `adm models convert SNAPSHOT FILE.pt`)."""

    def __init__(self, ws):
        self.ws, self.jobs, self.log = ws, {}, []

    def adm(self, args: list[str], timeout=600) -> str:
        proc = subprocess.run([sys.executable, "-m", "adm", *args], cwd=self.ws, capture_output=True, text=True,
                              timeout=timeout, env=os.environ)
        self.log.append(f"$ adm {shlex.join(args)}\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
        assert proc.returncode == 0, "\n".join(self.log[-3:])
        return proc.stdout

    def values(self) -> dict:
        snaps = sorted((self.ws / "runs" / "adm-64" / "snapshots").glob("img*"))
        return {"train_job": self.jobs.get("runs/adm-64", ""), "last_snapshot": snaps[-1].name if snaps else ""}

    def state(self, job: str) -> str:
        out = subprocess.run(["sacct", "-n", "-P", "-X", "-j", job, "-o", "State"], capture_output=True,
                             text=True).stdout.split()
        return out[0] if out else "PENDING"

    def wait(self, run: str, until, timeout=420):
        deadline, job = time.time() + timeout, self.jobs[run]
        while True:
            ended = self.ended(job)
            if until(job):
                return
            assert time.time() < deadline and not ended, f"{run}: job {job} {self.state(job)}\n" + "".join(
                p.read_text()[-3000:] for p in (self.ws / run / "slurm" / job).glob("*_0_log.*"))
            time.sleep(1)

    def training_started(self, job):
        logs = list((self.ws / "runs" / "adm-64" / "slurm" / job).glob("*_0_log.out"))
        return any("[train]" in p.read_text() for p in logs)

    def ended(self, job):  # gone from the queue, and its accounting says how (it lags a moment)
        queued = queued_jobs()
        return job not in queued and self.state(job) not in ("PENDING", "RUNNING", "COMPLETING", "REQUEUED")

    def before(self, args: list[str]):
        if args[:2] == ["jobs", "logs"]:  # look at the log once the run is training
            self.wait("runs/adm-64", self.training_started)
        if args[:2] == ["eval", "ref"]:  # the trainings have ended
            for run in ("runs/adm-64", "runs/clf-64"):
                self.wait(run, self.ended)
                assert self.state(self.jobs[run]) == "COMPLETED", f"{run}: {self.state(self.jobs[run])}"
        if args[:2] == ["models", "convert"] and not (self.ws / "64x64_diffusion.pt").exists():
            for run, pt in (("adm-64", "64x64_diffusion.pt"), ("clf-64", "64x64_classifier.pt")):
                snap = sorted((self.ws / "runs" / run / "snapshots").glob("img*"))[-1]
                self.adm(["models", "convert", str(snap), pt])
        if args[:3] == ["models", "convert", "64_256_upsampler.pt"]:  # no upsampler trained: an untrained tiny
            self.untrained_upsampler(self.ws / args[2])  # one in ADM's layout, upsampling the tiny 32x32 samples

    @staticmethod
    def untrained_upsampler(pt: Path):
        import dataclasses

        import torch

        from models.config import build_model
        from models.presets import get_preset

        torch.manual_seed(0)
        cfg = dataclasses.replace(get_preset("tiny-upsampler-32-64").config(), num_classes=11)
        torch.save(build_model(cfg).state_dict(), pt)


    def after(self, args: list[str], out: str):
        if args[:2] == ["submit", "train"] and "--dry-run" not in args:
            job, run = re.search(r"submitted job (\d+) .*logs: (\S+)/slurm/", out).groups()
            self.jobs[str(Path(run).relative_to(self.ws) if Path(run).is_absolute() else run)] = job


def guide_lines() -> list[str]:
    text = (REPO / "docs" / "GUIDE.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, re.S)
    lines = [line.split("#")[0].strip() for block in blocks for line in block.splitlines()]
    return [line for line in lines if line.startswith("adm ")]


@pytest.mark.slow
def test_the_guide_runs_top_to_bottom_on_tiny_settings(slurm_cluster, tmp_path):
    from imagenet_fixture import make_imagenet

    ws = tmp_path
    make_imagenet(ws / "imagenet", per_class=10, size=32, val_per_class=4)
    (ws / "configs").symlink_to(REPO / "configs")
    (ws / "eval-tiny.yaml").write_text(TINY_EVAL)
    run = GuideRun(ws)
    before_jobs = queued_jobs()
    used = set()
    try:
        for line in guide_lines():
            for old, new in SWAPS:
                if old in line:
                    line, _ = line.replace(old, new), used.add(old)
            args = shlex.split(line.format(**run.values()))[1:]
            run.before(args)
            run.after(args, run.adm(args))
        assert used == {old for old, _ in SWAPS}, f"swaps that match no guide line: {({o for o, _ in SWAPS} - used)}"
        # what the guide promised happened: the cancelled run resumed, the reports and metrics exist
        logs = "".join(p.read_text() for p in (ws / "runs" / "adm-64" / "slurm").rglob("*_0_log.out"))
        assert "resum" in logs, logs[-3000:]
        assert (ws / "runs" / "adm-64" / "report.html").is_file()
        metrics = json.loads((ws / "metrics.json").read_text())
        assert {"fid", "sfid", "precision", "recall"} <= set(metrics)
        import numpy as np
        with np.load(ws / "samples" / "openai-64" / "samples.npz") as low, \
                np.load(ws / "samples" / "openai-256" / "samples.npz") as high:  # the base file, upsampled row by row
            assert low["arr_0"].shape == (8, 32, 32, 3) and high["arr_0"].shape == (8, 64, 64, 3)
            assert high["arr_0"].dtype == np.uint8 and (high["arr_1"] == low["arr_1"]).all()
    finally:
        print("\n".join(run.log))
        left = queued_jobs()
        if left - before_jobs:  # the evaluation scheduler's next pass, and anything left running
            subprocess.run(["scancel", *sorted(left - before_jobs)], capture_output=True)
        deadline = time.time() + 120  # and gone, before the session's cluster stops under them
        while left - before_jobs and time.time() < deadline:
            time.sleep(1)
            left = queued_jobs()
