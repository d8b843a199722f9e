"""The runtime: who a process is in a job, and the gathering that makes one global loss."""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from taxoclip import TaxoclipError
from taxoclip.runtime import Runtime, gather_with_grad, launch_environment, setup

ROWS = {0: slice(0, 3), 1: slice(3, 5)}  # rank 0 holds 3 rows, rank 1 holds 2: unequal on purpose


def position_weighted_loss(rows: torch.Tensor) -> torch.Tensor:
    """A loss that depends on which row lands where, so a misplaced row changes it."""
    return (rows**2 * torch.arange(1, len(rows) + 1)[:, None]).sum()


def gather_worker(rank: int, world: int, init_file: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    full = torch.randn(5, 3, generator=torch.Generator().manual_seed(0))
    mine = full[ROWS[rank]].clone().requires_grad_()
    rows, labels = gather_with_grad(mine, torch.arange(5)[ROWS[rank]])
    position_weighted_loss(rows).backward()
    torch.save({"rows": rows.detach(), "labels": labels, "grad": mine.grad}, f"{out}/{rank}.pt")
    dist.destroy_process_group()


def test_gathered_rows_carry_the_global_gradient_back_to_their_owner(tmp_path):
    mp.spawn(gather_worker, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    full = torch.randn(5, 3, generator=torch.Generator().manual_seed(0)).requires_grad_()
    position_weighted_loss(full).backward()
    for rank in (0, 1):
        seen = torch.load(tmp_path / f"{rank}.pt", weights_only=True)
        assert torch.equal(seen["rows"], full.detach()) and seen["labels"].tolist() == [0, 1, 2, 3, 4]
        # Every rank computed the same loss, so each row's gradient is summed over the 2 ranks;
        # DistributedDataParallel's average over ranks then gives the one-process gradient.
        assert torch.allclose(seen["grad"], 2 * full.grad[ROWS[rank]])


def test_launch_environment_from_torchrun_or_srun(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "SLURM_STEP_NUM_TASKS", "SLURM_PROCID", "SLURM_LOCALID"):
        monkeypatch.delenv(name, raising=False)
    assert launch_environment() == (0, 1, 0)
    monkeypatch.setenv("SLURM_PROCID", "3")  # inside an allocation but not an srun step: alone
    assert launch_environment() == (0, 1, 0)
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "8")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    assert launch_environment() == (3, 8, 1)
    monkeypatch.setenv("WORLD_SIZE", "4")  # torchrun's word comes first
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert launch_environment() == (2, 4, 0)


def test_several_processes_without_a_rendezvous_address_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(TaxoclipError, match="MASTER_ADDR is not set"):
        setup("cpu")


def test_alone_a_process_is_rank_0_of_1_and_shares_everything():
    runtime = Runtime()
    assert runtime.is_main and not runtime.distributed
    assert runtime.share([1, 2, 3]) == [1, 2, 3] and runtime.gather_objects(7) == [7]
    assert Runtime(rank=1, world_size=2).share([1, 2, 3, 4, 5]) == [2, 4]
