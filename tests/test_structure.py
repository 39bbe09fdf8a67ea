"""The house rules, checked: no import loops, dependencies point inward, analysis draws without torch,
Optuna's private API in one module, and the config reference equal to the schema it documents."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("mutransfer", "proxy_sweeps", "full_scale", "analysis")


def modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for f in (ROOT / pkg).rglob("*.py"):
            name = ".".join(f.relative_to(ROOT).with_suffix("").parts)
            out[name.removesuffix(".__init__")] = f
    return out


def import_graph() -> dict[str, set[str]]:
    """Module -> project modules it imports anywhere in its body (function-level imports too)."""
    mods = modules()

    def resolve(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for mod, path in mods.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                deps |= {r for a in node.names if (r := resolve(a.name))}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                deps |= {r for a in node.names if (r := resolve(f"{node.module}.{a.name}") or resolve(node.module))}
        graph[mod] = {d for d in deps if d != mod and not mod.startswith(d + ".")}  # a package's own __init__
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, found, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_no_modules_import_each_other_in_a_loop():
    graph = import_graph()
    assert cycles(graph) == []
    # the check can fail: a planted loop is found
    assert cycles({**graph, "mutransfer.config": graph["mutransfer.config"] | {"mutransfer.parametrization"}})


def test_dependencies_point_inward():
    for mod, deps in import_graph().items():
        if mod.startswith("mutransfer"):
            outer = sorted(d for d in deps if not d.startswith("mutransfer"))
            assert not outer, f"{mod} imports the outer package(s) {outer}"
        if mod.startswith("analysis"):
            inner = sorted(d for d in deps if d.startswith(("proxy_sweeps", "full_scale")))
            assert not inner, f"{mod} imports {inner}: analysis works from files"


def test_analysis_report_does_not_import_torch():
    code = "import analysis.report, analysis.coord, analysis.transfer, sys; assert 'torch' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0


def test_the_command_line_is_built_without_torch_pandas_or_matplotlib():
    """Every command registers without loading the heavy libraries (they load when a command runs)."""
    code = ("import sys; from mutransfer.cli import build_parser; p = build_parser(); "
            "heavy = [m for m in ('torch', 'pandas', 'matplotlib', 'optuna') if m in sys.modules]; "
            "assert not heavy, heavy; "
            "print(p.format_help())")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "unavailable" not in done.stdout
    for name in ("coord-check", "data", "freeze", "plan", "report", "schema", "sweep", "train", "transfer-check"):
        assert name in done.stdout


def test_private_optuna_names_live_in_one_module():
    pattern = re.compile(r"optuna[\w.]*\._\w|\._(study_id|trial_id|get_stale_trial_ids)\b")
    users = sorted(str(p.relative_to(ROOT)) for p in modules().values() if pattern.search(p.read_text()))
    assert users == ["proxy_sweeps/optuna_adapter.py"], users


def test_config_reference_is_generated_from_the_schema():
    from mutransfer.config_docs import markdown

    doc = (ROOT / "docs" / "config.md").read_text()
    assert doc == markdown(), "docs/config.md is stale: regenerate with `mutransfer schema > docs/config.md`"


def test_every_config_field_says_what_it_means():
    """The meaning column of docs/config.md is each field's docstring, carried by the schema itself."""
    from mutransfer.config import Config
    from mutransfer.config_docs import all_tables, undocumented

    class Example(Config):
        said: int = 1
        """a field with a meaning"""
        unsaid: int = 2

    assert undocumented(Example) == ["unsaid"]  # the check finds a field without a docstring
    empty = [f"{title}.{name}" for _, tables in all_tables() for title, cls in tables for name in undocumented(cls)]
    assert empty == [], f"{len(empty)} fields without a description (a docstring under the field): {empty}"


@pytest.mark.parametrize("command", ["plan", "train", "sweep", "transfer-check", "coord-check", "freeze", "report",
                                     "data prepare"])
def test_every_command_accepts_set(command, capsys):
    from mutransfer.cli import main

    with pytest.raises(SystemExit):
        main([*command.split(), "--help"])
    assert "--set" in capsys.readouterr().out
