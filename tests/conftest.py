"""Shared fixtures.

Tests that need the real files in ../shared/data use the ``shared_data`` fixture: outside CI a missing
folder skips them with a reason; under CI (``CI`` set) it fails loudly, so a broken checkout can't turn
into a silently green run.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("HISTOCLIP_SHARED_DATA", REPO.parent / "shared" / "data"))


def require_shared_data() -> Path:
    if SHARED_DATA.is_dir():
        return SHARED_DATA
    message = f"test data folder {SHARED_DATA} is missing (set HISTOCLIP_SHARED_DATA to its location)"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    return require_shared_data()


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO
