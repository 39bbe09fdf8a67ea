"""Nothing silently different across machines.

- The CPU kernel family: CI runs the numerical tests a second time under
  ``ATEN_CPU_CAPABILITY=avx2`` (this CI machine is AVX-512). These tests check that torch honours
  the switch, so that second run really is on the other instruction set.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

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


# ---------------------------------------------------------------- the end of a 2-process run


@pytest.mark.parametrize("finished", [True, False])
def test_ranks_leave_a_finished_run_together_and_a_failed_one_at_once(tmp_path, finished):
    """full_scale.distributed.teardown: after a finished run rank 1 waits for rank 0's last work (here:
    a file it writes late, as it writes the summary) before it tears down; after an error it does not
    wait (the other rank may never come). A rank that tore down early was aborted by gloo at exit."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", __file__,
           "teardown", str(tmp_path), str(int(finished))]
    done = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "rank1_saw_rank0_done").read_text() == str(finished)


def _teardown_ranks(out: Path, finished: bool) -> None:
    """Rank 0 is busy after the run (writes ``rank0_done``, late); rank 1 tears down, then records
    whether rank 0's work was done by then."""
    import time

    import torch.distributed as dist

    from full_scale.distributed import DistEnv, teardown

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    env = DistEnv(rank, 2, rank, torch.device("cpu"), owns_group=False)  # the group is this script's
    if rank == 0:
        left = out / "rank1_left"
        # a failed run: wait until rank 1 has left (it must not wait for us); a finished one: give an
        # early leaver a few seconds to show itself, then finish the work
        deadline = time.monotonic() + (120 if not finished else 5)
        while not left.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        (out / "rank0_done").write_text("done")
        teardown(env, finished)
    else:
        teardown(env, finished)
        (out / "rank1_saw_rank0_done").write_text(str((out / "rank0_done").exists()))
        (out / "rank1_left").write_text("left")
    dist.barrier()  # this script's own teardown, in step
    dist.destroy_process_group()


if __name__ == "__main__":  # under torchrun: tests/test_portability.py teardown OUT FINISHED
    _teardown_ranks(Path(sys.argv[2]), sys.argv[3] == "1")
