"""ResNet18 for small images, built from torchvision's ``BasicBlock``.

He et al., "Deep Residual Learning for Image Recognition" (CVPR 2016), with the small-image stem that
the CIFAR literature uses: a 3×3 stride-1 convolution and no max-pool, so 32×32 inputs reach the last
stage at 4×4 instead of 1×1. At ``width=64`` with 10 classes it has 11,173,962 parameters.

TinyImageNet (64×64) keeps the same stem. The ImageNet stem (7×7 stride 2 + max-pool) would shrink a
64×64 image to 16×16 before the first block and throw away most of its detail; the 3×3 stride-1 stem
keeps full resolution in the first stage (the choice of most pruning papers on TinyImageNet) at four
times the CIFAR cost per image, and the last stage runs at 8×8 before global average pooling.
"""

from __future__ import annotations

from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock

__all__ = ["ResNet18", "resnet18_cifar", "resnet18_tinyimagenet"]


class ResNet18(nn.Module):
    """ResNet18 (He et al., 2016) with a 3×3 stride-1 stem for small images.

    Args:
        num_classes: outputs of the classifier.
        width: channels of the first stage (64 in the paper); later stages use 2×, 4×, 8× of it.
            Small widths build the same topology for tests and CPU proxies.
        in_channels: image channels (3 for colour, 1 for grey-scale digits).

    The stem convolution is ``conv1`` and the classifier ``fc``: the pruning callbacks keep both dense
    by default.
    """

    def __init__(self, num_classes: int = 10, width: int = 64, in_channels: int = 3) -> None:
        super().__init__()
        for name, value in (("num_classes", num_classes), ("width", width), ("in_channels", in_channels)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r}: must be a positive integer")
        self.conv1 = nn.Conv2d(in_channels, width, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self._in_planes = width
        self.layer1 = self._make_stage(width, stride=1)
        self.layer2 = self._make_stage(2 * width, stride=2)
        self.layer3 = self._make_stage(4 * width, stride=2)
        self.layer4 = self._make_stage(8 * width, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8 * width, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        # Zero-init the last BN of each residual branch: every block starts as the identity.
        for module in self.modules():
            if isinstance(module, BasicBlock):
                nn.init.zeros_(module.bn2.weight)

    def _make_stage(self, planes: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self._in_planes != planes:
            downsample = nn.Sequential(
                nn.Conv2d(self._in_planes, planes, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )
        blocks = [BasicBlock(self._in_planes, planes, stride=stride, downsample=downsample), BasicBlock(planes, planes)]
        self._in_planes = planes
        return nn.Sequential(*blocks)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.avgpool(x).flatten(1))


def resnet18_cifar(num_classes: int = 10, width: int = 64, in_channels: int = 3) -> ResNet18:
    """ResNet18 for 32×32 CIFAR images."""
    return ResNet18(num_classes=num_classes, width=width, in_channels=in_channels)


def resnet18_tinyimagenet(num_classes: int = 200, width: int = 64, in_channels: int = 3) -> ResNet18:
    """ResNet18 for 64×64 TinyImageNet images (same 3×3 stride-1 stem; see the module docstring)."""
    return ResNet18(num_classes=num_classes, width=width, in_channels=in_channels)
