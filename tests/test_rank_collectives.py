"""The trainer's collectives, run by the test as 2 gloo ranks under torchrun (and as a single process):
- the preemption agreement: every rank learns that some rank raised its flag at the same call, exactly one
  call after the flag was raised (the all-reduce is read a step after it is queued, so the host never
  waits for the GPU's step in flight);
- the loss-aware sampler's gather: every rank's (timesteps, losses) in rank order, exactly, so the
  sampler's history is the same on every rank."""

import os
import subprocess
import sys

from conftest import REPO

CALLS = 6


def answers(raise_on: dict[int, int], rank: int, device="cpu") -> list[bool]:
    """What AnyRankLater answers at each call when rank r raises its flag from call raise_on[r] on."""
    from trainer.distributed import AnyRankLater

    check = AnyRankLater(device)
    return [check(call >= raise_on.get(rank, CALLS)) for call in range(CALLS)]


def expected(raise_on: dict[int, int]) -> list[bool]:
    first = min(raise_on.values(), default=CALLS)
    return [call > first for call in range(CALLS)]  # the call after the first raise, on every rank


def test_a_single_process_hears_its_own_flag_one_call_later():
    sys.path.insert(0, str(REPO))
    for raise_on in ({}, {0: 0}, {0: 2}, {0: CALLS - 1}):
        assert answers(raise_on, 0) == expected(raise_on), raise_on


def worker():
    import torch.distributed as dist

    sys.path.insert(0, str(REPO))
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    for raise_on in ({}, {1: 2}, {0: 3, 1: 1}, {0: 0}):
        got = answers(raise_on, rank)
        assert got == expected(raise_on), (rank, raise_on, got)
        if rank == 0:
            print(f"{sorted(raise_on.items())} ok", flush=True)
    _check_gathered_losses(rank, dist.get_world_size())
    dist.barrier()
    dist.destroy_process_group()


def _rank_losses(rank: int):
    import torch

    return (torch.tensor([rank, 3, 5 + rank]),
            torch.tensor([0.1 * (rank + 1), 1.5 + rank, 1 / 3], dtype=torch.float32))  # not exact in float32


def _check_gathered_losses(rank: int, world: int) -> None:
    import torch
    import torch.distributed as dist

    from models.resample import LossSecondMomentResampler
    from trainer.loop import gather_losses

    ts, losses = gather_losses(*_rank_losses(rank))
    assert ts.dtype == torch.long and losses.dtype == torch.float64
    assert torch.equal(ts, torch.cat([_rank_losses(r)[0] for r in range(world)]))
    assert torch.equal(losses, torch.cat([_rank_losses(r)[1] for r in range(world)]).double())  # bit for bit
    sampler = LossSecondMomentResampler(type("D", (), {"num_timesteps": 8})(), history_per_term=2,
                                        sync=gather_losses)
    for _ in range(2):
        sampler.update_with_local_losses(*_rank_losses(rank))
    histories = [None] * world
    dist.all_gather_object(histories, sampler.state_dict())
    assert all(torch.equal(h["history"], histories[0]["history"]) for h in histories)
    assert histories[0]["counts"].tolist() == [2, 2, 0, 2, 0, 2, 2, 0]
    if rank == 0:
        print("gathered losses ok", flush=True)


def test_every_rank_agrees_at_the_same_call_and_gathers_the_same_losses(tmp_path):
    # (TMPDIR: torchrun leaves a torchelastic_* folder of its logs there)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO / "tests"), TMPDIR=str(tmp_path))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                           "--master-port", "29637", __file__], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert sum(line.endswith(" ok") for line in proc.stdout.splitlines()) == 5


if __name__ == "__main__":
    worker()
