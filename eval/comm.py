"""Workers for the metric reducer: one process, MPI ranks (mpi4py, e.g. `mpiexec -n 4` or
`srun --mpi=pmi2` on CPU-only eval nodes) or torch.distributed (torchrun, gloo). Only two operations
are needed: each worker's share of rows, and an all-gather of Python objects (numpy arrays)."""

import os


class Single:
    rank, size = 0, 1

    def rows(self, n: int) -> slice:
        return slice(n * self.rank // self.size, n * (self.rank + 1) // self.size)

    def allgather(self, obj) -> list:
        return [obj]

    def barrier(self) -> None:
        pass

    def close(self) -> None:
        pass


class MPIComm(Single):
    def __init__(self):
        from mpi4py import MPI

        self.comm = MPI.COMM_WORLD
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()

    def allgather(self, obj) -> list:
        return self.comm.allgather(obj)

    def barrier(self) -> None:
        self.comm.Barrier()


class TorchComm(Single):
    def __init__(self):
        import torch.distributed as dist

        self.owned = not dist.is_initialized()
        if self.owned:
            dist.init_process_group("gloo")
        self.dist = dist
        self.rank, self.size = dist.get_rank(), dist.get_world_size()

    def allgather(self, obj) -> list:
        out = [None] * self.size
        self.dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        self.dist.barrier()

    def close(self) -> None:
        """Together, then tear the group down: a process that exits with gloo's threads still running can
        abort in their destructors ("terminate called without an active exception") after its work is done."""
        if self.owned and self.dist.is_initialized():
            self.dist.barrier()
            self.dist.destroy_process_group()


MPI_ENV = ("PMI_SIZE", "PMI_FD", "PMIX_RANK", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")


def discover(backend: str = "auto") -> Single:
    """auto: torch.distributed under torchrun (WORLD_SIZE > 1), MPI under an MPI launcher, else one process."""
    if backend == "single":
        return Single()
    if backend == "torch" or (backend == "auto" and int(os.environ.get("WORLD_SIZE", "1")) > 1):
        return TorchComm()
    if backend == "mpi" or (backend == "auto" and any(k in os.environ for k in MPI_ENV)):
        comm = MPIComm()
        return comm if comm.size > 1 or backend == "mpi" else Single()
    if backend != "auto":
        raise ValueError(f"unknown worker backend {backend!r}: expected auto, single, mpi or torch")
    return Single()
