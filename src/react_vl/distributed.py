"""One distributed setup for every stage (embed, customize, retrieve, evaluate), as open_clip's.

    env = init_distributed("auto")        # torchrun, slurm's srun, or a single process
    ...                                   # env.rank, env.world_size, env.local_rank, env.device
    totals = env.gather(my_counts)        # a list, one item per rank
    env.close()

Rank, world size and local rank come from torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK),
else from slurm's (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID), else MPI's. A CUDA rank is pinned
to its GPU (`torch.cuda.set_device(local_rank)`) before the process group starts, so every
collective runs on that rank's own device. The group is one `cpu:gloo,cuda:nccl` group on GPU
machines (CPU tensors and Python objects go through gloo, CUDA tensors through NCCL) and gloo on
CPU. Under srun, MASTER_ADDR and MASTER_PORT must be set by the job script (see the README).
"""

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .utils import resolve_device

_ENV = {  # (torchrun, slurm, MPI) names of each value
    "rank": ("RANK", "SLURM_PROCID", "PMI_RANK", "OMPI_COMM_WORLD_RANK"),
    "world_size": ("WORLD_SIZE", "SLURM_NTASKS", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE"),
    "local_rank": ("LOCAL_RANK", "SLURM_LOCALID", "MPI_LOCALRANKID", "OMPI_COMM_WORLD_LOCAL_RANK"),
}
BACKENDS = {"cuda": "cpu:gloo,cuda:nccl", "cpu": "gloo"}


def world_info_from_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) from the launcher's environment; (0, 1, 0) outside one."""
    def first(names, default):
        return next((int(os.environ[n]) for n in names if n in os.environ), default)
    return first(_ENV["rank"], 0), first(_ENV["world_size"], 1), first(_ENV["local_rank"], 0)


@dataclass
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    owns_group: bool = False  # this process started the group, so `close` ends it

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def gather(self, obj) -> list:
        """Every rank's `obj` (any picklable value), in rank order, on every rank."""
        if not self.distributed:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def min(self, value: int) -> int:
        """The smallest `value` over all ranks (a CPU tensor: gloo carries it on every machine)."""
        if not self.distributed:
            return value
        tensor = torch.tensor([value], dtype=torch.long)
        dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
        return int(tensor.item())

    def barrier(self):
        if self.distributed:
            dist.barrier(device_ids=[self.device.index]) if self.device.type == "cuda" else dist.barrier()

    def close(self):
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
            self.owns_group = False


def init_distributed(device: str | None = "auto") -> DistEnv:
    """Start (or join) the process group the launcher describes and pin this rank to its device.

    device: auto (this rank's GPU when there is one, else CPU), cpu, cuda; cuda:N only outside a
    launcher. Raises ValueError naming the rank when it has no GPU of its own.
    """
    rank, world_size, local_rank = world_info_from_env()
    wanted = resolve_device(device)
    if wanted.type == "cuda":
        count = torch.cuda.device_count()
        if world_size > 1 or wanted.index is None:
            if local_rank >= count:
                raise ValueError(f"rank {rank} (local rank {local_rank}) has no GPU: this machine shows {count}; "
                                 f"start at most {count} processes per node, or pass --device cpu")
            wanted = torch.device("cuda", local_rank)
        torch.cuda.set_device(wanted)
    elif wanted.type != "cpu":
        raise ValueError(f"device {device!r}: react-vl runs on cpu or cuda")
    if world_size == 1:
        return DistEnv(0, 1, 0, wanted)
    owns = not dist.is_initialized()
    if owns:
        missing = [v for v in ("MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
        if missing:
            raise ValueError(f"rank {rank} of {world_size}: {' and '.join(missing)} not set; torchrun sets them, "
                             f"under srun export them in the job script (README, 'Cluster runs')")
        dist.init_process_group(BACKENDS[wanted.type], rank=rank, world_size=world_size)
    elif wanted.type == "cuda" and "nccl" not in str(dist.get_backend()):
        raise ValueError(f"the process group was started with {dist.get_backend()!r}, "
                         f"which cannot carry CUDA tensors; start it with {BACKENDS['cuda']!r}")
    return DistEnv(dist.get_rank(), dist.get_world_size(), local_rank, wanted, owns)
