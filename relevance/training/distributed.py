"""This process's place in a ``torchrun`` job, so the training loop is the same code with or without DDP.

Without ``torchrun`` (``WORLD_SIZE`` unset or 1) a run is rank 0 of 1 and every collective is a no-op;
with it the process joins the group (gloo on CPU, NCCL on GPU) and :class:`Dist` gathers and waits.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class Dist:
    """This process's rank, the world size, its device and whether it created (and so destroys) the group."""

    rank: int
    world: int
    device: torch.device
    owns_group: bool

    def gather(self, value: Any) -> list[Any]:
        """``value`` from every rank, in rank order (``[value]`` alone)."""
        if self.world == 1:
            return [value]
        out: list[Any] = [None] * self.world
        torch.distributed.all_gather_object(out, value)
        return out

    def barrier(self) -> None:
        """Wait for every rank (nothing alone)."""
        if self.world > 1:
            torch.distributed.barrier()


def init_distributed(device: str | None) -> Dist:
    """Join the torchrun process group when ``WORLD_SIZE`` > 1 (gloo on CPU, NCCL on GPU).

    ``device`` forces one (``"cpu"``, ``"cuda:1"``); by default each rank takes the GPU of its
    ``LOCAL_RANK`` when CUDA is there, else the CPU.
    """
    import torch.distributed as dist

    world, local = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available() and (device is None or device.startswith("cuda"))
    owns = world > 1 and not dist.is_initialized()
    if owns:
        dist.init_process_group("nccl" if cuda else "gloo")
    dev = torch.device(device) if device else torch.device(f"cuda:{local}" if cuda else "cpu")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    return Dist(dist.get_rank() if world > 1 else 0, world, dev, owns)
