"""Nothing silently different across machines.

- The CPU kernel family: CI runs the numerical tests a second time under another
  ``ATEN_CPU_CAPABILITY`` (``avx2`` on an AVX-512 machine, ``default`` where AVX2 is the best). These
  tests check that torch honours the switch, so that second run really is on the other instruction set.
- The end of a 2-process run: every rank leaves a finished run together.
- The GPU check on a machine with torch only (no pydantic, the project not installed):
  ``benchmarks/gpu_check.sh`` runs ``benchmarks/full_scale_step.py`` from carried wheels. Here that
  machine is an interpreter without its site-packages (``python -S``) that sees torch and what torch
  requires, nothing else; the wheels are rebuilt from the installed distributions (no download).
"""

from __future__ import annotations

import importlib.metadata
import json
import math
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
    assert capability_under("DEFAULT") == best  # torch takes lower case only: anything else is ignored (a warning)


@pytest.mark.numerical
def test_this_run_uses_the_capability_it_asked_for():
    """In CI's second run of the numerical tier (``ATEN_CPU_CAPABILITY=avx2`` or ``default``): the process
    really is on that family (torch ignores a value it does not know with a warning only, and the
    second run would silently repeat the first)."""
    asked = os.environ.get("ATEN_CPU_CAPABILITY")
    if not asked:
        pytest.skip("ATEN_CPU_CAPABILITY is not set: the default (best) kernel family is in use")
    assert torch.backends.cpu.get_cpu_capability() == asked.upper()


@pytest.mark.slow  # two more pytest runs
def test_the_capability_check_passes_when_honoured_and_fails_when_ignored():
    if capability_under(None) not in ("AVX2", "AVX512"):
        pytest.skip("needs an x86 CPU with AVX2 or more")
    node = f"{__file__}::test_this_run_uses_the_capability_it_asked_for"

    def run(value: str) -> subprocess.CompletedProcess:
        env = {**os.environ, "ATEN_CPU_CAPABILITY": value}
        return subprocess.run([sys.executable, "-m", "pytest", "-q", "-n", "0", "-p", "no:cacheprovider", node],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)

    # Upper case is ignored by torch (the best family stays); DEFAULT differs from the best on any
    # x86 with AVX2, where AVX2 may itself be the best (a CPU without AVX-512) and could not fail.
    honoured, ignored = run("avx2"), run("DEFAULT")
    assert honoured.returncode == 0 and "1 passed" in honoured.stdout, honoured.stdout[-2000:]
    assert ignored.returncode == 1 and "1 failed" in ignored.stdout, ignored.stdout[-2000:]


# ---------------------------------------------------------------- the end of a 2-process run


@pytest.mark.slow  # two processes under torchrun
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
        deadline = time.monotonic() + (120 if not finished else 3)
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


# ---------------------------------------------------------------- the GPU check on a bare machine

CARRIED = ("pydantic", "pydantic-core", "annotated-types", "typing-inspection", "typing-extensions")


def torch_only_site(dest: Path) -> Path:
    """A folder that holds torch and the distributions it requires (links), as a bare machine's
    site-packages would; nothing of this project, no pydantic."""
    import importlib.metadata as md

    from packaging.requirements import Requirement

    dest.mkdir()
    todo, seen = ["torch"], set()
    while todo:
        try:
            dist = md.distribution(todo.pop())
        except md.PackageNotFoundError:  # a requirement this platform's torch does not install
            continue
        if dist.name.lower() in seen:
            continue
        seen.add(dist.name.lower())
        todo += [r.name for r in map(Requirement, dist.requires or [])
                 if r.marker is None or r.marker.evaluate({"extra": ""})]
        for top in {f.parts[0] for f in dist.files or []} - {"..", "__pycache__"}:
            if not top.endswith(".pth") and not (dest / top).exists():
                (dest / top).symlink_to(dist.locate_file(top))
    assert "pydantic" not in seen and "mutransfer" not in seen
    return dest


def wheel_of(name: str, dest: Path) -> Path:
    """The installed distribution ``name`` zipped back into a wheel (a wheel is a zip of what it
    installs into site-packages)."""
    import importlib.metadata as md
    import zipfile

    dist = md.distribution(name)
    path = dest / f"{dist.name.replace('-', '_')}-{dist.version}-carried.whl"
    with zipfile.ZipFile(path, "w") as z:
        for f in dist.files or []:
            if f.parts[0] != ".." and "__pycache__" not in f.parts:
                z.write(dist.locate_file(f), str(f))
    return path


@pytest.fixture(scope="module")
def bare_machine(tmp_path_factory):
    """(an interpreter that sees torch only, a folder of the wheels the check carries)."""
    root = tmp_path_factory.mktemp("bare")
    site = torch_only_site(root / "site")
    python = root / "python3"
    python.write_text(f'#!/bin/sh\nPYTHONPATH="${{PYTHONPATH:+$PYTHONPATH:}}{site}" exec {sys.executable} -S "$@"\n')
    python.chmod(0o755)
    wheels = root / "wheels"
    wheels.mkdir()
    for name in CARRIED:
        wheel_of(name, wheels)
    return python, wheels


def gpu_check(python: Path, wheels: Path, tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    """``bash benchmarks/gpu_check.sh`` as on the device: from another folder, no PYTHONPATH of ours."""
    (tmp_path / "tmp").mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(PYTHON=str(python), MUTRANSFER_WHEELS=str(wheels), TMPDIR=str(tmp_path / "tmp"))
    return subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu_check.sh"), *args], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=600)


def test_the_bare_interpreter_has_torch_and_nothing_of_ours(bare_machine, tmp_path):
    python, _ = bare_machine
    code = "import importlib.util as u; print([bool(u.find_spec(m)) for m in ('torch', 'pydantic', 'mutransfer')])"
    done = subprocess.run([str(python), "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert done.stdout.strip() == "[True, False, False]", done.stderr[-2000:]


def test_the_gpu_check_runs_from_carried_wheels_on_a_machine_with_torch_only(bare_machine, tmp_path):
    python, wheels = bare_machine
    done = gpu_check(python, wheels, tmp_path, "out/check.json", "--dry-run")
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "out" / "check.json").read_text())
    assert result["mode"] == "dry-run" and result["environment"]["device"] == "cpu"
    shape = result["model"]["d_model"], result["model"]["n_layers"], result["seq_len"], result["steps"]
    assert shape == (64, 1, 64, 2)
    cases = {r["precision"]: r for r in result["results"]}
    assert set(cases) == {"fp32", "bf16", "fp8-emulated", "fp8-te", "fp8-torchao"}
    for precision in ("fp32", "bf16", "fp8-emulated"):  # what runs on any CPU
        r = cases[precision]
        assert r["status"] == "ok" and r["checkpointing"] == "none", r
        assert r["tokens_per_s"] > 0 and math.isfinite(r["loss"]) and r["predicted_peak_gib"] > 0
    for precision in ("fp8-te", "fp8-torchao"):  # not on the bare machine: skipped, saying what to install
        assert cases[precision]["status"] == "skipped" and "install" in cases[precision]["why"]
    assert result["flops_per_token"] > 0 and result["params_total"] > 0
    versions = result["environment"]["versions"]
    # mutransfer is the repository on the path (the bare interpreter has no installed copy: the test above);
    # its version may still be read from the checkout's egg-info that `pip install -e .` leaves there
    assert versions["pydantic"] == importlib.metadata.version("pydantic")  # from the carried wheel
    assert not list((tmp_path / "tmp").glob("gpu-check-wheels.*"))  # the unpacked wheels are removed


def test_the_gpu_check_without_the_wheels_says_what_is_missing(bare_machine, tmp_path):
    python, _ = bare_machine
    (tmp_path / "none").mkdir()
    done = gpu_check(python, tmp_path / "none", tmp_path, "out/check.json", "--dry-run")
    assert done.returncode == 2
    assert "pydantic does not import with the 0 wheel(s)" in done.stderr and "benchmarks/README.md" in done.stderr
    assert not (tmp_path / "out").exists() and not list((tmp_path / "tmp").glob("gpu-check-wheels.*"))
    usage = gpu_check(python, tmp_path / "none", tmp_path, "--dry-run")  # the output path comes first
    assert usage.returncode == 2 and "usage:" in usage.stderr


if __name__ == "__main__":  # under torchrun: tests/test_portability.py teardown OUT FINISHED
    _teardown_ranks(Path(sys.argv[2]), sys.argv[3] == "1")
