"""torchrun integration: one process per device, gloo on the CPU, nccl on GPUs.

Started by `torchrun --nproc-per-node N -m fvdm train ...`, which sets RANK / WORLD_SIZE /
LOCAL_RANK; a plain `python -m fvdm train` is a world of one and needs no process group."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def init_world(device: torch.device) -> World:
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return World()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return World(rank, size, local_rank)


def local_device(device: torch.device, world: World) -> torch.device:
    """cuda -> this process's GPU (cuda:LOCAL_RANK); the CPU stays the CPU."""
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", world.local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


def any_flag(flag: bool, world: World, device: torch.device) -> bool:
    """True on every rank when any rank's flag is set (so all ranks stop at the same step)."""
    if not world.distributed:
        return flag
    t = torch.tensor([int(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def mean_over_ranks(stats: dict, world: World) -> dict:
    """Tensor entries averaged over ranks (the loss each process saw on its slice)."""
    if not world.distributed:
        return stats
    out = dict(stats)
    for k, v in stats.items():
        if torch.is_tensor(v):
            v = v.detach().float().clone()
            dist.all_reduce(v)
            out[k] = v / world.size
    return out


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()


def shutdown(world: World) -> None:
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()
