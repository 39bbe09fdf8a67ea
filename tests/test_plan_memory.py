"""`mutransfer plan` on the 1.3B recipe: the documented path with no override, the lock check, and the
memory table with its fits / does-not-fit verdict per stage (exit 1 when a stage does not fit)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from mutransfer.cli import main
from mutransfer.plan import parse_bytes

ROOT = Path(__file__).resolve().parents[1]
XMODEL = str(ROOT / "full_scale" / "xmodel25_1p3b.toml")
RECIPE_LOCK = str(ROOT / "full_scale" / "xmodel25_recipe.lock.json")
SMOKE_LOCK = str(ROOT / "full_scale" / "smoke.hparams.lock.json")


def plan_json(capsys, *args) -> tuple[int, dict]:
    rc = main(["plan", XMODEL, "--json", *args])
    return rc, json.loads(capsys.readouterr().out)


def test_every_stage_fits_48_gpus_of_80gb_as_configured(capsys):
    rc, plan = plan_json(capsys, "--world-size", "48", "--gpu-memory", "80GiB")
    assert rc == 0
    assert plan["world_size"] == 48 and plan["gpu_memory_bytes"] == 80 * 2**30
    stages = plan["stages"]
    assert [s["name"] for s in stages] == ["warmup", "stable1", "stable2", "decay", "long_context", "long_context"]
    assert [(s["seq_len"], s["micro_batch"]) for s in stages][-2:] == [(8192, 1), (16384, 1)]
    assert all(s["fits"] and s["peak_bytes"] < 80 * 2**30 for s in stages)
    # recomputation per phase: only the 16,384-token phase pays for it
    assert [s["checkpointing"] for s in stages] == ["none"] * 5 + ["full"]
    assert [s["lightest_fitting"] for s in stages] == ["none"] * 5 + ["full"]
    # FLOPs at the config's sequence length, not a fixed 4096
    assert plan["seq_len"] == 3712


def test_without_checkpointing_the_long_context_phase_does_not_fit(capsys):
    rc, plan = plan_json(capsys, "--world-size", "48", "--gpu-memory", "80GiB",
                         "--set", "stages.long_context.phases.1.activation_checkpointing='none'")
    assert rc == 1
    verdicts = {(s["name"], s["seq_len"]): s["fits"] for s in plan["stages"]}
    assert verdicts[("long_context", 16384)] is False
    assert verdicts[("stable1", 3712)] is True


def test_the_recipe_lock_gives_the_published_learning_rates(capsys):
    assert main(["plan", XMODEL, "--hparams", RECIPE_LOCK]) == 0
    out = capsys.readouterr().out
    lrs = {line.split()[0]: line.split() for line in out.splitlines() if line.startswith(("attn_qkv", "embedding"))}
    assert float(lrs["attn_qkv"][4]) == pytest.approx(0.01 / 6, rel=1e-4)  # 1.667e-3
    assert float(lrs["embedding"][4]) == pytest.approx(0.01)


def test_a_lock_of_another_shape_is_refused_naming_the_fields(capsys):
    # the recipe config takes [param] from its lock; a byte-level, head-dim-16 lock cannot be its
    assert main(["plan", XMODEL, "--hparams", SMOKE_LOCK]) == 2
    err = capsys.readouterr().err
    assert "model.tokenizer" in err and "model.head_dim" in err
    # a config that names [param] must agree with the lock on it too
    assert main(["plan", XMODEL, "--hparams", SMOKE_LOCK, "--set", "param.parametrization='xmodel'",
                 "--set", "param.d_base=256"]) == 2
    err = capsys.readouterr().err
    for field in ("param.parametrization", "param.d_base", "model.tokenizer", "model.head_dim"):
        assert field in err


@pytest.mark.parametrize("args, message", [
    (["--set", "train.activation_checkpointing=most"], "train.activation_checkpointing"),
    (["--gpu-memory", "lots"], "--gpu-memory = 'lots' is not a memory size"),
    (["--gpu-memory", "0GB"], "must be positive"),
    (["--world-size", "7"], "global_batch = 480 is not divisible by micro_batch (2) x data-parallel size (7)"),
    (["--world-size", "0"], "--world-size"),
])
def test_bad_input_is_exit_2_naming_the_field(capsys, args, message):
    assert main(["plan", XMODEL, *args]) == 2
    assert message in capsys.readouterr().err


def test_memory_sizes_parse():
    assert parse_bytes("80GiB") == 80 * 2**30 and parse_bytes("80GB") == 80 * 10**9
    assert parse_bytes("141 GiB") == 141 * 2**30 and parse_bytes("1024") == 1024


def test_train_runs_the_documented_path_with_no_override(tmp_path):
    """The recipe config needs no --set: its lock (the published values) brings [param]."""
    from full_scale.config import load_run_config

    cfg = load_run_config(XMODEL)
    assert cfg.shape.param.parametrization == "xmodel" and cfg.shape.param.d_base == 256
    assert cfg.lock.provenance["source"] == "published recipe"
    assert cfg.stages.switch.restart_for("xmodel") == "all" and cfg.stages.switch.fuse_for("xmodel")


def test_the_plan_names_the_lightest_policy_that_fits_each_phase(capsys):
    """Per phase: a policy heavier than needed is named with the one that fits; and the other branch,
    a phase that fits only with recomputation."""
    rc, plan = plan_json(capsys, "--world-size", "48", "--set",
                         "stages.long_context.phases.0.activation_checkpointing='full'")
    assert rc == 0
    eight_k = plan["stages"][-2]
    assert (eight_k["checkpointing"], eight_k["lightest_fitting"]) == ("full", "none")
    assert main(["plan", XMODEL, "--world-size", "48", "--set",
                 "stages.long_context.phases.0.activation_checkpointing='full'"]) == 0
    out = capsys.readouterr().out
    assert "long_context[0] recomputes ('full') where 'none' fits" in out
    assert "stages[4] (long_context).phases[0].activation_checkpointing = 'none'" in out
    # 16k without recomputation does not fit; 'full' is the lightest that does (fp8-te has no 'selective')
    rc, plan = plan_json(capsys, "--world-size", "48", "--set",
                         "stages.long_context.phases.1.activation_checkpointing='none'")
    assert rc == 1
    assert (plan["stages"][-1]["fits"], plan["stages"][-1]["lightest_fitting"]) == (False, "full")
    # under bf16 selective recomputation is allowed, and is lighter than full: on a 64 GiB GPU the
    # 16k phase needs it (59.1 GiB without recomputation, 41.3 selective, 17.3 full; 54.4 allowed)
    rc, plan = plan_json(capsys, "--world-size", "48", "--gpu-memory", "64GiB", "--set", "train.precision='bf16'",
                         "--set", "stages.long_context.phases.1.activation_checkpointing='none'")
    assert rc == 1 and plan["stages"][-1]["lightest_fitting"] == "selective"


def test_memory_is_written_in_gib(capsys):
    assert main(["plan", XMODEL, "--world-size", "48"]) == 0
    out = capsys.readouterr().out
    assert "GiB" in out
    assert not re.search(r"[0-9.]\s*GB\b", out), re.findall(r".*[0-9.]\s*GB\b.*", out)
    line = next(x for x in out.splitlines() if x.startswith("memory (fp32"))
    assert line.endswith("GiB")
