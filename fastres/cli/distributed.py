"""``fastres train`` under torchrun: one process per device, DistributedDataParallel, rank 0 the only voice.

``torchrun --nproc_per_node=N -m fastres train ...`` sets ``WORLD_SIZE``,
``RANK`` and ``LOCAL_RANK``; the process group is NCCL on CUDA, gloo on
CPU. Each process trains on its contiguous share of every global batch
(``fastres.cli.stream``), so the run computes what one process computes on
the whole batch: with ``--sync-bn`` exactly so (batch norms reduce their
statistics over the processes through fastres's fused synchronized ops).
"""

import dataclasses
import datetime
import os

import torch
import torch.distributed as dist


@dataclasses.dataclass(frozen=True)
class Processes:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def from_environment() -> Processes:
    """torchrun's ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` (one process when unset)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return Processes(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))


def start(procs: Processes, device: torch.device) -> None:
    if procs.world > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30),
                                device_id=device if device.type == "cuda" else None)


def stop(procs: Processes) -> None:
    if procs.world > 1 and dist.is_initialized():
        dist.destroy_process_group()


def barrier(procs: Processes) -> None:
    if procs.world > 1:
        dist.barrier()


def mean(procs: Processes):
    """A function averaging a tensor over the processes (None for one process)."""
    if procs.world == 1:
        return None

    def reduce(t: torch.Tensor) -> torch.Tensor:
        t = t.clone()
        dist.all_reduce(t)
        return t / procs.world

    return reduce


def data_parallel(procs: Processes, device: torch.device):
    """A function wrapping a model in DistributedDataParallel (None for one process)."""
    if procs.world == 1:
        return None
    from torch.nn.parallel import DistributedDataParallel

    class DDP(DistributedDataParallel):
        # torch's DDP refuses any SyncBatchNorm in a CPU module ("SyncBatchNorm layers only work
        # with GPU modules"), a guard for torch's own CUDA-only kernel. fastres's synchronized batch
        # norms reduce their statistics over gloo too, so on CPU the guard is skipped.
        def _passing_sync_batchnorm_handle(self, module):
            if device.type == "cuda":
                super()._passing_sync_batchnorm_handle(module)

    ids = [device.index] if device.type == "cuda" else None
    return lambda model: DDP(model, device_ids=ids)
