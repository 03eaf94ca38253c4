"""Shared fixtures of the compression tests."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _one_thread_everywhere(one_thread: None) -> None:
    """Every compression test runs on one torch thread (the ``one_thread`` fixture of tests/conftest.py)."""
