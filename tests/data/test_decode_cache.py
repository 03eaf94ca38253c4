"""PIL decoding into uint8 tensors and the fingerprinted disk cache."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from PIL import Image

from lightning_fisher.data.cache import CACHE_DIRNAME, cached_split, fingerprint_files
from lightning_fisher.data.dataset import ImageTensors
from lightning_fisher.data.decode import decode_images, list_image_folder, list_images


def _write(path: Path, mode: str, colour, size: int = 4) -> Path:  # noqa: ANN001
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, (size, size), colour).save(path)
    return path


def test_decode_images_rgb_grey_and_png(tmp_path: Path) -> None:
    paths = [
        _write(tmp_path / "a.png", "RGB", (1, 2, 3)),
        _write(tmp_path / "b.png", "L", 77),  # greyscale becomes three equal channels
        _write(tmp_path / "c.jpg", "RGB", (250, 0, 0)),
    ]
    out = decode_images(paths, 4)
    assert out.shape == (3, 3, 4, 4) and out.dtype == torch.uint8 and out.is_contiguous()
    assert out[0, :, 0, 0].tolist() == [1, 2, 3]
    assert out[1, :, 2, 2].tolist() == [77, 77, 77]
    assert abs(int(out[2, 0, 1, 1]) - 250) <= 3 and int(out[2, 1, 1, 1]) <= 3  # JPEG: near, not exact
    grey = decode_images(paths[:2], 4, mode="L")
    assert grey.shape == (2, 1, 4, 4) and int(grey[1, 0, 0, 0]) == 77


def test_decode_rejects_wrong_size(tmp_path: Path) -> None:
    path = _write(tmp_path / "big.png", "RGB", (0, 0, 0), size=5)
    with pytest.raises(RuntimeError, match=r"big.png: image is 5x5, expected 4x4"):
        decode_images([path], 4)


def test_list_image_folder(tmp_path: Path) -> None:
    _write(tmp_path / "b" / "2.JPG", "RGB", 0)
    _write(tmp_path / "b" / "1.png", "RGB", 0)
    _write(tmp_path / "a" / "0.jpeg", "RGB", 0)
    (tmp_path / "a" / "notes.txt").write_text("not an image")
    (tmp_path / ".hidden").mkdir()
    paths, labels, classes = list_image_folder(tmp_path)
    assert classes == ("a", "b")
    assert [p.name for p in paths] == ["0.jpeg", "1.png", "2.JPG"] and labels == [0, 1, 1]
    assert [p.name for p in list_images(tmp_path / "b")] == ["1.png", "2.JPG"]


def test_fingerprint_depends_on_names_and_sizes(tmp_path: Path) -> None:
    a, b = _write(tmp_path / "a.png", "RGB", 0), _write(tmp_path / "b.png", "RGB", 0)
    base = fingerprint_files([a, b], tmp_path)
    assert base == fingerprint_files([a, b], tmp_path) and len(base) == 16
    assert fingerprint_files([a], tmp_path) != base
    b.write_bytes(b.read_bytes() + b"\0")
    assert fingerprint_files([a, b], tmp_path) != base


def _tensors(value: int = 3) -> ImageTensors:
    return ImageTensors(torch.full((2, 1, 2, 2), value, dtype=torch.uint8), torch.tensor([0, 1]), ("x", "y"))


def test_cached_split_writes_then_reads(tmp_path: Path) -> None:
    calls = []

    def decode() -> ImageTensors:
        calls.append(1)
        return _tensors()

    first = cached_split(tmp_path, "toy", "train", "abc", decode)
    assert (tmp_path / CACHE_DIRNAME / "toy-train-abc.pt").is_file()
    assert not list((tmp_path / CACHE_DIRNAME).glob("*.tmp"))  # written via a temporary file, renamed
    second = cached_split(tmp_path, "toy", "train", "abc", decode)
    assert len(calls) == 1
    assert torch.equal(first.images, second.images) and torch.equal(first.labels, second.labels)
    assert second.classes == ("x", "y")
    cached_split(tmp_path, "toy", "train", "other", decode)  # another fingerprint: decoded again
    assert len(calls) == 2


def test_corrupt_cache_is_replaced(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / CACHE_DIRNAME / "toy-test-abc.pt"
    path.parent.mkdir()
    path.write_bytes(b"not a torch file")
    with caplog.at_level(logging.WARNING, logger="lightning_fisher.data.cache"):
        out = cached_split(tmp_path, "toy", "test", "abc", lambda: _tensors(9))
    assert int(out.images[0, 0, 0, 0]) == 9
    assert "Ignoring unreadable cache file" in caplog.text
    assert int(cached_split(tmp_path, "toy", "test", "abc", lambda: _tensors(1)).images[0, 0, 0, 0]) == 9


def test_unwritable_cache_warns_once_and_continues(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / CACHE_DIRNAME).write_text("a file where the cache directory should be")
    with caplog.at_level(logging.WARNING, logger="lightning_fisher.data.cache"):
        for split in ("train", "test", "train"):
            assert int(cached_split(tmp_path, "toy", split, "abc", _tensors).images.sum()) == 24
    warnings = [r for r in caplog.records if "Cannot write the decoded-data cache" in r.getMessage()]
    assert len(warnings) == 1
