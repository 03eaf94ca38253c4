"""Classifiers used by the recipes."""

from lightning_fisher.models.resnet import ResNet18, resnet18_cifar, resnet18_tinyimagenet

__all__ = ["ResNet18", "resnet18_cifar", "resnet18_tinyimagenet"]
