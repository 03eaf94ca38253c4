"""Under DDP every rank ends a step with the same factors and weights (2 CPU processes, gloo)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from lightning_fisher.optim import AdaFisher


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 16, 3))


def _data(rank: int) -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(10 + rank)
    x = torch.randn(4, 2, 4, 4, generator=generator) * (1 + 2 * rank)  # the ranks see different scales
    return x, torch.randint(0, 3, (4,), generator=generator)


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        net = _net()
        model = DistributedDataParallel(net)
        optimizer = AdaFisher(net, lr=0.01)
        x, y = _data(rank)
        first_step = None
        for _ in range(2):
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
            first_step = first_step or optimizer.factors()
        torch.save(
            {"first": first_step, "factors": optimizer.factors(), "weights": [p.detach() for p in net.parameters()]},
            Path(out_dir) / f"rank{rank}.pt",
        )
    finally:
        dist.destroy_process_group()


def _local_factors(rank: int) -> dict[str, dict]:
    """One rank's first-step factors measured alone (same initial weights)."""
    net = _net()
    optimizer = AdaFisher(net, lr=0.0)
    x, y = _data(rank)
    F.cross_entropy(net(x), y).backward()
    optimizer.step()
    return optimizer.factors()


@pytest.mark.distributed
def test_factors_are_all_reduced_so_ranks_take_the_same_step(tmp_path):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    rank0 = torch.load(tmp_path / "rank0.pt", weights_only=False)
    rank1 = torch.load(tmp_path / "rank1.pt", weights_only=False)
    for p, q in zip(rank0["weights"], rank1["weights"]):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    assert set(rank0["factors"]) == {"0", "3"}
    for name, entry in rank0["factors"].items():
        torch.testing.assert_close(rank1["factors"][name]["H"], entry["H"], rtol=0, atol=0)
        torch.testing.assert_close(rank1["factors"][name]["S"], entry["S"], rtol=0, atol=0)
    # the first step's factors: H pooled over both ranks' samples (equal counts, so the mean of the
    # ranks' H) and the mean of the ranks' S, each rank's measured alone from the same initial weights
    local = [_local_factors(0), _local_factors(1)]
    for name, entry in rank0["first"].items():
        assert not torch.allclose(local[0][name]["H"], local[1][name]["H"], rtol=0.1)  # the ranks do differ
        torch.testing.assert_close(entry["H"], (local[0][name]["H"] + local[1][name]["H"]) / 2)
        torch.testing.assert_close(entry["S"], (local[0][name]["S"] + local[1][name]["S"]) / 2)
