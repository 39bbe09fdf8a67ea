"""Fixtures shared by several test modules, and the torch thread count under pytest-xdist."""

import os
import tempfile

import pytest
import torch


def pytest_configure(config):
    """Under pytest-xdist (``-n``, the default in pyproject.toml) each worker gets an equal share of
    the cores for torch's threads, so the workers do not oversubscribe the CPU.

    Under a forced CPU kernel family (``ATEN_CPU_CAPABILITY``, CI's second run of the numerical
    tests) ``torch.compile`` gets an on-disk cache of that family's own: inductor's FX graph cache
    does not key on the vector ISA it picks from the variable, so a graph compiled under avx512 came
    back from the shared cache under avx2 and computed NaN losses (torch 2.14; with a cache of its
    own the avx2 graphs equal eager)."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))
    capability = os.environ.get("ATEN_CPU_CAPABILITY")
    if capability and "TORCHINDUCTOR_CACHE_DIR" not in os.environ:  # before any compile; workers inherit it
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(
            tempfile.gettempdir(), f"torchinductor_{os.getuid()}_{capability.lower()}")


def pytest_report_header(config):
    """The CPU kernel family the run used (``ATEN_CPU_CAPABILITY`` picks it; the default is the best
    this CPU has), so a test log says which instruction set its numbers came from."""
    return f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}"


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module: its tensors are small and the CPU is shared (2 threads ran
    these tests up to 3x slower); the previous count is restored after the module."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
