"""The report as a list of blocks, and its two renderings: a self-contained HTML page and Markdown.

Sections build plain blocks (a heading, a paragraph, a note, a table, a figure) and never write
HTML or Markdown themselves, so the two files always say the same thing. The HTML page needs
nothing from the network: inline CSS, images as base64 PNG data URIs.
"""

from __future__ import annotations

import base64
import html
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

STATUSES = ("pass", "fail", "inconclusive")  # how a verdict line or cell is styled


@dataclass
class Heading:
    text: str


@dataclass
class Para:
    text: str
    status: str | None = None  # "pass", "fail" or "inconclusive": a verdict line (styled, bold)


@dataclass
class Note:
    """Something the reader must know is missing or wrong: a file absent, unreadable, a run failed."""

    text: str


@dataclass
class Table:
    headers: list[str]
    rows: list[list]


@dataclass
class Figure:
    name: str  # file name stem for the Markdown twin's image folder
    png: bytes
    caption: str


@dataclass
class Section:
    id: str
    title: str
    blocks: list = field(default_factory=list)


def passed(ok: bool) -> str:
    return "pass" if ok else "fail"


# ---------------------------------------------------------------- formatting values


def fmt(x, digits: int = 4) -> str:
    if x is None:
        return "-"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, float):
        if not math.isfinite(x):
            return str(x)
        if 1e4 <= abs(x) < 1e15:
            return f"{x:,.0f}"
        return f"{x:.{digits}g}"
    if isinstance(x, (list, tuple)):
        return ", ".join(fmt(v, digits) for v in x)
    return str(x)


def flatten(obj: dict, prefix: str = "") -> list[tuple[str, object]]:
    """Nested dicts as (dotted key, value) rows, for provenance tables."""
    rows = []
    for key, value in obj.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            rows += flatten(value, name + ".")
        else:
            rows.append((name, value))
    return rows


def kv_table(pairs) -> Table:
    return Table(["field", "value"], [[k, fmt(v)] for k, v in pairs])


# ---------------------------------------------------------------- HTML

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 0 auto; max-width: 1200px;
       padding: 0 1.5em 3em; color: #1d1d1f; line-height: 1.45; }
header { border-bottom: 2px solid #ddd; margin-bottom: 1em; }
h1 { margin-bottom: .2em; } h2 { border-bottom: 1px solid #ddd; padding-bottom: .2em; margin-top: 2em; }
h3 { margin-bottom: .4em; font-family: ui-monospace, Menlo, Consolas, monospace; font-size: 1em; }
nav ul { list-style: none; padding: 0; display: flex; flex-wrap: wrap; gap: .4em 1.2em; }
table { border-collapse: collapse; margin: .6em 0; font-size: .85em; }
th, td { border: 1px solid #ccc; padding: .2em .55em; text-align: left; vertical-align: top; }
th { background: #f3f3f3; } td { font-variant-numeric: tabular-nums; max-width: 40em; overflow-wrap: anywhere; }
.note { background: #fff4e5; border-left: 4px solid #f0a020; padding: .35em .7em; margin: .5em 0; }
.pass { color: #17692a; font-weight: 600; } .fail { color: #b3261e; font-weight: 600; }
.inconclusive { color: #8a5a00; font-weight: 600; }
figure { margin: 1em 0; } figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { font-size: .85em; color: #555; }
.muted { color: #666; font-size: .85em; }
"""
IMG_ONLOAD = "this.dataset.loaded = this.naturalWidth > 0 ? 'yes' : 'no'"
SCRIPT = """
window.addEventListener('load', function () {
  var imgs = document.querySelectorAll('img'), ok = 0;
  imgs.forEach(function (im) { if (im.complete && im.naturalWidth > 0) { ok += 1; } });
  document.body.dataset.imagesLoaded = ok + '/' + imgs.length;
});
"""


def _cls(status: str | None) -> str:
    return f' class="{status}"' if status in STATUSES else ""


def _cell_status(cell) -> str | None:
    """A table cell that is exactly PASS, FAIL or INCONCLUSIVE is styled like a verdict line."""
    return cell.lower() if isinstance(cell, str) and cell.lower() in STATUSES and cell.isupper() else None


def render_html(sections: list[Section], title: str, generated: str) -> str:
    e = html.escape
    n_images = sum(isinstance(b, Figure) for s in sections for b in s.blocks)
    out = ["<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
           '<meta name="viewport" content="width=device-width, initial-scale=1">', f"<title>{e(title)}</title>",
           f"<style>{CSS}</style>", "</head>", f'<body data-images="{n_images}">', "<header>",
           f"<h1>{e(title)}</h1>", f'<p class="muted">{e(generated)}</p>', "<nav><ul>",
           *[f'<li><a href="#{s.id}">{e(s.title)}</a></li>' for s in sections], "</ul></nav>", "</header>"]
    for s in sections:
        out.append(f'<section id="{s.id}">')
        out.append(f"<h2>{e(s.title)}</h2>")
        for b in s.blocks:
            if isinstance(b, Heading):
                out.append(f"<h3>{e(b.text)}</h3>")
            elif isinstance(b, Note):
                out.append(f'<p class="note">{e(b.text)}</p>')
            elif isinstance(b, Para):
                text = re.sub(r"`([^`]+)`", r"<code>\1</code>", e(b.text))
                out.append(f"<p{_cls(b.status)}>{text}</p>")
            elif isinstance(b, Table):
                out.append("<table><thead><tr>" + "".join(f"<th>{e(str(h))}</th>" for h in b.headers)
                           + "</tr></thead><tbody>")
                for row in b.rows:
                    cells = "".join(f"<td{_cls(_cell_status(c))}>{e(str(c))}</td>" for c in row)
                    out.append(f"<tr>{cells}</tr>")
                out.append("</tbody></table>")
            elif isinstance(b, Figure):
                data = base64.b64encode(b.png).decode("ascii")
                out.append(f'<figure><img src="data:image/png;base64,{data}" alt="{e(b.caption)}" '
                           f'onload="{IMG_ONLOAD}" onerror="this.dataset.loaded = \'error\'">'
                           f"<figcaption>{e(b.caption)}</figcaption></figure>")
        out.append("</section>")
    out += [f"<script>{SCRIPT}</script>", "</body>", "</html>"]
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------- Markdown


def _md_cell(x) -> str:
    return str(x).replace("|", "\\|").replace("\n", " ")


def image_names(sections: list[Section]) -> dict[int, str]:
    """id(Figure) -> a unique, filesystem-safe file name, numbered in page order."""
    names = {}
    figures = [b for s in sections for b in s.blocks if isinstance(b, Figure)]
    for i, fig in enumerate(figures, 1):
        slug = re.sub(r"[^A-Za-z0-9]+", "-", Path(fig.name).with_suffix("").as_posix()).strip("-")[:60] or "figure"
        names[id(fig)] = f"{i:02d}-{slug}.png"
    return names


def render_markdown(sections: list[Section], title: str, generated: str, image_dir: str,
                    names: dict[int, str]) -> str:
    out = [f"# {title}", "", f"_{generated}_", ""]
    out += [f"- [{s.title}](#{s.id})" for s in sections] + [""]
    for s in sections:
        out += [f'<a id="{s.id}"></a>', "", f"## {s.title}", ""]
        for b in s.blocks:
            if isinstance(b, Heading):
                out += [f"### {b.text}", ""]
            elif isinstance(b, Note):
                out += [f"> **Note:** {b.text}", ""]
            elif isinstance(b, Para):
                out += [f"**{b.text}**" if b.status is not None else b.text, ""]
            elif isinstance(b, Table):
                out.append("| " + " | ".join(_md_cell(h) for h in b.headers) + " |")
                out.append("|" + "---|" * len(b.headers))
                out += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in b.rows]
                out.append("")
            elif isinstance(b, Figure):
                out += [f"![{_md_cell(b.caption)}]({image_dir}/{names[id(b)]})", "", f"_{b.caption}_", ""]
    return "\n".join(out) + "\n"
