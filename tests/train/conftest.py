"""Fixtures for the training tests (helpers live in train_helpers.py, importable by spawned processes too)."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest
from train_helpers import RecordingTracker, halves_dataset


@pytest.fixture
def tracker(monkeypatch) -> RecordingTracker:
    """Route the loop's make_tracker to a RecordingTracker (works before medgan.tracking exists)."""
    rec = RecordingTracker()
    if "medgan.tracking" not in sys.modules:
        try:
            import medgan.tracking  # noqa: F401
        except ImportError:
            monkeypatch.setitem(sys.modules, "medgan.tracking", types.ModuleType("medgan.tracking"))
    monkeypatch.setattr(sys.modules["medgan.tracking"], "make_tracker", lambda *a, **k: rec, raising=False)
    return rec


@pytest.fixture(scope="session")
def halves(tmp_path_factory) -> Path:
    return halves_dataset(tmp_path_factory.mktemp("data") / "halves")
