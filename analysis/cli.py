"""The ``report`` sub-command's arguments, registered through the ``mutransfer.commands`` entry point.

Only argparse here: the report's modules (pandas, matplotlib) load when the command runs, so every
other ``mutransfer`` command starts without them.
"""

from __future__ import annotations

from analysis.report_options import OPTIONS


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "report", help="one self-contained HTML page (and a Markdown twin) from run directories",
        description="Detects each path's kind (coordinate check, sweep, transfer check, training run, lock "
                    "file) from its files and writes one page; never re-runs anything.")
    p.add_argument("paths", nargs="+", metavar="RUN_DIR", help="run directories (or lock files) to report on")
    p.add_argument("--out", default="report.html", help="HTML file to write (default: report.html)")
    p.add_argument("--md", help="Markdown twin (default: the --out path with .md; images in <name>_files/)")
    p.add_argument("--title", default=OPTIONS["title"], help="page title (same as --set title=...)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="a report option, the value in TOML (repeatable): "
                        + ", ".join(f"{k} (default {v!r})" for k, v in OPTIONS.items()))
    p.set_defaults(func=_run)


def _run(args) -> int:
    from analysis.report import run

    return run(args)
