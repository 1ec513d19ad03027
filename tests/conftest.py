"""Shared fixtures. The control-plane and object-store fixtures live in tests/harness/."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

pytest_plugins = ["harness.fixtures"] if importlib.util.find_spec("harness.fixtures") else []


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO
