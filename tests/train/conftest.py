"""Fixtures for the training tests (helpers live in train_helpers.py, importable by spawned processes too)."""

from __future__ import annotations

from pathlib import Path

import pytest
from train_helpers import RecordingTracker, halves_dataset


@pytest.fixture
def tracker() -> RecordingTracker:
    """A tracker that keeps every call in memory; tests pass it to `train(..., tracker=tracker)`."""
    return RecordingTracker()


@pytest.fixture(scope="session")
def halves(tmp_path_factory) -> Path:
    return halves_dataset(tmp_path_factory.mktemp("data") / "halves")
