"""The engine our DeepSpeed config builds does not synchronise the device more than DeepSpeed must: its
throughput timer (on by default) would wait for the device at the start of every forward and the end of
every step. Counted by replacing the accelerator's synchronize() in a single-rank engine (subprocess: the
process group stays out of the test process)."""

import json
import os
import subprocess
import sys

from conftest import REPO

STEPS = 6  # DeepSpeed's timer starts timing at the third step


def worker(timer_on: bool) -> None:
    import deepspeed
    import torch
    from deepspeed.accelerator import get_accelerator

    sys.path.insert(0, str(REPO))
    from trainer.config import load_train_config
    from trainer.distributed import ops_dir
    from trainer.loop import deepspeed_config

    ops_dir()
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    cfg = load_train_config(None, ["preset=tiny-32", "batch=4", "precision=fp32", "zero_stage=2"])
    config = deepspeed_config(cfg, 4, 1)
    if timer_on:
        del config["timers"]  # DeepSpeed's default
    accel, calls = get_accelerator(), []
    real = accel.synchronize
    accel.synchronize = lambda *a, **k: calls.append(1) or real(*a, **k)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.GELU(), torch.nn.Linear(8, 1))
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    before = len(calls)
    for _ in range(STEPS):
        loss = engine(torch.randn(4, 8)).square().mean()
        engine.backward(loss)
        engine.step()
    print(json.dumps({"syncs": len(calls) - before}), flush=True)


def test_our_config_drops_the_throughput_timers_syncs():
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO / "tests"),
               RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
    procs = {timer_on: subprocess.Popen([sys.executable, __file__, str(int(timer_on))], cwd=REPO, text=True,
                                        env=dict(env, MASTER_PORT=str(29638 + timer_on)),
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for timer_on in (True, False)}
    syncs = {}
    for timer_on, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, out[-2000:] + err[-4000:]
        syncs[timer_on] = json.loads(out.strip().splitlines()[-1])["syncs"]
    assert syncs[True] >= STEPS  # the count sees DeepSpeed's own syncs (start and end of each timed step)
    assert syncs[False] == 0, syncs


if __name__ == "__main__":
    worker(bool(int(sys.argv[1])))
