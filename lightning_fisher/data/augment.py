"""Batched, seeded image augmentation on uint8 tensors (random crop with padding, horizontal flip, normalise)."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from typing_extensions import override

__all__ = ["BatchAugment", "normalize", "random_crop", "random_horizontal_flip"]

log = logging.getLogger(__name__)


def random_crop(images: Tensor, padding: int, generator: torch.Generator | None = None) -> Tensor:
    """Zero-pads every image by ``padding`` pixels and crops it back to its size at a random offset.

    The same as torchvision's ``RandomCrop(size, padding=padding)`` applied to each image on its own
    (offsets uniform in ``[0, 2 * padding]`` per axis, top offsets drawn first), but done for the
    whole batch with one gather.

    Args:
        images: ``[B, C, H, W]`` tensor of any dtype.
        padding: pixels added on every side before cropping; ``0`` returns ``images`` unchanged.
        generator: source of the offsets; it must live on ``images.device``.

    Returns:
        A new ``[B, C, H, W]`` tensor of the same dtype and device.
    """
    if padding < 0:
        raise ValueError(f"padding={padding}: must be >= 0")
    _check_batch(images)
    if padding == 0:
        return images
    return _crop_and_flip(images, padding, None, generator)


def random_horizontal_flip(images: Tensor, generator: torch.Generator | None = None, p: float = 0.5) -> Tensor:
    """Mirrors each image of a ``[B, C, H, W]`` batch left-right with probability ``p``."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p={p}: must be in [0, 1]")
    _check_batch(images)
    return _crop_and_flip(images, 0, p, generator)


def _check_batch(images: Tensor) -> None:
    if images.ndim != 4:
        raise ValueError(f"images.shape={tuple(images.shape)}: must be [B, C, H, W]")


def _crop_and_flip(images: Tensor, padding: int, flip_p: float | None, generator: torch.Generator | None) -> Tensor:
    """Random padded crop, then (if ``flip_p`` is set) random flip, as one gather.

    Draws, in order: top offsets, left offsets (when ``padding > 0``), flip coins (when ``flip_p``
    is set), so the result equals ``random_crop`` followed by ``random_horizontal_flip`` on the same
    generator. A single gather over the flattened plane is about 8x faster on CPU than advanced
    indexing with four index tensors, and 1.6x faster than ``torch.where`` for the flip.
    """
    b, c, h, w = images.shape
    device = images.device
    source = F.pad(images, (padding, padding, padding, padding)) if padding else images
    source_w = w + 2 * padding
    if padding:
        top = torch.randint(0, 2 * padding + 1, (b,), generator=generator, device=device)
        left = torch.randint(0, 2 * padding + 1, (b,), generator=generator, device=device)
    else:
        top = left = torch.zeros(b, dtype=torch.int64, device=device)
    columns = torch.arange(w, device=device).expand(b, w)
    if flip_p is not None:
        flip = torch.rand(b, generator=generator, device=device) < flip_p
        columns = torch.where(flip[:, None], columns.flip(-1), columns)
    rows = top[:, None] + torch.arange(h, device=device)  # [B, H]
    cols = left[:, None] + columns  # [B, W]
    flat_index = (rows[:, :, None] * source_w + cols[:, None, :]).view(b, 1, h * w).expand(b, c, h * w)
    return source.flatten(2).gather(2, flat_index).view(b, c, h, w)


def normalize(images: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """Maps uint8 pixels (0..255) to float32 ``(x / 255 - mean) / std``, per channel.

    ``mean`` and ``std`` are ``[C]`` tensors of statistics on the 0..1 scale.
    """
    scale = (1.0 / (255.0 * std)).to(images.device, torch.float32)[None, :, None, None]
    shift = (mean / std).to(images.device, torch.float32)[None, :, None, None]
    return (images.to(torch.float32) * scale).sub_(shift)


class BatchAugment(nn.Module):
    """Training augmentation and normalisation for a whole uint8 batch, on the batch's device.

    In training mode (``forward(images, train=True)``): random crop with zero padding
    (``padding`` pixels per side, then cropped back to the input size) and, when ``flip`` is set, a
    random horizontal flip; then, in every mode, conversion to float32 and per-channel normalisation.
    The random draws come from a ``torch.Generator`` seeded with ``seed`` and kept per device, so the
    same seed gives the same sequence of augmentations on a given device. This is the standard
    CIFAR recipe (He et al., 2016, "Deep Residual Learning for Image Recognition", section 4.2).

    Args:
        mean: per-channel mean of the data set on the 0..1 scale.
        std: per-channel standard deviation on the 0..1 scale, all > 0.
        padding: crop padding in pixels; ``0`` disables the crop.
        flip: whether to flip horizontally with probability 0.5.
        seed: seed of the augmentation generator, in ``[0, 2**63)``.

    Raises:
        ValueError: when ``mean``/``std`` are empty or of different lengths, a ``std`` is not
            positive, ``padding < 0`` or ``seed`` is out of range.
    """

    mean: Tensor
    std: Tensor

    def __init__(
        self,
        mean: Sequence[float],
        std: Sequence[float],
        padding: int = 0,
        flip: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__()
        mean, std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        if not mean or len(mean) != len(std):
            raise ValueError(f"mean={mean}, std={std}: must be non-empty and of the same length")
        if any(s <= 0.0 for s in std):
            raise ValueError(f"std={std}: every value must be > 0")
        if not isinstance(padding, int) or isinstance(padding, bool) or padding < 0:
            raise ValueError(f"padding={padding!r}: must be an integer >= 0")
        if not isinstance(flip, bool):
            raise ValueError(f"flip={flip!r}: must be a bool")
        _check_seed(seed)
        self.padding = padding
        self.flip = flip
        self.seed = seed
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32), persistent=False)
        self._generators: dict[torch.device, torch.Generator] = {}

    def reseed(self, seed: int) -> None:
        """Restarts the augmentation sequence from ``seed`` (on every device)."""
        _check_seed(seed)
        self.seed = seed
        self._generators.clear()

    def rng_state(self) -> dict[torch.device, Tensor]:
        """The state of every augmentation generator created so far, per device (for :meth:`set_rng_state`)."""
        return {device: generator.get_state() for device, generator in self._generators.items()}

    def set_rng_state(self, state: dict[torch.device, Tensor]) -> None:
        """Puts the generators back to ``state`` (from :meth:`rng_state`); a device it does not name starts
        again from ``seed``."""
        self._generators.clear()
        for device, generator_state in state.items():
            self.generator(device).set_state(generator_state)

    def generator(self, device: torch.device) -> torch.Generator:
        """The augmentation generator for ``device``, created from ``seed`` on first use."""
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        if device not in self._generators:
            self._generators[device] = torch.Generator(device=device).manual_seed(self.seed)
        return self._generators[device]

    @override
    def forward(self, images: Tensor, train: bool = True) -> Tensor:
        """Augments (when ``train``) and normalises a ``[B, C, H, W]`` uint8 batch to float32."""
        if images.dtype != torch.uint8:
            raise TypeError(f"images.dtype={images.dtype}: must be torch.uint8 (pixels 0..255)")
        if images.ndim != 4 or images.shape[1] != self.mean.numel():
            raise ValueError(f"images.shape={tuple(images.shape)}: must be [B, {self.mean.numel()}, H, W]")
        if train and (self.padding or self.flip):
            generator = self.generator(images.device)
            images = _crop_and_flip(images, self.padding, 0.5 if self.flip else None, generator)
        if self.mean.device != images.device:
            self.to(images.device)
        return normalize(images, self.mean, self.std)

    @override
    def extra_repr(self) -> str:
        return f"padding={self.padding}, flip={self.flip}, seed={self.seed}"


def _check_seed(seed: int) -> None:
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**63:
        raise ValueError(f"seed={seed!r}: must be an integer in [0, 2**63)")
