"""Swapping to sparse modules mid-training: optimizer state moves, checkpoints stay dense, resume is exact."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lightning_fisher.sparse import NMSparseConv2d, NMSparseLinear
from lightning_fisher.sparse.training import densify_checkpoint_, sparse_layers, sparsify_training_


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 6))


def _nm_masks(model: nn.Module) -> dict[nn.Parameter, torch.Tensor]:
    """2:4 masks along the input dimension: keep the two largest |w| of every group."""
    masks = {}
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            w = module.weight.detach()
            matrix = w.permute(0, 2, 3, 1).reshape(w.shape[0], -1) if w.ndim == 4 else w
            groups = matrix.abs().reshape(matrix.shape[0], -1, 4)
            keep = torch.zeros_like(groups, dtype=torch.bool).scatter(2, groups.topk(2, dim=2).indices, True)
            keep = keep.reshape(matrix.shape)
            if w.ndim == 4:
                keep = keep.reshape(w.shape[0], w.shape[2], w.shape[3], w.shape[1]).permute(0, 3, 1, 2)
            masks[module.weight] = keep
    return masks


def _train(model: nn.Module, optimizer: torch.optim.Optimizer, steps: int, seed: int,
           masks: dict[nn.Parameter, torch.Tensor] | None = None) -> None:
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(5, 4, 4, 4, generator=generator)
        y = torch.randint(0, 6, (5,), generator=generator)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        if masks:
            with torch.no_grad():
                for param, mask in masks.items():
                    param.mul_(mask)


def _pruned_and_trained() -> tuple[nn.Module, torch.optim.Optimizer]:
    model = _net()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    _train(model, optimizer, 3, seed=1)
    masks = _nm_masks(model)
    with torch.no_grad():
        for param, mask in masks.items():
            param.mul_(mask)
    _train(model, optimizer, 2, seed=2, masks=masks)
    return model, optimizer


def test_swapped_training_continues_exactly_like_masked_dense_training() -> None:
    dense, dense_opt = _pruned_and_trained()
    sparse, sparse_opt = copy.deepcopy((dense, dense_opt))
    masks = {p: (p != 0) for p in (dense[0].weight, dense[3].weight)}

    report = sparsify_training_(sparse, [sparse_opt], "2:4", backend="triton")
    assert sorted(report.sparse) == ["0", "3"]
    assert isinstance(sparse[0], NMSparseConv2d) and isinstance(sparse[3], NMSparseLinear)
    held = {id(p) for group in sparse_opt.param_groups for p in group["params"]}
    assert set(map(id, sparse.parameters())) == held  # the new parameters, none of the old ones
    state = sparse_opt.state[sparse[3].values]
    assert state["exp_avg_sq"].shape == sparse[3].values.shape
    assert int(state["step"]) == 5  # the step count carried on

    _train(dense, dense_opt, 4, seed=3, masks=masks)
    _train(sparse, sparse_opt, 4, seed=3)
    torch.testing.assert_close(sparse[0].dense_weight(), dense[0].weight, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sparse[3].dense_weight(), dense[3].weight, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sparse[3].bias, dense[3].bias, rtol=1e-5, atol=1e-6)


def test_a_densified_checkpoint_loads_into_the_dense_model_and_resumes_exactly() -> None:
    model, optimizer = _pruned_and_trained()
    sparsify_training_(model, [optimizer], "2:4", backend="triton")
    _train(model, optimizer, 2, seed=4)
    checkpoint = {"state_dict": copy.deepcopy(model.state_dict()),
                  "optimizer_states": [copy.deepcopy(optimizer.state_dict())]}

    rewritten = densify_checkpoint_(checkpoint, model, [optimizer])
    assert rewritten == ["0", "3"]
    fresh = _net()
    fresh.load_state_dict(checkpoint["state_dict"])  # strict: the plain model's keys exactly
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-2, weight_decay=0.1)
    fresh_opt.load_state_dict(checkpoint["optimizer_states"][0])
    assert fresh_opt.state[fresh[3].weight]["exp_avg"].shape == fresh[3].weight.shape

    sparsify_training_(fresh, [fresh_opt], "2:4", backend="triton")
    for name in ("0", "3"):
        original, resumed = sparse_layers(model)[name], sparse_layers(fresh)[name]
        assert torch.equal(original.values, resumed.values)
        assert torch.equal(original.codes, resumed.codes)
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(optimizer.state[original.values][key], fresh_opt.state[resumed.values][key])
    _train(model, optimizer, 2, seed=5)
    _train(fresh, fresh_opt, 2, seed=5)
    assert torch.equal(model[3].values, fresh[3].values)


def test_layers_that_are_not_nm_stay_dense_and_keep_their_state() -> None:
    model, optimizer = _pruned_and_trained()
    with torch.no_grad():
        model[3].weight.fill_(1.0)  # no longer 2:4
    weight = model[3].weight
    report = sparsify_training_(model, [optimizer], "2:4", backend="triton")
    assert "3" in report.dense and model[3].weight is weight
    assert optimizer.state[weight]["exp_avg"].shape == weight.shape


@pytest.mark.parametrize("prefix", ["", "net."])
def test_densify_checkpoint_handles_a_key_prefix(prefix: str) -> None:
    model, optimizer = _pruned_and_trained()
    sparsify_training_(model, [optimizer], "2:4", backend="triton")
    checkpoint = {"state_dict": {f"{prefix}{k}": v for k, v in model.state_dict().items()}}
    densify_checkpoint_(checkpoint, model, prefix=prefix)
    assert f"{prefix}3.weight" in checkpoint["state_dict"]
    assert not any(key.endswith(("values", "codes")) for key in checkpoint["state_dict"])
