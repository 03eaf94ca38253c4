"""Batched crop/flip/normalise: reference equality, seeding, validation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lightning_fisher.data.augment import BatchAugment, normalize, random_crop, random_horizontal_flip

MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)


def _images(b: int = 16, c: int = 3, h: int = 8, w: int = 8, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, 256, (b, c, h, w), generator=g, dtype=torch.uint8)  # no zeros: padding is visible


def test_random_crop_matches_per_image_reference() -> None:
    images, padding = _images(), 2
    out = random_crop(images, padding, torch.Generator().manual_seed(5))
    # The same draws, replayed: top offsets first, then left offsets.
    g = torch.Generator().manual_seed(5)
    top = torch.randint(0, 2 * padding + 1, (16,), generator=g)
    left = torch.randint(0, 2 * padding + 1, (16,), generator=g)
    for i in range(16):
        padded = F.pad(images[i], (padding,) * 4)
        expected = padded[:, top[i] : top[i] + 8, left[i] : left[i] + 8]
        assert torch.equal(out[i], expected)
    assert out.dtype == torch.uint8 and out.shape == images.shape
    # Every one of the 5 offsets per axis is used over a large batch.
    assert set(top.tolist()) == set(range(5))


def test_random_crop_zero_padding_is_identity_and_offsets_cover_range() -> None:
    images = _images()
    assert random_crop(images, 0) is images
    # A single bright pixel in the centre of 1x1x5x5 images moves by (top - padding, left - padding).
    centre = torch.zeros(400, 1, 5, 5, dtype=torch.uint8)
    centre[:, :, 2, 2] = 255
    out = random_crop(centre, 2, torch.Generator().manual_seed(0))
    positions = {tuple(torch.nonzero(o[0]).flatten().tolist()) for o in out}
    assert positions == {(y, x) for y in range(5) for x in range(5)}


def test_random_horizontal_flip() -> None:
    images = _images(b=200)
    assert torch.equal(random_horizontal_flip(images, p=1.0), images.flip(-1))
    assert torch.equal(random_horizontal_flip(images, p=0.0), images)
    out = random_horizontal_flip(images, torch.Generator().manual_seed(0))
    flipped = torch.tensor([torch.equal(o, i.flip(-1)) for o, i in zip(out, images)])
    kept = torch.tensor([torch.equal(o, i) for o, i in zip(out, images)])
    assert bool((flipped ^ kept).all())
    # 200 fair coins: measured 109 flips with seed 0; [70, 130] is > 4 sigma wide.
    assert 70 <= int(flipped.sum()) <= 130


def test_normalize_formula() -> None:
    images = torch.tensor([0, 51, 255], dtype=torch.uint8).view(1, 1, 1, 3).expand(1, 3, 1, 3).contiguous()
    mean, std = torch.tensor(MEAN), torch.tensor(STD)
    out = normalize(images, mean, std)
    expected = (images.double() / 255 - mean.double().view(1, 3, 1, 1)) / std.double().view(1, 3, 1, 1)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, expected.float(), rtol=1e-6, atol=1e-6)


def test_batch_augment_eval_is_normalisation_only() -> None:
    aug = BatchAugment(MEAN, STD, padding=4, flip=True)
    images = _images(h=32, w=32)
    out = aug(images, train=False)
    torch.testing.assert_close(out, normalize(images, torch.tensor(MEAN), torch.tensor(STD)))


def test_batch_augment_train_output_and_seeding() -> None:
    images = _images(b=64, h=32, w=32)
    a, b, other = BatchAugment(MEAN, STD, 4, True, seed=1), BatchAugment(MEAN, STD, 4, True, seed=1), BatchAugment(MEAN, STD, 4, True, seed=2)
    first = [a(images), a(images)]
    second = [b(images), b(images)]
    assert first[0].dtype == torch.float32 and first[0].shape == images.shape
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])  # same seed, same sequence
    assert not torch.equal(first[0], first[1])  # the sequence moves on
    assert not torch.equal(first[0], other(images))  # another seed, other draws
    assert not torch.equal(first[0], a(images, train=False))  # it did augment
    a.reseed(1)
    assert torch.equal(a(images), first[0])
    # Zero padding shows up as the normalised value of black, -mean/std, only in training mode.
    black = torch.tensor([-m / s for m, s in zip(MEAN, STD)]).view(1, 3, 1, 1)
    assert bool(torch.isclose(first[0], black, atol=1e-5).any())
    assert not bool(torch.isclose(a(images, train=False), black, atol=1e-5).any())


def test_batch_augment_rng_state_round_trip() -> None:
    images = _images(b=16, h=8, w=8)
    augment = BatchAugment(MEAN, STD, 2, True, seed=3)
    assert augment.rng_state() == {}  # no generator before the first draw
    augment(images)
    state = augment.rng_state()
    expected = [augment(images), augment(images)]
    augment(images)  # moves on
    augment.set_rng_state(state)
    assert torch.equal(augment(images), expected[0]) and torch.equal(augment(images), expected[1])
    augment.set_rng_state({})  # a device it does not name restarts from the seed
    assert torch.equal(augment(images), BatchAugment(MEAN, STD, 2, True, seed=3)(images))


def test_batch_augment_without_flip_never_flips() -> None:
    # A left-right ramp image: a flip would reverse it, a crop only shifts it.
    ramp = torch.arange(1, 9, dtype=torch.uint8).mul(20).view(1, 1, 1, 8).expand(100, 1, 8, 8).contiguous()
    aug = BatchAugment((0.0,), (1 / 255,), padding=1, flip=False)
    out = aug(ramp)
    rows = out[:, 0, 4]
    nonzero_diffs = [torch.diff(r[r > 0]) for r in rows]
    assert all(bool((d > 0).all()) for d in nonzero_diffs)


def test_batch_augment_rejects_bad_input() -> None:
    aug = BatchAugment(MEAN, STD)
    with pytest.raises(TypeError, match=r"images.dtype=torch.float32: must be torch.uint8"):
        aug(torch.zeros(2, 3, 4, 4))
    with pytest.raises(ValueError, match=r"images.shape=\(2, 1, 4, 4\): must be \[B, 3, H, W\]"):
        aug(torch.zeros(2, 1, 4, 4, dtype=torch.uint8))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"mean": (), "std": ()}, r"mean=\(\), std=\(\): must be non-empty and of the same length"),
        ({"mean": (0.5,), "std": (0.2, 0.2)}, r"must be non-empty and of the same length"),
        ({"std": (0.2, 0.0, 0.2)}, r"std=\(0.2, 0.0, 0.2\): every value must be > 0"),
        ({"padding": -1}, r"padding=-1: must be an integer >= 0"),
        ({"padding": 1.5}, r"padding=1.5: must be an integer >= 0"),
        ({"flip": "yes"}, r"flip='yes': must be a bool"),
        ({"seed": -1}, r"seed=-1: must be an integer in \[0, 2\*\*63\)"),
        ({"seed": 2**63}, r"seed=9223372036854775808: must be an integer in \[0, 2\*\*63\)"),
    ],
)
def test_batch_augment_validation(kwargs: dict, match: str) -> None:
    args = {"mean": MEAN, "std": STD} | kwargs
    with pytest.raises(ValueError, match=match):
        BatchAugment(**args)


def test_functional_validation() -> None:
    with pytest.raises(ValueError, match=r"padding=-2: must be >= 0"):
        random_crop(_images(), -2)
    with pytest.raises(ValueError, match=r"images.shape=\(3, 8, 8\): must be \[B, C, H, W\]"):
        random_crop(_images()[0], 1)
    with pytest.raises(ValueError, match=r"p=1.5: must be in \[0, 1\]"):
        random_horizontal_flip(_images(), p=1.5)
    with pytest.raises(ValueError, match=r"seed=True"):
        BatchAugment(MEAN, STD).reseed(True)


def test_batch_augment_equals_crop_then_flip() -> None:
    images = _images(b=64, h=32, w=32)
    out = BatchAugment(MEAN, STD, padding=4, flip=True, seed=3)(images)
    g = torch.Generator().manual_seed(3)
    expected = random_horizontal_flip(random_crop(images, 4, g), g)
    torch.testing.assert_close(out, normalize(expected, torch.tensor(MEAN), torch.tensor(STD)))
