import pytest
import torch
from torch import nn

from lightning_fisher.pruning.masks import (
    apply_masks_,
    export_pruned,
    layer_sparsity,
    load_masks,
    load_pruned,
    mask_path,
    masks_state_dict,
    sparsity,
)


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))


def test_apply_masks_zeroes_pruned_entries_in_place():
    net = _net()
    params = {"0.weight": net[0].weight}
    mask = torch.rand(8, 4, generator=torch.Generator().manual_seed(0)) > 0.5
    before = net[0].weight.detach().clone()
    apply_masks_(params, {"0.weight": mask})
    assert (net[0].weight[~mask] == 0).all()
    assert torch.equal(net[0].weight[mask], before[mask])
    assert isinstance(net[0].weight, nn.Parameter) and net[0].weight.requires_grad
    assert sparsity({"0.weight": mask}) == pytest.approx(int((~mask).sum()) / 32)
    assert layer_sparsity({"0.weight": mask}) == {"0.weight": pytest.approx(int((~mask).sum()) / 32)}


def test_mask_state_round_trip_is_strict():
    params = {"a": torch.zeros(2, 3), "b": torch.zeros(4)}
    masks = {"a": torch.tensor([[True, False, True], [False, True, True]]), "b": torch.tensor([True, False, True, True])}
    state = masks_state_dict(masks)
    assert all(v.device.type == "cpu" and v.dtype == torch.bool for v in state.values())
    loaded = load_masks(params, state)
    assert all(torch.equal(loaded[k], masks[k]) for k in masks)
    with pytest.raises(KeyError, match=r"missing \['b'\], unexpected \['c'\]"):
        load_masks(params, {"a": state["a"], "c": state["b"]})
    with pytest.raises(ValueError, match=r"b: \(3,\) vs \(4,\)"):
        load_masks(params, {"a": state["a"], "b": torch.ones(3, dtype=torch.bool)})


def test_export_and_reload_pruned_state_dict(tmp_path):
    net = _net()
    masks = {"0.weight": torch.rand(8, 4, generator=torch.Generator().manual_seed(1)) > 0.3}
    # the live model still holds non-zeros at pruned positions: export folds the masks
    state_file, masks_file = export_pruned(net, masks, tmp_path / "model.pt")
    assert masks_file == mask_path(tmp_path / "model.pt") == tmp_path / "model.masks.pt"
    plain = torch.load(state_file, weights_only=True)
    assert set(plain) == set(net.state_dict())  # an ordinary state_dict, no extra keys
    assert (plain["0.weight"][~masks["0.weight"]] == 0).all()
    fresh = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    loaded = load_pruned(fresh, state_file)
    assert torch.equal(loaded["0.weight"], masks["0.weight"])
    assert torch.equal(fresh[0].weight, plain["0.weight"]) and torch.equal(fresh[2].weight, net[2].weight)


def test_load_pruned_rejects_mismatched_files(tmp_path):
    net = _net()
    masks = {"0.weight": torch.zeros(8, 4, dtype=torch.bool)}
    state_file, _ = export_pruned(net, masks, tmp_path / "m.pt")
    state = torch.load(state_file, weights_only=True)
    state["0.weight"][0, 0] = 1.0
    torch.save(state, state_file)
    with pytest.raises(ValueError, match=r"weights \['0.weight'\] are non-zero where their masks prune them"):
        load_pruned(_net(), state_file)


def test_export_of_a_compiled_model_has_plain_keys(tmp_path):
    net = _net()
    compiled = torch.compile(net)
    state_file, _ = export_pruned(compiled, {"0.weight": torch.ones(8, 4, dtype=torch.bool)}, tmp_path / "c.pt")
    assert set(torch.load(state_file, weights_only=True)) == set(net.state_dict())
