"""Nothing silently different across machines.

- The CPU kernel family: CI runs the numerical tests a second time under
  ``ATEN_CPU_CAPABILITY=avx2`` (this CI machine is AVX-512). These tests check that torch honours
  the switch, so that second run really is on the other instruction set.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def capability_under(value: str | None) -> str:
    """What a fresh interpreter reports with ``ATEN_CPU_CAPABILITY`` set to ``value`` (None: unset)."""
    env = {k: v for k, v in os.environ.items() if k != "ATEN_CPU_CAPABILITY"}
    if value is not None:
        env["ATEN_CPU_CAPABILITY"] = value
    done = subprocess.run([sys.executable, "-c", "import torch; print(torch.backends.cpu.get_cpu_capability())"],
                          env=env, capture_output=True, text=True, timeout=120, check=True)
    return done.stdout.strip()


def test_the_capability_switch_is_honoured_and_unset_means_the_best_the_cpu_has():
    best = capability_under(None)
    assert capability_under("default") == "DEFAULT"  # every CPU runs the portable kernels
    if best not in ("AVX2", "AVX512"):
        pytest.skip(f"this CPU's best kernel family is {best}: the avx2 switch is for x86 with AVX2 or more")
    assert capability_under("avx2") == "AVX2"  # what CI's second run of the numerical tier sets
    assert capability_under("AVX2") == best  # torch takes lower case only: anything else is ignored (a warning)


@pytest.mark.numerical
def test_this_run_uses_the_capability_it_asked_for():
    """In CI's ``ATEN_CPU_CAPABILITY=avx2`` run of the numerical tier: the process really is on avx2
    (torch ignores a value it does not know with a warning only, and the second run would silently
    repeat the first)."""
    asked = os.environ.get("ATEN_CPU_CAPABILITY")
    if not asked:
        pytest.skip("ATEN_CPU_CAPABILITY is not set: the default (best) kernel family is in use")
    assert torch.backends.cpu.get_cpu_capability() == asked.upper()


def test_the_capability_check_passes_when_honoured_and_fails_when_ignored():
    if capability_under(None) not in ("AVX2", "AVX512"):
        pytest.skip("needs an x86 CPU with AVX2 or more")
    node = f"{__file__}::test_this_run_uses_the_capability_it_asked_for"

    def run(value: str) -> subprocess.CompletedProcess:
        env = {**os.environ, "ATEN_CPU_CAPABILITY": value}
        return subprocess.run([sys.executable, "-m", "pytest", "-q", "-n", "0", "-p", "no:cacheprovider", node],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)

    honoured, ignored = run("avx2"), run("AVX2")
    assert honoured.returncode == 0 and "1 passed" in honoured.stdout, honoured.stdout[-2000:]
    assert ignored.returncode == 1 and "1 failed" in ignored.stdout, ignored.stdout[-2000:]
