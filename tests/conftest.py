"""Fixtures shared by several test modules, and the torch thread count under pytest-xdist."""

import os

import pytest
import torch


def pytest_configure(config):
    """Under pytest-xdist (``-n``, the default in pyproject.toml) each worker gets an equal share of
    the cores for torch's threads, so the workers do not oversubscribe the CPU."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module: its tensors are small and the CPU is shared (2 threads ran
    these tests up to 3x slower); the previous count is restored after the module."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
