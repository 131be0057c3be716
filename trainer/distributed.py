"""Rank discovery (torchrun, Slurm, MPI, single process) and the few collectives the loop needs."""

import os
import re
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist


@dataclass
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    source: str  # torchrun | slurm | mpi | submitit-local | single


def expand_nodelist(nodelist: str) -> list[str]:
    """Slurm's compact host list ("gpu[01-03,07],cpu1", "rack[0-1]-n[0-3]") -> hostnames, in scontrol's
    order (the first bracket outermost), without calling scontrol."""
    hosts = []
    for expr in re.findall(r"(?:[^,\[]|\[[^\]]*\])+", nodelist):
        names = [""]
        for piece in re.split(r"(\[[^\]]*\])", expr):
            options = [piece]
            if piece.startswith("["):
                options = []
                for r in piece[1:-1].split(","):
                    a, _, b = r.partition("-")
                    options += [f"{n:0{len(a)}d}" for n in range(int(a), int(b) + 1)] if b else [a]
            names = [n + o for n in names for o in options]
        hosts += names
    return hosts


def host_address() -> str:
    """This host's address for the other nodes to reach rank 0 at: MASTER_ADDR when set, else the first
    address of the host name that is not loopback (Debian's /etc/hosts maps the name to 127.0.1.1)."""
    if os.environ.get("MASTER_ADDR"):
        return os.environ["MASTER_ADDR"]
    name = socket.gethostname()
    try:
        found = [a[4][0] for a in socket.getaddrinfo(name, None, socket.AF_INET)]
    except OSError:
        found = []
    return next((a for a in found if not a.startswith("127.")), found[0] if found else "127.0.0.1")


# what an MPI launcher (mpiexec, or srun --mpi=pmi2|pmix) leaves in each rank's environment
MPI_MARKERS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMI_FD", "PMIX_RANK", "MPI_LOCALNRANKS")
# of those, what only mpiexec leaves (Open MPI's mpirun, MPICH's Hydra): its ranks are known through MPI alone.
# An srun step's tasks know theirs from Slurm, whatever --mpi (a site's MpiDefault) put beside it, and do not
# start MPI, whose network libraries would then be live under every DataLoader worker the ranks fork.
MPIEXEC_MARKERS = ("OMPI_COMM_WORLD_SIZE", "MPI_LOCALNRANKS")


def port_for(n: int) -> int:
    """A port from a job's number: 10000-29999, below Linux's ephemeral range (32768-60999 by default), where
    an outgoing connection of the node could hold it."""
    return 10000 + n % 20000


def _job_port(default: int = 29500) -> int:
    """MASTER_PORT, else one from the Slurm job and step: two srun steps of one allocation (two trainings
    side by side) must not meet at one port."""
    job, step = os.environ.get("SLURM_JOB_ID"), os.environ.get("SLURM_STEP_ID", "0")
    step = int(step) if step.isdigit() and int(step) < 1_000_000 else 0  # the batch step has a huge id
    return int(os.environ.get("MASTER_PORT", port_for(int(job) + 7919 * step) if job else default))


def slurm_step_tasks(env=os.environ) -> int:
    """The tasks of this process's srun step; 0 outside one. A batch script's own shell has SLURM_PROCID=0
    and SLURM_NTASKS too, but it is no task of a step: only srun sets SLURM_STEP_NUM_TASKS."""
    tasks = env.get("SLURM_STEP_NUM_TASKS", "")
    return int(tasks) if "SLURM_PROCID" in env and tasks.isdigit() else 0


def _mpi_env() -> "DistEnv | None":
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    if comm.Get_size() == 1:
        return None
    addr = comm.bcast(host_address() if comm.Get_rank() == 0 else None, root=0)
    port = comm.bcast(_free_port() if comm.Get_rank() == 0 else None, root=0)
    local = comm.Split_type(MPI.COMM_TYPE_SHARED).Get_rank()
    return DistEnv(comm.Get_rank(), comm.Get_size(), local, addr, port, "mpi")


def discover() -> DistEnv:
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:  # torchrun, `adm train --nproc`, or set by hand
        return DistEnv(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)),
                       env.get("MASTER_ADDR", "127.0.0.1"), int(env.get("MASTER_PORT", 29500)), "torchrun")
    # mpiexec (inside a Slurm allocation too, where Hydra starts its proxies with srun): the ranks are MPI's
    if any(k in env for k in MPIEXEC_MARKERS) and (found := _mpi_env()):
        return found
    if int(env.get("SUBMITIT_LOCAL_NTASKS", "1")) > 1:  # submitit's local executor (adm submit --cluster local)
        job = int(env.get("SUBMITIT_LOCAL_JOB_ID", "0"))  # the controller's pid, the same for every task
        return DistEnv(int(env["SUBMITIT_LOCAL_GLOBALID"]), int(env["SUBMITIT_LOCAL_NTASKS"]),
                       int(env.get("SUBMITIT_LOCAL_LOCALID", 0)), "127.0.0.1",
                       int(env.get("MASTER_PORT", port_for(job))), "submitit-local")
    if slurm_step_tasks(env) > 1:  # a task of an srun step (submitit's), with or without --mpi
        # the step's nodes: the ranks are the step's, which may run on part of the allocation
        nodes = expand_nodelist(env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
                                or env.get("SLURM_NODELIST", "127.0.0.1"))
        return DistEnv(int(env["SLURM_PROCID"]), slurm_step_tasks(env), int(env.get("SLURM_LOCALID", 0)),
                       env.get("MASTER_ADDR", nodes[0]), _job_port(), "slurm")
    if any(k in env for k in MPI_MARKERS) and (found := _mpi_env()):  # another PMI launcher
        return found
    return DistEnv(0, 1, 0, "127.0.0.1", _free_port(), "single")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ops_dir() -> str | None:
    """Where DeepSpeed builds its just-in-time ops (on CPU, its shared-memory all-reduce): in this Python
    environment (sys.prefix/torch_extensions) when it is writable. torch's default, ~/.cache/torch_extensions,
    is shared by every environment of the user: one with DeepSpeed elsewhere makes the next run rebuild
    (about 50 s on 2 cores), and under torch 2.11 a build killed half-way leaves a lock file that every later
    build waits on. A TORCH_EXTENSIONS_DIR already set wins."""
    if "TORCH_EXTENSIONS_DIR" not in os.environ and os.access(sys.prefix, os.W_OK):
        os.environ["TORCH_EXTENSIONS_DIR"] = str(Path(sys.prefix) / "torch_extensions")
    use_own_ninja()
    return os.environ.get("TORCH_EXTENSIONS_DIR")


def use_own_ninja() -> None:
    """Put this environment's bin directory (with pip's ninja, a DeepSpeed dependency) first on PATH, so the
    op is always built by the same ninja: a system ninja of another version hashes the build commands
    differently, and a run with .venv/bin on PATH (an activated environment) after one without it rebuilt
    the op from scratch, each time (1-3 minutes on 2 cores)."""
    bindir = str(Path(sys.executable).parent)
    path = os.environ.get("PATH", "").split(os.pathsep)
    if os.path.isfile(os.path.join(bindir, "ninja")) and path[0] != bindir:
        os.environ["PATH"] = os.pathsep.join([bindir, *path])


def build_cpu_ops() -> str | None:
    """Build DeepSpeed's CPU shared-memory op now (scripts/setup.sh does, so that the first training run
    does not); returns the op's name, or None where this DeepSpeed has no such op."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    ops_dir()
    from deepspeed.comm.torch import build_shm_op

    op = build_shm_op()
    return None if op is None else op.__name__


def init(env: DistEnv, timeout_min: float = 30.0) -> torch.device:
    """Start the process group (NCCL on GPUs, gloo on CPU) through DeepSpeed; returns this rank's device.
    timeout_min: how long a collective may wait before every rank fails (DeepSpeed's default is 10 minutes)."""
    import datetime

    import deepspeed

    os.environ.update(RANK=str(env.rank), WORLD_SIZE=str(env.world_size), LOCAL_RANK=str(env.local_rank),
                      MASTER_ADDR=env.master_addr, MASTER_PORT=str(env.master_port))
    ops_dir()
    if torch.cuda.is_available():
        index = gpu_index(env.local_rank, torch.cuda.device_count(), bound_one_gpu_per_task())
        os.environ["LOCAL_RANK"] = str(index)  # DeepSpeed picks its device by LOCAL_RANK
        if "OMPI_COMM_WORLD_LOCAL_RANK" in os.environ:  # and asserts that Open MPI's agrees
            os.environ["OMPI_COMM_WORLD_LOCAL_RANK"] = str(index)
        device = torch.device("cuda", index)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        device = torch.device("cpu")
        backend = "gloo"
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False,
                                   timeout=datetime.timedelta(minutes=timeout_min))
    return device


def bound_one_gpu_per_task() -> bool:
    """Slurm gave each task a GPU of its own (--gpus-per-task, or a site's binding): a task then sees it as
    cuda:0 whatever its SLURM_LOCALID. CUDA_VISIBLE_DEVICES unset is no binding: several tasks on a node that
    shows one GPU then get gpu_index's clear error, not NCCL's "Duplicate GPU detected"."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").strip()
    return "SLURM_PROCID" in os.environ and ("SLURM_GPUS_PER_TASK" in os.environ or
                                             (visible != "" and len(visible.split(",")) == 1))


def gpu_index(local_rank: int, visible: int, bound: bool = False) -> int:
    """This rank's GPU: its local rank, or cuda:0 where each task was bound to a GPU of its own."""
    if visible == 1 and bound:
        return 0
    if local_rank >= visible:
        raise RuntimeError(f"local rank {local_rank} but this node shows {visible} GPU(s): start one process per GPU "
                           f"(--nproc / --gpus-per-node at most {visible}), or hide the GPUs (CUDA_VISIBLE_DEVICES=) "
                           "to train on the CPU")
    return local_rank


def launch_world() -> int:
    """The world size a launcher announced in the environment, before any process group exists (for the
    checks made before the ranks start): torchrun, MPI (Open MPI, MPICH/Hydra), submitit's local executor, Slurm."""
    env = os.environ  # the order and conditions of discover(), without starting MPI
    if "RANK" in env and env.get("WORLD_SIZE", "").isdigit():
        return int(env["WORLD_SIZE"])
    for key in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "SUBMITIT_LOCAL_NTASKS"):
        if env.get(key, "").isdigit():
            return int(env[key])
    if slurm_step_tasks(env):  # a task of srun, not a shell in salloc nor a batch script's own
        return slurm_step_tasks(env)
    return 1


def launch_rank() -> int:
    """This process's rank as its launcher announced it, before any process group exists (launch_world's
    sources, in its order)."""
    env = os.environ
    if "RANK" in env and env["RANK"].isdigit():
        return int(env["RANK"])
    for key in ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "SUBMITIT_LOCAL_GLOBALID", "SLURM_PROCID"):
        if env.get(key, "").isdigit():  # (a batch script's own shell has SLURM_PROCID=0: rank 0 either way)
            return int(env[key])
    return 0


class AnyRankLater:
    """Whether a flag was set on any rank, answered one call later: each call queues this call's all-reduce
    (and on a GPU its copy into pinned host memory) and reads the previous call's, which the device has long
    finished. An all-reduce + .item() per step would make the host wait for the step in flight every step;
    this never does. Every rank reads the same reduced value at the same call, so they still agree at one
    step boundary, a step after the signal."""

    def __init__(self, device: torch.device):
        self.device = device
        self.pending = None  # (host value, event or None) of the previous call

    def __call__(self, flag: bool) -> bool:
        answer = False
        if self.pending is not None:
            host, done = self.pending
            if done is not None:
                done.synchronize()  # recorded a step ago: done already, in practice
            answer = bool(host[0])
        t = torch.full((1,), int(flag), dtype=torch.int32, device=self.device)  # a fill, no copy from the host
        if dist.is_initialized():
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
        done = None
        if t.is_cuda:
            host = torch.empty(1, dtype=torch.int32, pin_memory=True)
            host.copy_(t, non_blocking=True)
            done = torch.cuda.Event()
            done.record()
            t = host
        self.pending = (t, done)
        return answer


def all_gather_cat(t: torch.Tensor) -> torch.Tensor:
    """Every rank's t (the same shape on each) concatenated along dim 0 in rank order: one collective on
    t's device, no pickling."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return t
    out = t.new_empty((dist.get_world_size() * t.shape[0], *t.shape[1:]))
    dist.all_gather_into_tensor(out, t.contiguous())
    return out


def gather_objects(obj) -> list:
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, src: int = 0):
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
