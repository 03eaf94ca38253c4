"""On-disk cache of decoded splits, keyed by a fingerprint of the source files."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from lightning_fisher.data.dataset import ImageTensors

__all__ = ["CACHE_DIRNAME", "CACHE_VERSION", "cached_split", "fingerprint_files"]

log = logging.getLogger(__name__)

CACHE_DIRNAME = ".lightning_fisher_cache"
# Bump when the decoded content for the same files changes (decoder, layout of the cache file).
CACHE_VERSION = 1

_warned_dirs: set[str] = set()


def fingerprint_files(paths: Iterable[str | os.PathLike[str]], root: str | os.PathLike[str]) -> str:
    """A short hash of the paths (relative to ``root``, in the given order) and their sizes in bytes.

    Modification times are left out so that a copy of the same files keeps its cache.
    """
    digest = hashlib.sha1(f"v{CACHE_VERSION}\n".encode())
    for path in paths:
        digest.update(f"{os.path.relpath(path, root)}\t{os.stat(path).st_size}\n".encode())
    return digest.hexdigest()[:16]


def cached_split(
    cache_root: str | os.PathLike[str],
    name: str,
    split: str,
    fingerprint: str,
    decode: Callable[[], ImageTensors],
) -> ImageTensors:
    """Loads ``<cache_root>/.lightning_fisher_cache/<name>-<split>-<fingerprint>.pt`` or decodes and saves it.

    A cache that cannot be written (read-only directory) costs one warning per directory and the run
    goes on uncached; a cache file that cannot be read is decoded again and replaced. Writes go to a
    temporary file renamed into place, so runs started together never read a half-written file.
    """
    cache_dir = Path(cache_root) / CACHE_DIRNAME
    path = cache_dir / f"{name}-{split}-{fingerprint}.pt"
    if path.is_file():
        start = time.perf_counter()
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True)
            data = ImageTensors(blob["images"], blob["labels"], tuple(blob["classes"]))
        except Exception as exc:  # a corrupt or foreign file: decode again
            log.warning("Ignoring unreadable cache file %s (%s); decoding again", path, exc)
        else:
            log.info("Loaded %s/%s from cache %s in %.2f s", name, split, path, time.perf_counter() - start)
            return data
    data = decode()
    _save(path, data)
    return data


def _save(path: Path, data: ImageTensors) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        blob = {"images": data.images, "labels": data.labels, "classes": list(data.classes), "version": CACHE_VERSION}
        torch.save(blob, tmp)
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        key = str(path.parent)
        if key not in _warned_dirs:
            _warned_dirs.add(key)
            log.warning("Cannot write the decoded-data cache in %s (%s); continuing without it", path.parent, exc)
        return
    log.info("Cached decoded %s in %s", path.stem, path)
