"""Where a process runs: its device, its place in a distributed job, seeding, and who writes.

Alone, a process is rank 0 of 1 on the best device. Launched by ``torchrun`` (which sets RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) or by ``srun`` with one task per GPU (SLURM_PROCID,
SLURM_STEP_NUM_TASKS, SLURM_LOCALID, with MASTER_ADDR/MASTER_PORT exported by the batch script),
`setup` joins the process group: NCCL on GPUs, gloo on CPUs. Feature extraction and every trainer
take their rank, device and output duties from here, so "who am I" is decided in one place.
"""

from __future__ import annotations

import atexit
import os
import random
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from taxoclip.errors import TaxoclipError


@dataclass(frozen=True)
class Runtime:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that prints, writes checkpoints, logs and the model."""
        return self.rank == 0

    def print(self, *args: Any, **kwargs: Any) -> None:
        if self.is_main:
            print(*args, **kwargs)

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def share(self, items: list) -> list:
        """This rank's share of ``items``: every world_size-th one, starting at its rank."""
        return items[self.rank :: self.world_size]

    def gather_objects(self, value: Any) -> list[Any]:
        """Every rank's ``value``, in rank order (one element when alone)."""
        if not self.distributed:
            return [value]
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, value)
        return gathered

    def mean(self, value: float) -> float:
        """The mean of a number over the ranks."""
        if not self.distributed:
            return value
        tensor = torch.tensor([value], dtype=torch.float64, device=self.collective_device)
        dist.all_reduce(tensor)
        return float(tensor.item()) / self.world_size

    @property
    def collective_device(self) -> torch.device:
        # NCCL moves only GPU tensors; gloo only CPU ones.
        return self.device if dist.is_initialized() and dist.get_backend() == "nccl" else torch.device("cpu")

    def wrap(self, module: torch.nn.Module) -> torch.nn.Module:
        """DistributedDataParallel around ``module`` when distributed: gradients are averaged
        across ranks on every backward pass. Alone, the module itself."""
        if not self.distributed:
            return module
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return torch.nn.parallel.DistributedDataParallel(module, device_ids=device_ids)


def launch_environment() -> tuple[int, int, int]:
    """(rank, world size, local rank) as the launcher set them: torchrun first, then srun."""
    env = os.environ
    if "WORLD_SIZE" in env:
        return int(env.get("RANK", "0")), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", "0"))
    # SLURM_STEP_NUM_TASKS exists only inside an srun step, so a plain `python` in an allocation
    # of several tasks does not wait for peers that will never come.
    if "SLURM_STEP_NUM_TASKS" in env and "SLURM_PROCID" in env:
        return int(env["SLURM_PROCID"]), int(env["SLURM_STEP_NUM_TASKS"]), int(env.get("SLURM_LOCALID", "0"))
    return 0, 1, 0


def pick_device(device: str | None = "auto", local_rank: int | None = None) -> torch.device:
    """``auto``: this process's GPU (LOCAL_RANK) when there is one, else the CPU."""
    if device in (None, "auto"):
        if torch.cuda.is_available():
            index = local_rank if local_rank is not None else int(os.environ.get("LOCAL_RANK", "0"))
            return torch.device("cuda", index)
        return torch.device("cpu")
    return torch.device(device)


def setup(device: str | None = "auto") -> Runtime:
    """This process's runtime; joins the process group the launcher prepared (once per process)."""
    rank, world, local_rank = launch_environment()
    chosen = pick_device(device, local_rank)
    if world > 1 and not dist.is_initialized():
        for name in ("MASTER_ADDR", "MASTER_PORT"):
            if name not in os.environ:
                raise TaxoclipError(
                    f"{world} processes were launched but {name} is not set; start them with torchrun, "
                    "or export MASTER_ADDR and MASTER_PORT in the SLURM script (see scripts/slurm.sh)"
                )
        if chosen.type == "cuda":
            torch.cuda.set_device(chosen)
        backend = "nccl" if chosen.type == "cuda" else "gloo"
        dist.init_process_group(backend, rank=rank, world_size=world)
        atexit.register(leave_process_group)
    if dist.is_initialized():  # the group's own word over the environment's
        rank, world = dist.get_rank(), dist.get_world_size()
    return Runtime(rank=rank, world_size=world, local_rank=local_rank, device=chosen)


def leave_process_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def seed_everything(seed: int) -> None:
    """Python, NumPy and PyTorch generators (all devices) from one number."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class GatherRows(torch.autograd.Function):
    """All ranks' equal-sized ``tensor`` stacked in rank order; the backward pass sums each row's
    gradient over the ranks (every rank's loss depends on every row) and returns this rank's rows."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        pieces = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(pieces, tensor.contiguous())
        ctx.rows = slice(dist.get_rank() * len(tensor), (dist.get_rank() + 1) * len(tensor))
        return torch.cat(pieces)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad[ctx.rows]


def gather_with_grad(tensor: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """All ranks' ``tensor`` rows (gradients flow back to the rank that owns them) and labels, in
    rank order, so every rank computes the same loss over the whole global batch. Ranks may hold
    different numbers of rows (padded for the collective, trimmed after)."""
    world = dist.get_world_size()
    count = torch.tensor([len(tensor)], device=tensor.device)
    counts = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts, count)
    sizes = [int(c) for c in counts]
    most = max(sizes)
    rows = GatherRows.apply(torch.nn.functional.pad(tensor, (0, 0, 0, most - len(tensor))))
    padded_labels = torch.nn.functional.pad(labels, (0, most - len(labels)))
    label_pieces = [torch.empty_like(padded_labels) for _ in range(world)]
    dist.all_gather(label_pieces, padded_labels)
    keep = torch.cat([torch.arange(r * most, r * most + n, device=tensor.device) for r, n in enumerate(sizes)])
    return rows[keep], torch.cat(label_pieces)[keep]
