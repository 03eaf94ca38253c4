"""Optimizers whose state is a Fisher estimate: AdaFisher / AdaFisherW (Kronecker factors per layer)."""

from lightning_fisher.optim.adafisher import AdaFisher, AdaFisherW

__all__ = ["AdaFisher", "AdaFisherW"]
