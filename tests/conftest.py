"""Shared fixtures: tiny ViTs so the suite runs in minutes on 2 CPU cores."""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import pytest
import torch

torch.set_num_threads(1)


def wait_until(cond: Callable[[], object], timeout: float = 300.0, every: float = 0.1) -> object:
    """Poll ``cond`` until it returns something truthy (returned), or fail after ``timeout`` seconds."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        if value := cond():
            return value
        time.sleep(every)
    raise AssertionError("timed out")


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Feature caches and runs of a test never touch the user's folders."""
    monkeypatch.setenv("STUDIO_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
    monkeypatch.setenv("STUDIO_RUNS", str(tmp_path_factory.getbasetemp() / "runs"))
    # device locks are machine-wide: a test's jobs must not meet another session's (or the user's) locks
    monkeypatch.setenv("STUDIO_LOCK_DIR", str(tmp_path_factory.mktemp("locks")))


TINY_KWARGS = dict(img_size=32, patch_size=8, embed_dim=48, depth=3, num_heads=3, num_classes=5)


@pytest.fixture
def tiny_vit():
    """A 3-block, 3-head ViT on 32x32 inputs with random weights (seeded)."""
    from studio.models import create_vit

    torch.manual_seed(0)
    return create_vit("vit_tiny_patch16_224", **TINY_KWARGS).eval()


@pytest.fixture(scope="session")
def demo_loaded():
    """The embedded demo model (read-only: deep-copy before changing it)."""
    from studio.load import load_model
    from studio.models import ModelSpec

    return load_model(ModelSpec("demo", device="cpu"))


def pytest_report_header(config):
    return f"torch threads: {torch.get_num_threads()}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}"
