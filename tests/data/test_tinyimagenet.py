"""TinyImageNetDataModule on a miniature tiny-imagenet-200 tree (all 200 wnids, 1-2 images each)."""

from __future__ import annotations

import shutil
from pathlib import Path
from types import ModuleType

import pytest
import torch

import lightning_fisher.data.tinyimagenet as tin_module
from lightning_fisher.data import TinyImageNetDataModule
from lightning_fisher.data.cache import CACHE_DIRNAME
from lightning_fisher.data.tinyimagenet import read_wnids


def test_attributes_before_setup(tmp_path: Path) -> None:
    dm = TinyImageNetDataModule(tmp_path)
    assert (dm.num_classes, dm.num_channels, dm.image_size) == (200, 3, 64)
    assert dm.mean == (0.4791, 0.4474, 0.3971) and dm.std == (0.2766, 0.2693, 0.2818)


@pytest.mark.parametrize("nested", [True, False])
def test_loads_both_placements(tiny_imagenet_dir: Path, nested: bool, fmt: ModuleType) -> None:
    data_dir = tiny_imagenet_dir if nested else tiny_imagenet_dir / "tiny-imagenet-200"
    dm = TinyImageNetDataModule(data_dir)
    dm.prepare_data()
    dm.setup("fit")
    assert dm.locate() == tiny_imagenet_dir / "tiny-imagenet-200"
    assert dm.classes == tuple(fmt.wnid(i) for i in range(200))  # the extra wnids.txt lines are ignored
    train, val = dm.train_set, dm.test_set
    n_train = 200 + len(fmt.TIN_TWO_IMAGE_CLASSES)
    assert train.images.shape == (n_train, 3, 64, 64) and train.images.dtype == torch.uint8
    assert train.labels.dtype == torch.int64
    counts = torch.bincount(train.labels, minlength=200)
    assert counts[list(fmt.TIN_TWO_IMAGE_CLASSES)].tolist() == [2, 2, 2] and int(counts.min()) == 1
    # Labels follow wnids.txt: class i's images were written with red = i (JPEG: within 3).
    colour = [i for i, y in enumerate(train.labels.tolist()) if not (y == 1 and train.images[i, 0, 0, 0] == 200)]
    red = train.images[colour, 0].float().mean(dim=(1, 2))
    torch.testing.assert_close(red, train.labels[colour].float(), atol=3, rtol=0)
    # The greyscale JPEG comes out as three equal channels.
    grey = [i for i in range(n_train) if int(train.labels[i]) == 1 and bool((train.images[i] == 200).all())]
    assert len(grey) == 1
    assert val.labels.tolist() == [label for _, label in fmt.TIN_VAL]
    assert val.images.shape == (len(fmt.TIN_VAL), 3, 64, 64)
    torch.testing.assert_close(val.images[:, 0].float().mean(dim=(1, 2)), val.labels.float(), atol=3, rtol=0)
    assert (data_dir / CACHE_DIRNAME).is_dir()


def test_cache_is_used_on_second_construction(tiny_imagenet_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = TinyImageNetDataModule(tiny_imagenet_dir)
    first.prepare_data()
    first.setup("fit")

    def no_decoding(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise AssertionError("decoded again despite the cache")

    monkeypatch.setattr(tin_module, "decode_images", no_decoding)
    second = TinyImageNetDataModule(tiny_imagenet_dir)
    second.setup("fit")
    assert torch.equal(second.train_set.images, first.train_set.images)
    assert torch.equal(second.test_set.labels, first.test_set.labels)
    # Editing the validation labels changes the fingerprint of the val split.
    annotations = tiny_imagenet_dir / "tiny-imagenet-200" / "val" / "val_annotations.txt"
    annotations.write_text(annotations.read_text() + "\n")
    with pytest.raises(AssertionError, match="decoded again"):
        TinyImageNetDataModule(tiny_imagenet_dir).setup("test")


def test_missing_data_message(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as info:
        TinyImageNetDataModule(tmp_path).setup()
    message = str(info.value)
    assert f"TinyImageNet not found in data_dir={str(tmp_path)!r}" in message
    for needle in (
        str(tmp_path / "tiny-imagenet-200"),
        "wnids.txt, train/<wnid>/images/*.JPEG, val/images/*.JPEG, val/val_annotations.txt",
        "data.data_dir=/path/to/data",
    ):
        assert needle in message


def test_read_wnids_needs_200_distinct(tmp_path: Path) -> None:
    path = tmp_path / "wnids.txt"
    path.write_text("".join(f"n{i:08d}\n" for i in range(200)) + "extra\n")
    assert len(read_wnids(path)) == 200
    path.write_text("".join(f"n{i:08d}\n" for i in range(199)))
    with pytest.raises(RuntimeError, match=r"the first 200 lines must be 200 distinct, non-empty wnids"):
        read_wnids(path)
    path.write_text("".join(f"n{i % 100:08d}\n" for i in range(200)))
    with pytest.raises(RuntimeError, match=r"200 distinct"):
        read_wnids(path)


def test_unknown_wnid_in_val_annotations(tiny_imagenet_dir: Path) -> None:
    annotations = tiny_imagenet_dir / "tiny-imagenet-200" / "val" / "val_annotations.txt"
    annotations.write_text(annotations.read_text() + "val_0.JPEG\tn12345678\t0\t0\t1\t1\n")
    with pytest.raises(RuntimeError, match=r"val_annotations.txt:5: expected 'file<TAB>wnid<TAB>box'"):
        TinyImageNetDataModule(tiny_imagenet_dir).setup("test")


def test_missing_class_folder(tiny_imagenet_dir: Path) -> None:
    shutil.rmtree(tiny_imagenet_dir / "tiny-imagenet-200" / "train" / "n00000007")
    with pytest.raises(RuntimeError, match=r"missing training folder .*n00000007/images for class n00000007"):
        TinyImageNetDataModule(tiny_imagenet_dir).setup("fit")


def test_max_per_class_and_loader(tiny_imagenet_dir: Path) -> None:
    dm = TinyImageNetDataModule(tiny_imagenet_dir, max_per_class=1, batch_size=64, eval_batch_size=3)
    dm.setup("fit")
    assert torch.bincount(dm.train_set.labels).tolist() == [1] * 200
    images, labels = next(iter(dm.train_dataloader()))
    assert images.shape == (64, 3, 64, 64) and labels.shape == (64,)
    out = dm.transform_batch(images, train=True)
    assert out.shape == (64, 3, 64, 64) and out.dtype == torch.float32
    assert [len(y) for _, y in dm.val_dataloader()] == [3, 1]
