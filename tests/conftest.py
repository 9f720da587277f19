"""Shared test set-up: GPU tests skip without CUDA; each test starts with a fresh Dynamo
cache and its own kernel cache directory (so tests never touch the user's cache)."""
from __future__ import annotations

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def fresh_compiler_state(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("FLASHFX_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "flashfx-cache"))
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
