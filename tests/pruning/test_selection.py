import pytest
import torch
from torch import nn

from lightning_fisher.pruning.selection import clean_fqn, select_parameters


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3)
        self.block = nn.Sequential(nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8), nn.Conv2d(8, 8, 1))
        self.proj = nn.Linear(8, 16)
        self.head = nn.Linear(16, 10)


def test_default_keeps_stem_and_classifier_dense():
    net = Net()
    params = select_parameters(net)
    assert list(params) == ["block.0.weight", "block.2.weight", "proj.weight"]
    assert params["proj.weight"] is net.proj.weight


def test_keep_flags_off_select_every_conv_and_linear_weight():
    params = select_parameters(Net(), keep_first_dense=False, keep_last_dense=False)
    assert list(params) == ["stem.weight", "block.0.weight", "block.2.weight", "proj.weight", "head.weight"]


def test_patterns_match_module_or_parameter_names():
    net = Net()
    assert list(select_parameters(net, include=["block.*"])) == ["block.0.weight", "block.2.weight"]
    assert list(select_parameters(net, include=["proj.weight"])) == ["proj.weight"]
    assert list(select_parameters(net, exclude=["block.2"])) == ["block.0.weight", "proj.weight"]


def test_include_cannot_override_dense_stem():
    # the stem is matched (so no error) but stays dense; block.0 remains
    assert list(select_parameters(Net(), include=["stem", "block.0"])) == ["block.0.weight"]


def test_include_matching_nothing_is_an_error():
    with pytest.raises(ValueError, match=r"include=\['nope\*'\]: matches no Conv2d/Linear"):
        select_parameters(Net(), include=["block.*", "nope*"])


def test_nothing_left_is_an_error():
    with pytest.raises(ValueError, match="leave no weight to prune"):
        select_parameters(Net(), exclude=["*"])


def test_string_instead_of_list_is_an_error():
    with pytest.raises(TypeError, match="must be lists of patterns"):
        select_parameters(Net(), include="block.*")


def test_compiled_model_names_drop_orig_mod():
    wrapper = nn.Module()
    wrapper.net = torch.compile(Net())  # nothing is compiled until the first call
    params = select_parameters(wrapper)
    assert list(params) == ["net.block.0.weight", "net.block.2.weight", "net.proj.weight"]
    assert clean_fqn("net._orig_mod.proj.weight") == "net.proj.weight"
