import pytest
import torch

from lightning_fisher.models import ResNet18, resnet18_cifar, resnet18_tinyimagenet


def _count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_cifar_resnet18_has_the_published_parameter_count():
    # 11,173,962 is the CIFAR ResNet18 (3x3 stem, no max-pool) count at width 64 with 10 classes.
    assert _count(resnet18_cifar(num_classes=10)) == 11_173_962


def test_tinyimagenet_resnet18_differs_only_in_the_classifier():
    assert _count(resnet18_tinyimagenet()) == 11_173_962 + 512 * 190 + 190


@pytest.mark.parametrize(
    ("factory", "size", "classes"), [(resnet18_cifar, 32, 10), (resnet18_tinyimagenet, 64, 200)]
)
def test_output_shapes(factory, size, classes):
    model = factory(width=4)
    assert model(torch.randn(2, 3, size, size)).shape == (2, classes)


def test_stem_is_3x3_stride_1_without_max_pool():
    model = resnet18_cifar(width=8)
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert not any(isinstance(m, torch.nn.MaxPool2d) for m in model.modules())
    # the last stage sees 4x4 feature maps for a 32x32 input
    features = {}

    def record(module, inputs, output):
        features["layer4"] = output.shape

    model.layer4.register_forward_hook(record)
    model(torch.randn(1, 3, 32, 32))
    assert features["layer4"][-2:] == (4, 4)


def test_width_builds_the_same_topology_smaller():
    small, full = ResNet18(width=4), ResNet18(width=64)
    assert [n for n, _ in small.named_parameters()] == [n for n, _ in full.named_parameters()]
    assert _count(small) < _count(full) / 100


def test_grey_scale_input_channels():
    assert ResNet18(num_classes=10, width=4, in_channels=1)(torch.randn(2, 1, 8, 8)).shape == (2, 10)


@pytest.mark.parametrize("kwargs", [{"width": 0}, {"num_classes": -1}, {"in_channels": 2.5}])
def test_bad_arguments(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        ResNet18(**kwargs)
