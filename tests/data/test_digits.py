"""DigitsDataModule: scikit-learn's real 8x8 digits, stratified seeded split."""

from __future__ import annotations

import torch

from lightning_fisher.data import DigitsDataModule
from lightning_fisher.data.digits import load_digits_uint8, stratified_split


def test_attributes_and_statistics() -> None:
    dm = DigitsDataModule()
    assert (dm.num_classes, dm.num_channels, dm.image_size) == (10, 1, 8)
    images, labels = load_digits_uint8()
    assert images.shape == (1797, 1, 8, 8) and images.dtype == torch.uint8 and labels.dtype == torch.int64
    assert int(images.max()) == 255 and int(images.min()) == 0
    # The documented constants are the statistics of all 1,797 images (measured 0.30531, 0.37589).
    scaled = images.double() / 255
    assert abs(scaled.mean().item() - dm.mean[0]) < 1e-4
    assert abs(scaled.std(unbiased=False).item() - dm.std[0]) < 1e-4


def test_stratified_split_is_disjoint_and_seeded() -> None:
    dm = DigitsDataModule(test_fraction=0.25, seed=3)
    dm.setup()
    n_train, n_test = len(dm.train_set), len(dm.test_set)
    assert n_train + n_test == 1797
    _, labels = load_digits_uint8()
    per_class = torch.bincount(labels)
    expected_test = torch.tensor([round(0.25 * int(n)) for n in per_class])
    assert torch.equal(torch.bincount(dm.test_set.labels, minlength=10), expected_test)
    mask = stratified_split(labels, 0.25, seed=3)
    assert torch.equal(mask, stratified_split(labels, 0.25, seed=3))
    assert not torch.equal(mask, stratified_split(labels, 0.25, seed=4))
    # Each test image is the image at a masked position (so train and test are disjoint).
    images, _ = load_digits_uint8()
    assert torch.equal(dm.test_set.images, images[mask]) and torch.equal(dm.train_set.images, images[~mask])


def test_every_class_keeps_one_on_each_side() -> None:
    labels = torch.tensor([0, 0, 1, 1, 1, 2])
    mask = stratified_split(labels, 0.01, seed=0)
    assert mask[:2].sum() == 1 and mask[2:5].sum() == 1 and not mask[5]
    mask = stratified_split(labels, 0.99, seed=0)
    assert mask[:2].sum() == 1 and mask[2:5].sum() == 2


def test_batches_are_normalised_and_unflipped() -> None:
    dm = DigitsDataModule(batch_size=32, augment=True, seed=1)
    dm.setup("fit")
    images, labels = next(iter(dm.train_dataloader()))
    assert images.shape == (32, 1, 8, 8) and images.dtype == torch.uint8 and labels.dtype == torch.int64
    assert not dm.augmenter.flip and dm.augmenter.padding == 1
    normalised = dm.transform_batch(images, train=False)
    # Over the full train set the normalised pixels are near zero mean and unit spread (measured
    # mean 0.0004, std 1.0004 with seed 1).
    full = dm.transform_batch(dm.train_set.images, train=False)
    assert abs(full.mean().item()) < 0.02 and abs(full.std().item() - 1) < 0.02
    assert normalised.dtype == torch.float32


def test_preserved_rng_resumes_the_augmentation_sequence_where_it_was() -> None:
    dm, reference = (DigitsDataModule(batch_size=32, seed=1) for _ in range(2))
    dm.setup("fit")
    images, _ = next(iter(dm.train_dataloader()))
    first = dm.transform_batch(images, train=True)
    with dm.preserved_rng():
        inside = dm.transform_batch(images, train=True)  # drawn inside: augmented like any other
    after = dm.transform_batch(images, train=True)
    assert torch.equal(reference.transform_batch(images, train=True), first)
    assert torch.equal(inside, after) and not torch.equal(inside, first)
    assert torch.equal(reference.transform_batch(images, train=True), after)  # the second draw, as if none inside
